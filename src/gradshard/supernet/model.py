"""The elastic ResNet supernet for small images (8×8 digits), its subnetworks, and how they map onto it.

Shape: a 3×3 stem conv, then stages of residual basic blocks (conv3×3 → GN → ReLU → conv3×3 → GN, plus the
shortcut, then ReLU); the first block of every stage after the first halves the resolution and has a 1×1 conv + GN
projection shortcut, every other block an identity one; global average pooling and a linear classifier.

A subnetwork (:class:`Subnet`) keeps the first ``depth[s]`` blocks of stage ``s``, the leading ``channels[s]``
channels of the stage's residual stream (the stem takes stage 0's) and the leading ``mids[s]`` channels of the
inner layer of each of its blocks (conv1's output, norm1, conv2's input; default: ``channels[s]``). So every
tensor of a subnetwork is a *leading slice* of the supernet's tensor of the same name — a conv weight
``[:out, :in]``, a norm's ``[:C]``, the classifier ``[:, :C]`` — and the tensors of skipped blocks are absent.
That gives, with one rule, (a) extraction (a smaller :class:`ElasticResNet` holding the slices), (b) write-back
(the slices assigned back) and (c) the coverage (tensor name → the slice's shape, what
:mod:`gradshard.core.coverage` takes).

Normalisation is GroupNorm with a fixed number of channels per group (``group_size``), not BatchNorm: it has no
running statistics, so a subnetwork needs no per-subnetwork statistics or recalibration after extraction, every
client trains the same parameters whatever its subnetwork, and a leading channel slice holds whole groups (widths
are multiples of ``group_size``), so the sliced GroupNorm is exactly the subnetwork's own.
``ElasticResNet.forward(x, subnet)`` runs a subnetwork *inside* the supernet by slicing weights on the fly; the
extracted module's plain forward equals it (tested).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class Subnet:
    """Blocks per stage, channels per stage and the blocks' inner channels per stage (None: the stage's channels)
    of one subnetwork (absolute numbers, not multipliers)."""

    depth: tuple[int, ...]
    channels: tuple[int, ...]
    mids: tuple[int, ...] | None = None

    @property
    def inner(self) -> tuple[int, ...]:
        return self.mids if self.mids is not None else self.channels


class _Conv(nn.Module):
    """A bias-free conv whose forward can use the leading ``[:out, :in]`` of its weight."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin, kernel, kernel))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        self.stride, self.padding = stride, kernel // 2

    def forward(self, x: Tensor, cout: int | None = None) -> Tensor:
        w = self.weight if cout is None else self.weight[:cout, : x.shape[1]]
        return F.conv2d(x, w, stride=self.stride, padding=self.padding)


class _Norm(nn.Module):
    """GroupNorm with ``group_size`` channels per group, usable on any leading multiple of them."""

    def __init__(self, channels: int, group_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.group_size = group_size

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        return F.group_norm(x, c // self.group_size, self.weight[:c], self.bias[:c], eps=1e-5)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, mid: int, stride: int, project: bool, group_size: int) -> None:
        super().__init__()
        self.conv1, self.norm1 = _Conv(cin, mid, 3, stride), _Norm(mid, group_size)
        self.conv2, self.norm2 = _Conv(mid, cout, 3, 1), _Norm(cout, group_size)
        self.project = project
        if project:
            self.short_conv, self.short_norm = _Conv(cin, cout, 1, stride), _Norm(cout, group_size)

    def forward(self, x: Tensor, cout: int | None = None, mid: int | None = None) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x, mid)))
        out = self.norm2(self.conv2(out, cout))
        short = self.short_norm(self.short_conv(x, cout)) if self.project else x
        return F.relu(out + short)


class ElasticResNet(nn.Module):
    """The supernet (or, built with smaller ``widths``/``depths``, an extracted subnetwork)."""

    def __init__(self, widths: Sequence[int] = (16, 32, 64), depths: Sequence[int] = (2, 2, 2), classes: int = 10,
                 in_channels: int = 1, group_size: int = 4, mids: Sequence[int] | None = None) -> None:
        super().__init__()
        mids = tuple(mids) if mids is not None else tuple(widths)
        if any(w % group_size for w in (*widths, *mids)):
            raise ValueError(f"widths {list(widths)} and inner widths {list(mids)} must be multiples of group_size "
                             f"{group_size}")
        self.widths, self.depths, self.mids = tuple(widths), tuple(depths), mids
        self.classes, self.in_channels, self.group_size = classes, in_channels, group_size
        self.stem, self.stem_norm = _Conv(in_channels, widths[0], 3, 1), _Norm(widths[0], group_size)
        self.stages = nn.ModuleList()
        cin = widths[0]
        for s, (width, depth, mid) in enumerate(zip(widths, depths, mids, strict=True)):
            blocks = [_Block(cin if b == 0 else width, width, mid, 2 if s > 0 and b == 0 else 1, s > 0 and b == 0,
                             group_size) for b in range(depth)]
            self.stages.append(nn.ModuleList(blocks))
            cin = width
        self.head = nn.Linear(widths[-1], classes)

    @property
    def full(self) -> Subnet:
        return Subnet(self.depths, self.widths, self.mids)

    def forward(self, x: Tensor, subnet: Subnet | None = None) -> Tensor:
        """The supernet's output, or with ``subnet`` that subnetwork's, computed on slices of the weights."""
        sub = subnet or self.full
        check_subnet(self, sub)
        out = F.relu(self.stem_norm(self.stem(x, sub.channels[0])))
        for s, (depth, cout, mid) in enumerate(zip(sub.depth, sub.channels, sub.inner, strict=True)):
            stage = self.stages[s]
            assert isinstance(stage, nn.ModuleList)
            for b in range(depth):
                out = stage[b](out, cout, mid)
        pooled = out.mean(dim=(2, 3))
        return F.linear(pooled, self.head.weight[:, : pooled.shape[1]], self.head.bias)


def check_subnet(net: ElasticResNet, sub: Subnet) -> None:
    def within(values: tuple[int, ...], full: tuple[int, ...]) -> bool:
        return len(values) == len(full) and all(0 < c <= f and c % net.group_size == 0
                                                for c, f in zip(values, full, strict=True))

    if len(sub.depth) != len(net.depths) or not all(
            1 <= d <= full for d, full in zip(sub.depth, net.depths, strict=True)) or not within(
            sub.channels, net.widths) or not within(sub.inner, net.mids):
        raise ValueError(f"{sub} is not a subnetwork of a supernet with depths {list(net.depths)}, widths "
                         f"{list(net.widths)} and inner widths {list(net.mids)} (group size {net.group_size})")


def subnet_of(depth: Sequence[int], width: Sequence[float], widths: Sequence[int],
              inner: Sequence[float] | None = None) -> Subnet:
    """A subnetwork from depths and width multipliers of the supernet's ``widths`` (``inner``: multipliers of the
    blocks' inner width, the full one being the stage's width; None: the same as ``width``)."""
    channels = tuple(round(w * full) for w, full in zip(width, widths, strict=True))
    mids = None if inner is None else tuple(round(w * full) for w, full in zip(inner, widths, strict=True))
    return Subnet(tuple(depth), channels, None if mids == channels else mids)


def _empty_like(net: ElasticResNet, sub: Subnet) -> ElasticResNet:
    return ElasticResNet(sub.channels, sub.depth, net.classes, net.in_channels, net.group_size, sub.inner)


def coverage(net: ElasticResNet, sub: Subnet) -> dict[str, tuple[int, ...]]:
    """Tensor name → the leading extent per dimension the subnetwork holds (skipped blocks' tensors absent)."""
    check_subnet(net, sub)
    with torch.device("meta"):  # shapes only: no memory, no random numbers drawn
        shapes = {name: tuple(t.shape) for name, t in _empty_like(net, sub).state_dict().items()}
    return shapes


def _slices(extent: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(0, e) for e in extent)


def extract(net: ElasticResNet, sub: Subnet) -> ElasticResNet:
    """The subnetwork as a standalone module holding copies of the supernet's leading slices."""
    extents = coverage(net, sub)
    with torch.device("meta"):
        small = _empty_like(net, sub)
    state = net.state_dict()
    small.load_state_dict({name: state[name][_slices(extent)].clone() for name, extent in extents.items()},
                          assign=True)
    return small


def write_back(net: ElasticResNet, small: ElasticResNet) -> dict[str, tuple[int, ...]]:
    """Assign ``small``'s tensors into the leading slices of ``net``'s (in place); the rest of ``net`` is untouched.
    Returns the coverage written."""
    extents = coverage(net, Subnet(small.depths, small.widths, small.mids))
    params = dict(net.state_dict(keep_vars=True))
    trained = small.state_dict()
    with torch.no_grad():
        for name, extent in extents.items():
            params[name][_slices(extent)] = trained[name]
    return extents


def parameters(net: ElasticResNet, sub: Subnet) -> int:
    """Parameters of the subnetwork (the covered elements)."""
    return sum(math.prod(extent) for extent in coverage(net, sub).values())


def macs(net: ElasticResNet, sub: Subnet, image: int = 8) -> int:
    """Multiply-accumulates of one forward pass on an ``image``×``image`` input, counted analytically for the convs
    and the classifier (GroupNorm, ReLU, additions and pooling are left out: under 2 % here)."""
    check_subnet(net, sub)

    def conv(cin: int, cout: int, k: int, side: int) -> int:
        return cin * cout * k * k * side * side

    side, total = image, conv(net.in_channels, sub.channels[0], 3, image)
    cin = sub.channels[0]
    for s, (depth, cout, mid) in enumerate(zip(sub.depth, sub.channels, sub.inner, strict=True)):
        for b in range(depth):
            if s > 0 and b == 0:
                side = -(-side // 2)
                total += conv(cin, cout, 1, side)
            total += conv(cin if b == 0 else cout, mid, 3, side) + conv(mid, cout, 3, side)
        cin = cout
    return total + cin * net.classes


def coverage_of(state: Mapping[str, Tensor], extents: Mapping[str, Sequence[int]]) -> dict[str, Tensor]:
    """The covered slices of a state dict (tests and reports)."""
    return {name: state[name][_slices(extent)] for name, extent in extents.items()}
