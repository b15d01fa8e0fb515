"""Shared fixtures: tiny datasets and a tiny trained teacher run."""

import pytest

from ntkd.data import load_dataset
from ntkd.training import TrainConfig, train_teacher

TINY_MNIST1D = {"num_samples": 600}


@pytest.fixture(scope="session")
def tiny_mnist1d():
    """MNIST-1D with 480 train / 120 test examples."""
    return load_dataset("mnist1d", **TINY_MNIST1D)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    """A small CNN teacher trained 4 epochs with a checkpoint every epoch."""
    out = tmp_path_factory.mktemp("teacher")
    cfg = TrainConfig(
        dataset="mnist1d",
        dataset_options=TINY_MNIST1D,
        model="cnn1d",
        model_options={"features": [8, 8, 8]},
        epochs=4,
        batch_size=64,
    )
    train_teacher(cfg, out, progress=False)
    return out
