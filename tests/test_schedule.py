"""The study's training schedule: 1-D augmentation and log-grid checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_MNIST1D

from ntkd import checkpoints as ckpt_lib
from ntkd.configs.mnist1d import log_grid
from ntkd.data import augment, augment_signals
from ntkd.training import TrainConfig, train


def test_augment_signals_shifts_with_zero_fill_and_adds_noise():
    x = jnp.arange(2 * 10, dtype=jnp.float32).reshape(2, 10, 1) + 1.0
    out = np.asarray(augment_signals(jax.random.key(0), x, max_shift=3, noise=0.0))
    assert out.shape == x.shape
    for row, src in zip(out[..., 0], np.asarray(x)[..., 0]):
        # some shift s in [-3, 3]: row equals src moved by s, zeros where it left the window
        matches = [s for s in range(-3, 4) if np.array_equal(row, np.roll(np.pad(src, 3), s)[3:13])]
        assert matches
    noisy = np.asarray(augment_signals(jax.random.key(0), x, max_shift=0, noise=0.5)) - np.asarray(
        x
    )
    assert 0.2 < noisy.std() < 0.8
    np.testing.assert_array_equal(augment(jax.random.key(1), x), augment(jax.random.key(1), x))
    with pytest.raises(ValueError, match="augment"):
        augment(jax.random.key(0), jnp.zeros((2, 3)))


def test_log_grid():
    assert log_grid(60) == [1, 2, 4, 8, 16, 32]
    assert log_grid(1) == []


def test_checkpoint_epochs_add_to_checkpoint_every(tmp_path):
    cfg = TrainConfig(
        dataset="mnist1d",
        dataset_options=TINY_MNIST1D,
        model="mlp",
        model_options={"widths": [8]},
        epochs=6,
        batch_size=64,
        checkpoint_every=3,
        checkpoint_epochs=[1, 2],
        augment=True,
    )
    train(cfg, tmp_path / "run", progress=False)
    assert ckpt_lib.list_epochs(tmp_path / "run") == [0, 1, 2, 3, 6]
