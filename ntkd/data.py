"""Datasets, standardisation, deterministic batching and augmentation.

Every loader returns a :class:`Dataset` of NumPy arrays (inputs float32 with a
trailing channel axis, labels int32). Nothing is ever downloaded:

- ``mnist1d``: generated locally by ``mnist1d.data.make_dataset`` (Greydanus
  2020); inputs (40, 1); 4000 train / 1000 test by default.
- ``digits``: scikit-learn's bundled 8×8 digits; inputs (8, 8, 1); a fixed
  stratified split.
- ``cifar10`` / ``cifar100``: the standard python-pickle archives, unpacked in
  ``data_dir``; inputs (32, 32, 3).
- ``tinyimagenet``: the standard ``tiny-imagenet-200`` folder of 64×64 JPEGs,
  decoded once with Pillow and cached as ``.npy`` next to it.
- ``gaussian``: a synthetic Gaussian mixture whose class means have a
  controllable cosine similarity and an optional super-class hierarchy.

Example:
    >>> ds = load_dataset("mnist1d", num_samples=500)
    >>> ds.x_train.shape, ds.num_classes
    ((400, 40, 1), 10)
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ntkd._io import write_bytes

DATASETS = ("mnist1d", "digits", "cifar10", "cifar100", "tinyimagenet", "gaussian")


class DatasetError(ValueError):
    """A dataset name, option or local copy is wrong; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A train/test split held in host memory.

    Attributes:
        name: dataset name as given to :func:`load_dataset`.
        x_train: (n_train, *input_shape) float32 inputs.
        y_train: (n_train,) int32 labels in [0, num_classes).
        x_test: (n_test, *input_shape) float32 inputs.
        y_test: (n_test,) int32 labels.
        num_classes: number of classes k.
        meta: loader-specific extras (e.g. the Gaussian class means).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, without the batch axis."""
        return tuple(self.x_train.shape[1:])

    def subset(self, n_train: int | None = None, n_test: int | None = None) -> Dataset:
        """The first ``n_train`` / ``n_test`` examples (the loaders already shuffle)."""
        return dataclasses.replace(
            self,
            x_train=self.x_train[:n_train],
            y_train=self.y_train[:n_train],
            x_test=self.x_test[:n_test],
            y_test=self.y_test[:n_test],
        )

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={self.x_train.shape}, test={self.x_test.shape}, "
            f"num_classes={self.num_classes})"
        )


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    standardize: bool | None = None,
    **options: Any,
) -> Dataset:
    """Loads a dataset by name; see the module docstring for the names.

    Args:
        name: one of :data:`DATASETS`.
        data_dir: folder holding local archives (CIFAR, Tiny-ImageNet); defaults to
            ``$NTKD_DATA`` or ``~/.ntkd/data``.
        seed: seed for generation (``mnist1d``, ``gaussian``) and splits.
        standardize: subtract the training mean and divide by the training std
            (per channel for images, per feature otherwise). Default: on for every
            dataset except ``gaussian``.
        **options: loader options, e.g. ``num_samples`` for ``mnist1d`` or
            ``similarity`` for ``gaussian`` (see the ``_load_*`` functions).

    Returns:
        A :class:`Dataset`.

    Raises:
        DatasetError: unknown name or option, or a missing/corrupt local copy.
    """
    loaders: dict[str, Callable[..., Dataset]] = {
        "mnist1d": _load_mnist1d,
        "digits": _load_digits,
        "cifar10": lambda **kw: _load_cifar(10, **kw),
        "cifar100": lambda **kw: _load_cifar(100, **kw),
        "tinyimagenet": _load_tinyimagenet,
        "gaussian": _load_gaussian,
    }
    if name not in loaders:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    root = Path(
        data_dir or os.environ.get("NTKD_DATA", Path.home() / ".ntkd" / "data")
    ).expanduser()
    try:
        ds = loaders[name](root=root, seed=seed, **options)
    except TypeError as e:
        if "unexpected keyword" not in str(e):
            raise
        raise DatasetError(
            f"dataset {name!r} does not take option(s) {sorted(options)}: {e}"
        ) from e
    if standardize is None:
        standardize = name != "gaussian"
    return standardize_dataset(ds) if standardize else ds


def standardize_dataset(ds: Dataset) -> Dataset:
    """Standardises inputs with statistics of the training split only.

    Images (rank-3 inputs) use per-channel statistics; other inputs use one
    statistic per feature position.
    """
    axes = (0, 1, 2) if ds.x_train.ndim == 4 else (0,)
    mean = ds.x_train.mean(axis=axes, keepdims=True)
    std = ds.x_train.std(axis=axes, keepdims=True)
    std = np.where(std < 1e-8, 1.0, std)
    f = lambda x: ((x - mean) / std).astype(np.float32)
    meta = dict(ds.meta, standardize_mean=mean.squeeze(0), standardize_std=std.squeeze(0))
    return dataclasses.replace(ds, x_train=f(ds.x_train), x_test=f(ds.x_test), meta=meta)


def _finish(name, x_train, y_train, x_test, y_test, num_classes, meta=None) -> Dataset:
    return Dataset(
        name,
        np.asarray(x_train, np.float32),
        np.asarray(y_train, np.int32),
        np.asarray(x_test, np.float32),
        np.asarray(y_test, np.int32),
        int(num_classes),
        meta or {},
    )


def _load_mnist1d(
    *,
    root: Path,
    seed: int,
    num_samples: int = 5000,
    train_split: float = 0.8,
    **generator_args: Any,
) -> Dataset:
    """MNIST-1D generated in memory (never downloaded).

    Args:
        num_samples: total examples; the default 5000 gives the standard 4000/1000 split.
        train_split: fraction used for training.
        **generator_args: other ``mnist1d`` generator arguments (``iid_noise_scale``,
            ``corr_noise_scale``, ``shear_scale``, ...).
    """
    del root
    if (
        isinstance(num_samples, bool)
        or not isinstance(num_samples, (int, np.integer))
        or num_samples < 20
    ):
        raise DatasetError(
            f"mnist1d num_samples must be an integer >= 20 (10 classes, each in both "
            f"splits), got {num_samples!r}"
        )
    used = num_samples // 10 * 10  # the generator makes num_samples // 10 examples per class
    number = isinstance(train_split, (int, float, np.floating)) and not isinstance(
        train_split, bool
    )
    if not (number and 0.0 < train_split < 1.0 and 1 <= int(used * float(train_split)) < used):
        raise DatasetError(
            f"mnist1d train_split must be in (0, 1) and leave at least one training and one "
            f"test example, got {train_split!r} with num_samples={num_samples}"
        )
    x, y, x_test, y_test = _generate_mnist1d(
        int(seed),
        int(num_samples),
        float(train_split),
        tuple(
            sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in generator_args.items())
        ),
    )
    return _finish("mnist1d", x, y, x_test, y_test, 10)


@functools.lru_cache(maxsize=8)
def _generate_mnist1d(seed: int, num_samples: int, train_split: float, generator_args: tuple):
    """Generation takes ~1 s, so repeated loads in one process share the arrays."""
    from mnist1d.data import get_dataset_args, make_dataset

    generator_args = dict(generator_args)
    args = get_dataset_args()
    unknown = set(generator_args) - set(vars(args))
    if unknown:
        raise DatasetError(
            f"unknown mnist1d option(s) {sorted(unknown)}; known: {sorted(vars(args))}"
        )
    args.num_samples, args.train_split, args.seed = num_samples, train_split, seed
    for k, v in generator_args.items():
        setattr(args, k, v)
    d = make_dataset(args)
    arrays = (d["x"][..., None], d["y"], d["x_test"][..., None], d["y_test"])
    for a in arrays:
        a.setflags(write=False)
    return arrays


def _load_digits(*, root: Path, seed: int, test_fraction: float = 0.25) -> Dataset:
    """scikit-learn's 8×8 digits (1797 images), stratified split fixed by ``seed``."""
    del root
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0)[..., None]
    xtr, xte, ytr, yte = train_test_split(
        x, d.target, test_size=test_fraction, stratify=d.target, random_state=seed
    )
    return _finish("digits", xtr, ytr, xte, yte, 10)


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(path)
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as e:  # any unpickling failure means a corrupt archive member
        raise DatasetError(
            f"{path} is not a valid CIFAR pickle ({type(e).__name__}: {e}); re-extract the archive"
        ) from e


def _cifar_images(batch: dict, path: Path) -> np.ndarray:
    data = np.asarray(batch.get(b"data"))
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetError(f"{path}: expected b'data' of shape (N, 3072), got {data.shape}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.float32) / 255.0


def _load_cifar(num_classes: int, *, root: Path, seed: int, label_type: str = "fine") -> Dataset:
    """CIFAR-10/100 from the python-pickle archives (``cifar-10-batches-py``,
    ``cifar-100-python``) extracted into ``data_dir``.

    Args:
        label_type: CIFAR-100 only: ``"fine"`` (100 classes) or ``"coarse"`` (20).
    """
    del seed
    if num_classes == 10:
        folder, train_files, test_files, key = (
            "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)],
            ["test_batch"],
            b"labels",
        )
    else:
        if label_type not in ("fine", "coarse"):
            raise DatasetError(f"label_type must be 'fine' or 'coarse', got {label_type!r}")
        folder, train_files, test_files, key = (
            "cifar-100-python",
            ["train"],
            ["test"],
            f"{label_type}_labels".encode(),
        )
        num_classes = 100 if label_type == "fine" else 20
    base = root / folder
    missing = [f for f in train_files + test_files if not (base / f).is_file()]
    if missing:
        raise DatasetError(
            f"CIFAR-{10 if folder.startswith('cifar-10-') else 100} not found: expected files "
            f"{', '.join(missing)} in {base}. Extract the python version of the archive "
            f"({folder.replace('-batches-py', '').replace('-python', '')}-python.tar.gz) into {root} "
            "or pass --data-dir / set NTKD_DATA to the folder that holds it."
        )

    def read(files):
        xs, ys = [], []
        for f in files:
            b = _unpickle(base / f)
            if key not in b:
                raise DatasetError(f"{base / f}: no {key!r} entry; is this the right archive?")
            xs.append(_cifar_images(b, base / f))
            ys.append(np.asarray(b[key]))
        return np.concatenate(xs), np.concatenate(ys)

    xtr, ytr = read(train_files)
    xte, yte = read(test_files)
    return _finish(
        "cifar10" if folder.startswith("cifar-10-") else "cifar100", xtr, ytr, xte, yte, num_classes
    )


def _load_tinyimagenet(*, root: Path, seed: int) -> Dataset:
    """Tiny-ImageNet-200 from the standard folder layout, cached as ``.npy``.

    Expects ``tiny-imagenet-200/{wnids.txt, train/<wnid>/images/*.JPEG,
    val/images/*.JPEG, val/val_annotations.txt}`` in ``data_dir``; the labelled
    ``val`` split serves as test set.
    """
    del seed
    base = root / "tiny-imagenet-200"
    wnids_file = base / "wnids.txt"
    if not wnids_file.is_file() or not (base / "val" / "val_annotations.txt").is_file():
        raise DatasetError(
            f"Tiny-ImageNet not found: expected {wnids_file}, {base}/train/<wnid>/images/*.JPEG "
            f"and {base}/val/val_annotations.txt. Unzip tiny-imagenet-200.zip into {root}."
        )
    cache = base / "ntkd_cache"
    names = ["x_train", "y_train", "x_test", "y_test"]
    if all((cache / f"{n}.npy").is_file() for n in names):
        x_tr, y_tr, x_te, y_te = (np.load(cache / f"{n}.npy") for n in names)
        return _finish("tinyimagenet", x_tr / 255.0, y_tr, x_te / 255.0, y_te, 200)
    from PIL import Image

    wnids = wnids_file.read_text().split()
    index = {w: i for i, w in enumerate(wnids)}

    def decode(paths):
        return np.stack([np.asarray(Image.open(p).convert("RGB"), np.uint8) for p in paths])

    train = [
        (p, index[w]) for w in wnids for p in sorted((base / "train" / w / "images").glob("*.JPEG"))
    ]
    val = []
    for line in (base / "val" / "val_annotations.txt").read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and parts[1] in index:
            val.append((base / "val" / "images" / parts[0], index[parts[1]]))
    if not train or not val:
        raise DatasetError(
            f"Tiny-ImageNet at {base} has {len(train)} train and {len(val)} val images; "
            "expected the full folder layout"
        )
    arrays = [
        decode([p for p, _ in train]),
        np.array([y for _, y in train]),
        decode([p for p, _ in val]),
        np.array([y for _, y in val]),
    ]
    for n, a in zip(names, arrays):
        buf = io.BytesIO()
        np.save(buf, a)
        write_bytes(cache / f"{n}.npy", buf.getvalue())
    return _finish("tinyimagenet", arrays[0] / 255.0, arrays[1], arrays[2] / 255.0, arrays[3], 200)


def gaussian_class_means(
    *, num_classes: int, dim: int, similarity: float, num_superclasses: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Unit class-mean directions with a controlled similarity structure.

    Classes are split round-robin into ``num_superclasses`` groups, each with an
    orthonormal direction u_s; class k's mean is
    ``sqrt(ρ)·u_{s(k)} + sqrt(1-ρ)·e_k`` with e_k orthonormal and orthogonal to
    all u, so cos(μ_j, μ_k) = ρ within a super-class and 0 across. Without a
    hierarchy every class shares one direction: cos = ρ for all pairs.

    Returns:
        means: (num_classes, dim) unit vectors; superclass: (num_classes,) int.
    """
    s = num_superclasses or 1
    if not 0.0 <= similarity < 1.0:
        raise DatasetError(f"similarity must be in [0, 1), got {similarity}")
    if dim < num_classes + s:
        raise DatasetError(
            f"dim={dim} too small: need at least num_classes + num_superclasses = {num_classes + s}"
        )
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, num_classes + s)))
    u, e = basis[:, :s].T, basis[:, s:].T
    superclass = np.arange(num_classes) % s
    means = np.sqrt(similarity) * u[superclass] + np.sqrt(1.0 - similarity) * e
    return means, superclass


def _load_gaussian(
    *,
    root: Path,
    seed: int,
    num_classes: int = 10,
    dim: int = 32,
    similarity: float = 0.5,
    num_superclasses: int | None = None,
    separation: float = 3.0,
    noise: float = 1.0,
    n_train: int = 2000,
    n_test: int = 1000,
) -> Dataset:
    """Gaussian mixture x = separation·μ_y + noise·ε, uniform class prior.

    ``meta`` holds ``class_means`` (k, dim) (the μ_k, unit norm), ``superclass``
    (k,), ``separation`` and ``noise``; the Bayes posterior is
    ``softmax(separation·x·μ_kᵀ / noise²)`` (all ‖μ_k‖ = 1), see
    :func:`gaussian_bayes_logits`.
    """
    del root
    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise DatasetError(f"gaussian {name} must be an integer >= 1, got {value!r}")
    means, superclass = gaussian_class_means(
        num_classes=num_classes,
        dim=dim,
        similarity=similarity,
        num_superclasses=num_superclasses,
        seed=seed,
    )
    rng = np.random.default_rng([seed, 1])

    def sample(n):
        y = rng.integers(0, num_classes, n)
        return separation * means[y] + noise * rng.standard_normal((n, dim)), y

    xtr, ytr = sample(n_train)
    xte, yte = sample(n_test)
    meta = {
        "class_means": means,
        "superclass": superclass,
        "separation": separation,
        "noise": noise,
    }
    return _finish("gaussian", xtr, ytr, xte, yte, num_classes, meta)


def gaussian_bayes_logits(ds: Dataset, x: np.ndarray) -> np.ndarray:
    """Bayes-optimal logits (n, k) for an unstandardised ``gaussian`` dataset."""
    if "class_means" not in ds.meta or "standardize_mean" in ds.meta:
        raise DatasetError(
            "gaussian_bayes_logits needs a gaussian dataset loaded with standardize=False"
        )
    m, sep, noise = ds.meta["class_means"], ds.meta["separation"], ds.meta["noise"]
    return (sep * np.asarray(x).reshape(len(x), -1) @ m.T / noise**2).astype(np.float32)


def epoch_permutation(n: int, *, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch: a pure function of (seed, epoch), so an
    interrupted run that resumes at ``epoch`` sees exactly the same batches."""
    return np.random.default_rng([seed, epoch, 0x6E746B64]).permutation(n)


def iterate_batches(
    n: int, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True, drop_last: bool = True
) -> Iterator[np.ndarray]:
    """Yields index arrays of each batch of one epoch (deterministic).

    Args:
        n: number of examples.
        batch_size: examples per batch; if larger than n, one batch of n.
        seed: with ``epoch``, defines the permutation (see :func:`epoch_permutation`).
        epoch: the epoch whose permutation is used.
        shuffle: permute before batching.
        drop_last: drop the final incomplete batch (keeps shapes static under jit).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = epoch_permutation(n, seed=seed, epoch=epoch) if shuffle else np.arange(n)
    batch_size = min(batch_size, n)
    stop = n - n % batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        yield order[i : i + batch_size]


def augment(key: jax.Array, x: jax.Array) -> jax.Array:
    """The training augmentation of a batch: :func:`augment_images` for
    (batch, H, W, C) images, :func:`augment_signals` for (batch, length, C)
    signals such as MNIST-1D."""
    if x.ndim == 4:
        return augment_images(key, x)
    if x.ndim == 3:
        return augment_signals(key, x)
    raise ValueError(
        f"no augmentation for inputs of shape {x.shape}; augment needs (batch, H, W, C) images "
        "or (batch, length, C) signals — set augment=False"
    )


def augment_signals(
    key: jax.Array, x: jax.Array, *, max_shift: int = 4, noise: float = 0.1
) -> jax.Array:
    """Random translation by up to ``max_shift`` positions (zero-filled) and
    additive Gaussian noise of standard deviation ``noise`` (in the units of
    the standardised inputs).

    Args:
        key: PRNG key.
        x: (batch, length, channels) signals.

    Returns:
        Augmented signals, same shape and dtype.
    """
    if x.ndim != 3:
        raise ValueError(f"augment_signals expects (batch, length, C) signals, got shape {x.shape}")
    b, length, c = x.shape
    k_shift, k_noise = jax.random.split(key)
    padded = jnp.pad(x, ((0, 0), (max_shift, max_shift), (0, 0)))
    offsets = jax.random.randint(k_shift, (b,), 0, 2 * max_shift + 1)
    out = jax.vmap(lambda sig, off: jax.lax.dynamic_slice(sig, (off, 0), (length, c)))(
        padded, offsets
    )
    return out + noise * jax.random.normal(k_noise, out.shape, out.dtype)


def augment_images(key: jax.Array, x: jax.Array, *, pad: int = 4, flip: bool = True) -> jax.Array:
    """Random crop (after ``pad`` pixels of zero padding) and horizontal flip.

    Args:
        key: PRNG key.
        x: (batch, height, width, channels) images.

    Returns:
        Augmented images, same shape and dtype.
    """
    if x.ndim != 4:
        raise ValueError(f"augment_images expects (batch, H, W, C) images, got shape {x.shape}")
    b, h, w, _ = x.shape
    k_crop, k_flip = jax.random.split(key)
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(k_crop, (b, 2), 0, 2 * pad + 1)

    def crop(img, off):
        return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, img.shape[-1]))

    out = jax.vmap(crop)(padded, offsets)
    if flip:
        do_flip = jax.random.bernoulli(k_flip, 0.5, (b, 1, 1, 1))
        out = jnp.where(do_flip, out[:, :, ::-1, :], out)
    return out
