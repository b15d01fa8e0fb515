"""Flax Linen models, used functionally through ``model.apply(variables, x)``.

Every model maps a batch of inputs to logits ``(batch, num_classes)`` and is
called as ``model.apply(variables, x, train=False)``; ``train=True`` only
matters for BatchNorm (batch statistics, ``mutable=["batch_stats"]``).
Building blocks (``act``, ``norm``) are injected dataclass fields, as in the
Flax ImageNet example.

Families:
    - :class:`MLP`: dense layers on flattened inputs (the MNIST-1D student).
    - :class:`CNN1D`: 1-D convolutions (the MNIST-1D teacher).
    - :class:`LeNet5`: LeNet-5 with a width multiplier (LeNet-5x8 is a student
      in Harutyunyan et al. 2023).
    - :class:`ResNet`: CIFAR ResNets of depth 6n+2 with BatchNorm
      (He et al. 2016): ResNet-20/56/110.

Example:
    >>> model = get_model("mlp", num_classes=10, widths=(64,))
    >>> variables = init_variables(model, jax.random.key(0), (40, 1))
    >>> model.apply(variables, jnp.zeros((3, 40, 1))).shape
    (3, 10)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

ModuleDef = Any


class MLP(nn.Module):
    """Fully connected ReLU network on flattened inputs.

    Attributes:
        num_classes: number of logits k.
        widths: hidden layer widths.
        act: activation.
    """

    num_classes: int
    widths: Sequence[int] = (256, 256)
    act: Callable = nn.relu

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        x = x.reshape((x.shape[0], -1))
        for i, w in enumerate(self.widths):
            x = self.act(nn.Dense(w, name=f"dense{i}")(x))
        return nn.Dense(self.num_classes, name="head")(x)


class CNN1D(nn.Module):
    """1-D convolutional network for sequences of shape (length, channels).

    Follows the MNIST-1D reference CNN (Greydanus 2020): strided convolutions,
    then a dense head.

    Attributes:
        num_classes: number of logits k.
        features: channels of each convolution.
        kernel_size: convolution width.
        strides: stride of each convolution.
    """

    num_classes: int
    features: Sequence[int] = (32, 32, 32)
    kernel_size: int = 5
    strides: Sequence[int] = (2, 2, 2)
    act: Callable = nn.relu

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        if x.ndim == 2:
            x = x[..., None]
        for i, (f, s) in enumerate(zip(self.features, self.strides)):
            x = self.act(
                nn.Conv(f, (self.kernel_size,), strides=(s,), padding="SAME", name=f"conv{i}")(x)
            )
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.num_classes, name="head")(x)


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) with a width multiplier.

    conv(6w, 5×5) → pool → conv(16w, 5×5) → pool → dense(120w) → dense(84w) → k.

    Attributes:
        num_classes: number of logits k.
        width: channel/unit multiplier (8 gives the paper's LeNet-5x8 student).
        padding: ``"VALID"`` (classic, for 32×32 inputs) or ``"SAME"`` (small inputs
            such as 8×8 digits).
    """

    num_classes: int
    width: int = 1
    padding: str = "VALID"
    act: Callable = nn.relu

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        w = self.width
        x = self.act(nn.Conv(6 * w, (5, 5), padding=self.padding, name="conv0")(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = self.act(nn.Conv(16 * w, (5, 5), padding=self.padding, name="conv1")(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = x.reshape((x.shape[0], -1))
        x = self.act(nn.Dense(120 * w, name="dense0")(x))
        x = self.act(nn.Dense(84 * w, name="dense1")(x))
        return nn.Dense(self.num_classes, name="head")(x)


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with BatchNorm and a projection shortcut."""

    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable

    @nn.compact
    def __call__(self, x):
        y = self.act(self.norm()(self.conv(self.features, (3, 3), (self.strides, self.strides))(x)))
        y = self.norm(scale_init=nn.initializers.zeros)(self.conv(self.features, (3, 3))(y))
        if x.shape != y.shape:
            x = self.norm()(
                self.conv(self.features, (1, 1), (self.strides, self.strides), name="proj")(x)
            )
        return self.act(x + y)


class ResNet(nn.Module):
    """CIFAR ResNet of depth 6n+2 (three stages of n basic blocks).

    Attributes:
        num_classes: number of logits k.
        depth: 20, 32, 44, 56, 110, ... (must satisfy depth = 6n + 2).
        width: channels of the first stage (16 in He et al.; stages use w, 2w, 4w).
    """

    num_classes: int
    depth: int = 20
    width: int = 16
    act: Callable = nn.relu

    @nn.compact
    def __call__(self, x, train: bool = False):
        if (self.depth - 2) % 6 or self.depth < 8:
            raise ValueError(
                f"ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 56, 110, ...), got {self.depth}"
            )
        n = (self.depth - 2) // 6
        conv = functools.partial(nn.Conv, use_bias=False, padding="SAME")
        norm = functools.partial(
            nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5
        )
        x = self.act(norm()(conv(self.width, (3, 3), name="stem")(x)))
        for stage in range(3):
            for block in range(n):
                strides = 2 if stage > 0 and block == 0 else 1
                x = BasicBlock(self.width * 2**stage, strides, conv, norm, self.act)(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn1d": CNN1D,
    "lenet5": LeNet5,
    "resnet": ResNet,
    "resnet20": functools.partial(ResNet, depth=20),
    "resnet56": functools.partial(ResNet, depth=56),
    "resnet110": functools.partial(ResNet, depth=110),
}
MODELS = tuple(_REGISTRY)


def get_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Builds a registered model.

    Args:
        name: one of :data:`MODELS` (``mlp``, ``cnn1d``, ``lenet5``, ``resnet``,
            ``resnet20``, ``resnet56``, ``resnet110``).
        num_classes: number of logits.
        **kwargs: module attributes, e.g. ``widths=(512,)`` or ``width=8``.

    Returns:
        An (unbound) Linen module.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    # JSON configs give lists; modules must stay hashable (jit caches key on them)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    try:
        return _REGISTRY[name](num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise ValueError(f"bad options for model {name!r}: {kwargs} ({e})") from e


def init_variables(model: nn.Module, key: jax.Array, input_shape: Sequence[int]) -> dict:
    """Initialises a model's variables for inputs of shape ``input_shape`` (no batch axis).

    Returns:
        The variables dict: ``{"params": ...}`` plus ``"batch_stats"`` for BatchNorm models.
    """
    variables = model.init(key, jnp.zeros((1, *input_shape), jnp.float32), train=False)
    return jax.tree_util.tree_map(jnp.asarray, dict(variables))


def count_params(variables: dict) -> int:
    """Number of trainable parameters (the ``params`` collection)."""
    return sum(x.size for x in jax.tree_util.tree_leaves(variables["params"]))
