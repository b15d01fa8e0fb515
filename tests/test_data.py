"""Loaders (shapes, determinism, real archive formats), batching, augmentation."""

import pickle

import jax
import numpy as np
import pytest

from ntkd.data import (
    DatasetError,
    augment_images,
    gaussian_bayes_logits,
    iterate_batches,
    load_dataset,
)


def test_mnist1d_shapes_split_and_determinism():
    a = load_dataset("mnist1d", num_samples=500, seed=3)
    b = load_dataset("mnist1d", num_samples=500, seed=3)
    c = load_dataset("mnist1d", num_samples=500, seed=4)
    assert a.x_train.shape == (400, 40, 1) and a.x_test.shape == (100, 40, 1)
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int32 and a.num_classes == 10
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert not np.array_equal(a.x_train, c.x_train)
    # standardised with training statistics
    np.testing.assert_allclose(a.x_train.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(a.x_train.std(0), 1, atol=1e-4)


def test_digits_stratified_split():
    ds = load_dataset("digits")
    assert ds.input_shape == (8, 8, 1) and len(ds.x_train) + len(ds.x_test) == 1797
    train_freq = np.bincount(ds.y_train) / len(ds.y_train)
    test_freq = np.bincount(ds.y_test) / len(ds.y_test)
    np.testing.assert_allclose(train_freq, test_freq, atol=0.01)


def test_gaussian_similarity_structure_and_bayes():
    ds = load_dataset(
        "gaussian", num_classes=6, dim=16, similarity=0.6, num_superclasses=2, n_train=3000
    )
    m, sup = ds.meta["class_means"], ds.meta["superclass"]
    cos = m @ m.T
    same = sup[:, None] == sup[None, :]
    off = ~np.eye(6, dtype=bool)
    np.testing.assert_allclose(np.diag(cos), 1, atol=1e-12)
    np.testing.assert_allclose(cos[same & off], 0.6, atol=1e-12)
    np.testing.assert_allclose(cos[~same], 0, atol=1e-12)
    # class means estimated from the samples point along separation * mu_k
    est = np.stack([ds.x_train[ds.y_train == k].mean(0) for k in range(6)])
    np.testing.assert_allclose(est, 3.0 * m, atol=0.25)
    # the Bayes classifier beats chance by a wide margin
    acc = np.mean(gaussian_bayes_logits(ds, ds.x_test).argmax(1) == ds.y_test)
    assert acc > 0.6


def _write_cifar10(root, n=6):
    rng = np.random.default_rng(0)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        with open(base / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f)
        batches[name] = (data, labels)
    return batches


def test_fake_cifar10_archive(tmp_path):
    batches = _write_cifar10(tmp_path)
    ds = load_dataset("cifar10", data_dir=tmp_path, standardize=False)
    assert ds.x_train.shape == (30, 32, 32, 3) and ds.x_test.shape == (6, 32, 32, 3)
    data, labels = batches["data_batch_1"]
    # row-major CHW bytes -> HWC floats in [0, 1]
    first = data[0].reshape(3, 32, 32).transpose(1, 2, 0) / 255.0
    np.testing.assert_allclose(ds.x_train[0], first, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_train[:6], labels)
    np.testing.assert_array_equal(ds.y_test, batches["test_batch"][1])


def test_fake_cifar100_archive_fine_and_coarse(tmp_path):
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    rng = np.random.default_rng(1)
    for name, n in [("train", 8), ("test", 4)]:
        with open(base / name, "wb") as f:
            pickle.dump(
                {
                    b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                    b"fine_labels": rng.integers(0, 100, n).tolist(),
                    b"coarse_labels": rng.integers(0, 20, n).tolist(),
                },
                f,
            )
    fine = load_dataset("cifar100", data_dir=tmp_path)
    coarse = load_dataset("cifar100", data_dir=tmp_path, label_type="coarse")
    assert (
        fine.num_classes == 100
        and coarse.num_classes == 20
        and fine.x_train.shape == (8, 32, 32, 3)
    )


def test_cifar_missing_and_corrupt_archives(tmp_path):
    with pytest.raises(DatasetError, match="data_batch_1.*cifar-10-batches-py"):
        load_dataset("cifar10", data_dir=tmp_path)
    _write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="test_batch is not a valid CIFAR pickle"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_bad_names_and_options(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset 'mnist2d'"):
        load_dataset("mnist2d")
    with pytest.raises(DatasetError, match="unknown mnist1d option"):
        load_dataset("mnist1d", bogus=1)
    with pytest.raises(DatasetError, match="tiny-imagenet-200"):
        load_dataset("tinyimagenet", data_dir=tmp_path)


def test_tinyimagenet_folder_layout(tmp_path):
    from PIL import Image

    base = tmp_path / "tiny-imagenet-200"
    wnids = ["n01", "n02"]
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids))
    rng = np.random.default_rng(0)
    lines = []
    for k, w in enumerate(wnids):
        (base / "train" / w / "images").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
                base / "train" / w / "images" / f"{w}_{i}.JPEG"
            )
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
            base / "val" / "images" / f"v{k}.JPEG"
        )
        lines.append(f"v{k}.JPEG\t{w}\t0\t0\t64\t64")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines))
    ds = load_dataset("tinyimagenet", data_dir=tmp_path, standardize=False)
    assert (
        ds.x_train.shape == (4, 64, 64, 3)
        and ds.y_train.tolist() == [0, 0, 1, 1]
        and ds.y_test.tolist() == [0, 1]
    )
    cached = load_dataset(
        "tinyimagenet", data_dir=tmp_path, standardize=False
    )  # from the .npy cache
    np.testing.assert_array_equal(cached.x_train, ds.x_train)


def test_batches_deterministic_and_cover_epoch():
    a = list(iterate_batches(103, 10, seed=1, epoch=2))
    b = list(iterate_batches(103, 10, seed=1, epoch=2))
    c = list(iterate_batches(103, 10, seed=1, epoch=3))
    assert len(a) == 10 and all(len(x) == 10 for x in a)
    np.testing.assert_array_equal(np.concatenate(a), np.concatenate(b))
    assert not np.array_equal(np.concatenate(a), np.concatenate(c))
    full = np.concatenate(list(iterate_batches(103, 10, seed=1, epoch=2, drop_last=False)))
    np.testing.assert_array_equal(np.sort(full), np.arange(103))


def test_augment_crops_are_shifted_windows_and_flips():
    x = np.arange(2 * 8 * 8 * 1, dtype=np.float32).reshape(2, 8, 8, 1) + 1
    out = np.asarray(augment_images(jax.random.key(0), x, pad=2))
    assert out.shape == x.shape
    padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
    for i in range(2):
        windows = [padded[i, r : r + 8, c : c + 8] for r in range(5) for c in range(5)]
        windows += [w[:, ::-1] for w in windows]
        assert any(np.array_equal(out[i], w) for w in windows)
    with pytest.raises(ValueError, match="H, W, C"):
        augment_images(jax.random.key(0), x[:, :, :, 0])
