"""PyTorch models for federated training, and the bridge between their state and gradshard's flat vectors.

The models' ``state_dict()`` layouts are *exactly* the in-code layouts of :mod:`gradshard.core.zoo` (names, order,
shapes, dtypes), so an update produced by training here fits a round opened with ``get_layout(name)``:

- ``mlp``: :class:`MLP` 64-128-10 for digits, layout ``zoo.mlp()``;
- ``cnn``: :class:`SmallCNN` for 1x8x8 digits, 38,282 parameters (no zoo layout; use :func:`layout_of`);
- ``resnet18``: :class:`ResNet18` with the CIFAR stem, 11.2 M parameters, layout ``zoo.resnet18_cifar()``;
- ``vgg16``: :class:`VGG16`, 134.3 M parameters, layout ``zoo.vgg16()``.

:func:`state_to_numpy` and :func:`load_numpy_state` move a model's state to and from numpy arrays, which
``ModelLayout.flatten`` / ``unflatten`` turn into the flat update vector.

Reproducibility: :func:`seed_everything` seeds Python, numpy and torch. On CPU, training is bit-reproducible
when, in addition, deterministic kernels are enforced (``torch.use_deterministic_algorithms(True)``) and the
intra-op thread count is fixed (``torch.set_num_threads(1)``: reductions split across threads may add in a
different order); :func:`deterministic_torch` does both for the duration of a ``with`` block.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from itertools import pairwise
from typing import Any

import numpy as np
import numpy.typing as npt

from gradshard.core.layout import ModelLayout, as_numpy
from gradshard.errors import LayoutError
from gradshard.extras import missing_extra_error

try:
    import torch
    from torch import Tensor, nn
except ModuleNotFoundError as exc:  # the train extra: name it instead of a bare "No module named 'torch'"
    raise missing_extra_error("train", "gradshard.fl (federated training)") from exc

# torchvision vgg16 ("D" config): output channels per conv, "M" for a max-pool.
_VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip
_RESNET18_STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))  # (channels, stride of the first block)


# --- small models for digits ------------------------------------------------------------------------------
class MLP(nn.Module):
    """Fully connected layers ``layers.{i}`` with ReLU between them; inputs of any shape are flattened.

    The state layout equals ``gradshard.core.zoo.mlp(sizes=sizes)``.
    """

    def __init__(self, sizes: Sequence[int] = (64, 128, 10)) -> None:
        super().__init__()
        if len(sizes) < 2 or any(s < 1 for s in sizes):
            raise LayoutError(f"an MLP needs at least two positive layer sizes, got {tuple(sizes)}")
        self.sizes = tuple(int(s) for s in sizes)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in pairwise(self.sizes))

    def forward(self, x: Tensor) -> Tensor:
        out = x.flatten(1)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            out = layer(out)
            if i < last:
                out = torch.relu(out)
        return out


class SmallCNN(nn.Module):
    """Two 3x3 convolutions (16, 32 channels), a 2x2 max-pool and two linear layers: 38,282 parameters on digits.

    Takes ``(n, in_channels, image_size, image_size)`` images or the same pixels flattened to ``(n, features)``.
    """

    def __init__(self, num_classes: int = 10, *, in_channels: int = 1, image_size: int = 8) -> None:
        super().__init__()
        if image_size < 2 or image_size % 2:
            raise LayoutError(f"SmallCNN needs an even image_size >= 2, got {image_size}")
        self.in_channels, self.image_size = in_channels, image_size
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * (image_size // 2) ** 2, 64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            x = x.view(-1, self.in_channels, self.image_size, self.image_size)
        out = self.pool(torch.relu(self.conv2(torch.relu(self.conv1(x)))))
        out = torch.relu(self.fc1(out.flatten(1)))
        logits: Tensor = self.fc2(out)
        return logits


def convnet(num_classes: int = 10, *, in_channels: int = 1, image_size: int = 8, width: int = 32,
            stages: int = 4, groups: int = 4) -> nn.Sequential:
    """A VGG-style ``nn.Sequential`` (the shape block-wise training splits): ``stages`` of a 3x3 convolution,
    GroupNorm (``groups`` groups: no running statistics, so every tensor is a parameter) and ReLU, ``width`` channels
    throughout, a 2x2 max-pool after each stage while the side is still >= 4, then global average pooling and one
    linear classifier. Every stage's pooled output has ``width`` features, so every block-wise output module can
    start from the classifier. 28,650 parameters on digits (8x8, 10 classes)."""
    if image_size < 1 or stages < 1 or width < 1 or groups < 1 or width % groups:
        raise LayoutError(f"convnet needs image_size, stages, width >= 1 and width divisible by groups, got "
                          f"{image_size}, {stages}, {width}, {groups}")
    layers: list[nn.Module] = []
    channels, side = in_channels, image_size
    for _ in range(stages):
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(groups, width), nn.ReLU()]
        if side >= 4:
            layers.append(nn.MaxPool2d(2))
            side //= 2
        channels = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


# --- ResNet-18 (CIFAR) ------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: two 3x3 conv+BN, plus a 1x1 conv+BN shortcut when the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        result: Tensor = self.relu(out + identity)
        return result


class ResNet18(nn.Module):
    """torchvision ResNet-18 with the CIFAR stem (3x3 stride-1 ``conv1``, no max-pool) for 32x32 images.

    Same module names as torchvision, so the state layout equals ``gradshard.core.zoo.resnet18_cifar()``.
    """

    def __init__(self, num_classes: int = 10, *, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        in_ch = 64
        for index, (out_ch, stride) in enumerate(_RESNET18_STAGES, start=1):
            blocks = nn.Sequential(BasicBlock(in_ch, out_ch, stride), BasicBlock(out_ch, out_ch))
            self.add_module(f"layer{index}", blocks)
            in_ch = out_ch
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        _init_like_torchvision(self, linear_std=None)  # torchvision keeps the default init of ResNet's fc

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        for index in range(1, len(_RESNET18_STAGES) + 1):
            out = getattr(self, f"layer{index}")(out)
        logits: Tensor = self.fc(torch.flatten(self.avgpool(out), 1))
        return logits


# --- VGG-16 -------------------------------------------------------------------------------------------------
class VGG16(nn.Module):
    """torchvision VGG-16 without BatchNorm: ``features`` (13 convs), ``avgpool`` to 7x7, ``classifier``.

    Same module indices as torchvision, so the state layout equals ``gradshard.core.zoo.vgg16()``; 134.3 M
    parameters (537 MB as float32) for 10 classes.
    """

    def __init__(self, num_classes: int = 10, *, in_channels: int = 3, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = _vgg_features(in_channels)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(4096, num_classes),
        )  # fmt: skip
        _init_like_torchvision(self, linear_std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))
        return logits


def _vgg_features(in_channels: int) -> nn.Sequential:
    """Conv(3x3, pad 1) + ReLU per channel count, MaxPool(2) per "M": torchvision's indices 0..30."""
    layers: list[nn.Module] = []
    for item in _VGG16_CFG:
        if isinstance(item, str):
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, item, 3, padding=1), nn.ReLU(inplace=True)]
            in_channels = item
    return nn.Sequential(*layers)


def _init_like_torchvision(model: nn.Module, *, linear_std: float | None) -> None:
    """torchvision's initialisation: Kaiming-normal convs, BN at (1, 0), linear N(0, linear_std²) with zero bias.

    ``linear_std=None`` keeps PyTorch's default for linear layers (what torchvision does for ResNet).
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and linear_std is not None:
            nn.init.normal_(module.weight, 0.0, linear_std)
            nn.init.zeros_(module.bias)


# --- registry -----------------------------------------------------------------------------------------------
def _mlp(num_classes: int = 10, *, in_features: int = 64, hidden: Sequence[int] = (128,)) -> MLP:
    """An :class:`MLP` from ``in_features`` through ``hidden`` to ``num_classes``."""
    return MLP((in_features, *hidden, num_classes))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": _mlp,
    "cnn": SmallCNN,
    "convnet": convnet,
    "resnet18": ResNet18,
    "vgg16": VGG16,
}


def build_model(name: str, num_classes: int = 10, **options: Any) -> nn.Module:
    """A fresh model registered as ``name`` in :data:`MODELS`; ``options`` go to its constructor.

    E.g. ``build_model("mlp", 4, in_features=20)`` for ``make_synthetic(features=20, classes=4)``.
    """
    try:
        factory = MODELS[name]
    except KeyError:
        raise LayoutError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}") from None
    return factory(num_classes=num_classes, **options)


def layout_of(model: nn.Module) -> ModelLayout:
    """The :class:`ModelLayout` of ``model.state_dict()`` (parameters and buffers, in state order)."""
    return ModelLayout.from_module(model)


# --- state <-> numpy ----------------------------------------------------------------------------------------
def state_to_numpy(model: nn.Module) -> dict[str, npt.NDArray[Any]]:
    """A copy of ``model.state_dict()`` as numpy arrays, in state order; bfloat16 tensors widened (exactly) to float32.

    Copied, because ``Tensor.numpy()`` shares memory: later optimiser steps would otherwise change the snapshot.
    """
    return {name: np.array(as_numpy(name, t), copy=True) for name, t in model.state_dict().items()}


def load_numpy_state(model: nn.Module, arrays: Mapping[str, npt.ArrayLike]) -> None:
    """Copy numpy ``arrays`` into ``model``'s parameters and buffers (strict).

    Every tensor of the model must be given, with its exact shape, and nothing else; floating arrays are cast to
    the tensor's float dtype (an aggregate may be float64), integer buffers need integer arrays. Raises
    :class:`LayoutError` naming the first tensor that does not fit, before anything is changed.
    """
    layout = layout_of(model)
    given = {name: np.asarray(value) for name, value in arrays.items()}
    layout.check_arrays(given)
    tensors = {spec.name: _tensor_for(spec.name, given[spec.name], spec.dtype) for spec in layout}
    model.load_state_dict(tensors, strict=True)


def _tensor_for(name: str, array: npt.NDArray[Any], dtype: str) -> Tensor:
    """``array`` as a tensor of ``dtype``; bfloat16 is narrowed by torch (round to nearest even) from float32."""
    if dtype == "bfloat16":
        return torch.from_numpy(_cast_for(name, array, "float32")).to(torch.bfloat16)
    return torch.from_numpy(_cast_for(name, array, dtype))


def _cast_for(name: str, array: npt.NDArray[Any], dtype: str) -> npt.NDArray[Any]:
    """``array`` as ``dtype`` (contiguous, writable: what ``torch.from_numpy`` accepts without warnings)."""
    target = np.dtype(dtype)
    if array.dtype.kind != target.kind and {array.dtype.kind, target.kind} != {"i", "u"}:
        raise LayoutError(f"tensor {name!r} is {array.dtype} but the model holds {target}")
    return np.require(array, dtype=target, requirements=["C", "W"])


# --- reproducibility ----------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy's global generator and torch (initialisation, dropout, shuffling)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic_torch(threads: int = 1) -> Iterator[None]:
    """Within the block: deterministic torch kernels and ``threads`` intra-op threads; restored afterwards.

    With the same seed, data order and thread count, CPU training inside the block is bit-reproducible.
    """
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    previous_threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.set_num_threads(previous_threads)
