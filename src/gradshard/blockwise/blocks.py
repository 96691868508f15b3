"""Blocks and stages of a sequential model: stage t trains block t and a small output module, earlier blocks frozen.

A model is an ``nn.Sequential`` (any model whose forward is its children in order). :func:`split_sequential` cuts
its children into T contiguous blocks, balanced by parameter count unless the boundaries are given. Stage t's
:class:`StageModel` runs blocks 0..t−1 under ``torch.no_grad()`` — so their activations are never kept for the
backward pass, which is where a client's peak training memory goes — then block t and the stage's output module
(a pooled linear head from block t's output to the classes). The *training harmonizer* keeps the last
``co_adapt`` trainable modules of block t−1 trainable too (they run with gradients), so neighbouring blocks adapt
to each other, and output modules are initialised from the model's own final classifier where shapes allow.

In the flat layout (the model's state dict order), block t's parameters are one contiguous element range — the
only range a stage's clients upload and the shard plan covers (:func:`active_range`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gradshard.errors import GradshardError

if TYPE_CHECKING:
    from torch import Tensor, nn

    from gradshard.core.layout import ModelLayout


@dataclass(frozen=True)
class BlockSplit:
    """Block t is ``children[bounds[t] : bounds[t + 1]]`` of the sequential model."""

    bounds: tuple[int, ...]

    def __post_init__(self) -> None:
        b = self.bounds
        if len(b) < 2 or b[0] != 0 or any(x >= y for x, y in itertools.pairwise(b)):
            raise GradshardError(f"block bounds must start at 0 and increase strictly, got {list(b)}")

    @property
    def blocks(self) -> int:
        return len(self.bounds) - 1

    def children(self, t: int) -> range:
        if not 0 <= t < self.blocks:
            raise GradshardError(f"block {t} does not exist: the split has {self.blocks} blocks")
        return range(self.bounds[t], self.bounds[t + 1])


def _children(model: nn.Module) -> list[nn.Module]:
    from torch import nn

    if not isinstance(model, nn.Sequential):
        raise GradshardError(f"block-wise training needs an nn.Sequential (its forward is its children in order), got "
                             f"{type(model).__name__}; wrap the model's stages in nn.Sequential")
    return list(model.children())


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def split_sequential(model: nn.Module, blocks: int | Sequence[int], sizes: Sequence[float] | None = None
                     ) -> BlockSplit:
    """Cut ``model``'s children into ``blocks`` contiguous blocks of about equal size — parameter counts, or the
    given per-child ``sizes`` (e.g. parameters plus activations, :func:`child_sizes`: what a stage's memory is) —
    each holding at least one child with parameters; or at the given child indices (``[0, 2, 5, 7]``: three)."""
    children = _children(model)
    if not isinstance(blocks, int):
        split = BlockSplit(tuple(blocks))
        if split.bounds[-1] != len(children):
            raise GradshardError(f"block bounds must end at the model's {len(children)} children, got "
                                 f"{list(split.bounds)}")
        return split
    counts = [_param_count(c) for c in children]
    weights = list(sizes) if sizes is not None else [float(n) for n in counts]
    if len(weights) != len(children) or not all(w >= 0 for w in weights):
        raise GradshardError(f"sizes must give {len(children)} values >= 0, one per child")
    heavy = sum(1 for n in counts if n > 0)
    if not 1 <= blocks <= heavy:
        raise GradshardError(f"cannot cut {heavy} children with parameters into {blocks} blocks")
    total = sum(weights)
    bounds, seen, heavy_after = [0], 0.0, heavy
    for i, n in enumerate(counts):
        seen += weights[i]
        heavy_after -= n > 0
        later_blocks = blocks - len(bounds)  # blocks that must still start after this one
        if later_blocks and n > 0 and heavy_after >= later_blocks and (
                seen >= total * len(bounds) / blocks or heavy_after == later_blocks):
            bounds.append(i + 1)
    bounds.append(len(children))
    return BlockSplit(tuple(bounds))


@contextmanager
def probing(module: nn.Module) -> Iterator[None]:
    """Run ``module`` for its shapes only: no autograd, eval mode (so normalisation statistics do not move), then
    every submodule's training flag as it was."""
    import torch

    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


def child_sizes(model: nn.Module, batch: Tensor) -> list[float]:
    """Per child: its parameters plus the elements of its output for ``batch`` (what training it keeps)."""
    sizes = []
    with probing(model):
        x = batch
        for child in _children(model):
            x = child(x)
            sizes.append(float(_param_count(child) + x.numel()))
    return sizes


def block_parameter_names(model: nn.Module, split: BlockSplit, t: int) -> list[str]:
    """The state-dict names of block t's parameters and floating buffers, in the model's order."""
    prefixes = tuple(f"{i}." for i in split.children(t))
    return [name for name in model.state_dict() if name.startswith(prefixes)]


def active_range(layout: ModelLayout, names: Sequence[str]) -> tuple[int, int]:
    """The flat element range ``[lo, hi)`` of the named tensors of ``layout``; they must be contiguous in it."""
    slots = {slot.spec.name: slot for slot in layout.slots}
    wanted = [slots[n] for n in names if n in slots]
    if not wanted:
        raise GradshardError("the block has no tensors in the aggregated layout")
    wanted.sort(key=lambda s: s.start)
    for a, b in itertools.pairwise(wanted):
        if a.stop != b.start:
            raise GradshardError(f"the block's tensors are not contiguous in the layout ({a.spec.name} ends at "
                                 f"{a.stop}, {b.spec.name} starts at {b.start})")
    return wanted[0].start, wanted[-1].stop


def output_module(block_output: Tensor, classes: int, classifier: nn.Module | None = None) -> nn.Module:
    """A head from block t's output to ``classes`` logits: global average pooling for feature maps, then one linear
    layer, initialised from ``classifier`` (the model's last linear layer) when its input size matches."""
    from torch import nn

    features = block_output.shape[1] if block_output.dim() > 2 else block_output[0].numel()
    layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()] if block_output.dim() == 4 else [nn.Flatten()]
    linear = nn.Linear(features, classes)
    if isinstance(classifier, nn.Linear) and classifier.weight.shape == linear.weight.shape:
        linear.load_state_dict(classifier.state_dict())  # information flows back from the later block
    return nn.Sequential(*layers, linear)


def trainable_children(model: nn.Module, split: BlockSplit, t: int, co_adapt: int = 1) -> range:
    """The children stage t trains: block t and the last ``co_adapt`` children with parameters before it."""
    children = _children(model)
    block = split.children(t)
    before = [i for i in range(block.start) if _param_count(children[i]) > 0][-co_adapt:] \
        if co_adapt > 0 and t > 0 else []
    return range(min([block.start, *before]), block.stop)


class StageModel:
    """Stage t of a sequential model: frozen prefix, trainable block t (+ ``co_adapt`` modules before it), head."""

    def __init__(self, model: nn.Module, split: BlockSplit, t: int, head: nn.Module, co_adapt: int = 1) -> None:
        children = _children(model)
        self.split, self.t, self.head = split, t, head
        block = split.children(t)
        self.children = trainable_children(model, split, t, co_adapt)
        first = self.children.start
        self.frozen = children[:first]
        self.trainable = children[first : block.stop]
        for module in self.frozen:
            module.requires_grad_(False)
        for module in self.trainable:
            module.requires_grad_(True)
        for module in children[block.stop :]:
            module.requires_grad_(False)

    def parameters(self) -> list[nn.Parameter]:
        """What the stage's optimizer updates: the trainable modules and the head."""
        params = [p for m in self.trainable for p in m.parameters()]
        return params + list(self.head.parameters())

    def features(self, x: Tensor) -> Tensor:
        """Block t's output z_t (the prefix runs without autograd: its activations are not kept)."""
        import torch

        with torch.no_grad():
            for module in self.frozen:
                x = module(x)
        for module in self.trainable:
            x = module(x)
        return x

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(z_t, logits)`` of a batch."""
        z = self.features(x)
        return z, self.head(z)


def stage_loss(logits: Tensor, y: Tensor, z: Tensor, x: Tensor, classes: int, lambda_x: float, lambda_y: float,
               sigma: float | None = 5.0, criterion: Callable[[Tensor, Tensor], Tensor] | None = None) -> Tensor:
    """The curriculum mentor's loss ``CE(out(z_t), y) − λ₁·nHSIC(z_t, X) − λ₂·nHSIC(logits, Y)`` (``criterion``
    replaces the cross-entropy: a task's own loss)."""
    import torch

    from gradshard.blockwise.hsic import nhsic, one_hot

    loss = (criterion or torch.nn.functional.cross_entropy)(logits, y)
    if lambda_x:
        loss = loss - lambda_x * nhsic(z, x, sigma)
    if lambda_y:
        loss = loss - lambda_y * nhsic(logits, one_hot(y, classes), sigma)
    return loss


def stage_memory_bytes(model: nn.Module, split: BlockSplit, t: int, batch: Tensor, classes: int,
                       optimizer_slots: int = 1, co_adapt: int = 1) -> int:
    """An estimate of stage t's training memory for ``batch``: every parameter (4 bytes each), gradients and
    ``optimizer_slots`` states of the trainable ones, and the activations autograd keeps — the outputs of the
    trainable modules and the head for the batch (the frozen prefix keeps none). Measured peaks are in the docs."""
    children = _children(model)
    all_params = _param_count(model)
    trained = trainable_children(model, split, t, co_adapt)
    with probing(model):
        x = batch
        kept = 0
        for i, module in enumerate(children[: trained.stop]):
            x = module(x)
            if i >= trained.start:
                kept += x.numel()
    head_params = x[0].numel() * classes + classes
    trainable = sum(_param_count(children[i]) for i in trained)
    return 4 * (all_params + (1 + optimizer_slots) * (trainable + head_params) + 2 * kept + math.prod(batch.shape))
