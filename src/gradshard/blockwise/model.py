"""The model a block-wise run trains: the user's sequential model plus one output module per stage but the last.

:class:`BlockwiseModel` registers the user's children under their own names, so its state dict is the user's
model's followed by ``heads.<t>.*`` — the output modules are extra layout slots, and :func:`final_state` (the
state minus the heads) loads into the user's model unchanged. Its forward is the user's model's.

Stage t's coverage (what a client of that stage trained and uploads) is every tensor of the stage's trainable
children — block t and the co-adapted modules before it — and of head t: whole tensors, so in the flat layout a
few contiguous ranges (block t's, and head t's at the end).
"""

from __future__ import annotations

from collections.abc import Mapping
from copy import deepcopy
from typing import Any

from torch import Tensor, nn

from gradshard.blockwise.blocks import BlockSplit, StageModel, output_module, probing, trainable_children
from gradshard.errors import GradshardError

HEADS = "heads"


def last_linear(model: nn.Module) -> nn.Linear | None:
    """The model's last ``nn.Linear`` (its classifier), if any."""
    found = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return found[-1] if found else None


class BlockwiseModel(nn.Module):
    """``body`` (an ``nn.Sequential``) cut by ``split``, with output modules ``heads[t]`` for t < T − 1 built for the
    output of block t on ``sample`` (a batch of inputs; only shapes matter) and, with ``init_from_classifier``,
    starting from the body's classifier where shapes allow (the harmonizer's flow from later blocks)."""

    def __init__(self, body: nn.Sequential, split: BlockSplit, sample: Tensor, *,
                 init_from_classifier: bool = True, later: bool = False) -> None:
        super().__init__()
        if not isinstance(body, nn.Sequential):
            raise GradshardError(f"block-wise training needs an nn.Sequential (its forward is its children in order), "
                                 f"got {type(body).__name__}; wrap the model's stages in nn.Sequential")
        names = [name for name, _ in body.named_children()]
        if HEADS in names:
            raise GradshardError(f"the model has a child named {HEADS!r}, the name block-wise training gives its "
                                 "output modules; rename it")
        if split.bounds[-1] != len(names):
            raise GradshardError(f"the split ends at child {split.bounds[-1]}, the model has {len(names)} children")
        for name, child in body.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "body", body)  # the same modules, not registered twice
        self.split = split
        with probing(body):  # shapes only: no normalisation statistics move
            logits = body(sample)
            if logits.dim() != 2:
                raise GradshardError(f"the model's output must be logits (batch × classes), got shape "
                                     f"{tuple(logits.shape)}")
            classifier = last_linear(body) if init_from_classifier else None
            heads, x = [], sample
            children = list(body.children())
            tail = [children[i] for i in split.children(split.blocks - 1)]
            self.later: list[bool] = []  # which heads are copies of the last block (reloaded from it, see reload)
            for t in range(split.blocks - 1):
                for i in split.children(t):
                    x = children[i](x)
                copy = _tail_copy(tail, x, tuple(logits.shape[1:])) if later else None
                heads.append(copy if copy is not None else output_module(x, int(logits.shape[1]), classifier))
                self.later.append(copy is not None)
        self.heads = nn.ModuleList(heads)
        self.heads.train(body.training)  # copies made while probing were taken in eval mode
        self.classes = int(logits.shape[1])

    body: nn.Sequential

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.body(x)
        return out

    def head(self, t: int) -> nn.Module:
        """Stage t's output module (the last stage's is the model's own output)."""
        return self.heads[t] if t < self.split.blocks - 1 else nn.Identity()

    def reload_head(self, t: int) -> bool:
        """Set head t to the last block's current values if it is a copy of it (NeuLite: output modules start from
        the later blocks); whether it was."""
        if t >= len(self.later) or not self.later[t]:
            return False
        tail = [list(self.body.children())[i] for i in self.split.children(self.split.blocks - 1)]
        self.heads[t].load_state_dict(nn.Sequential(*tail).state_dict())
        return True

    def stage(self, t: int, co_adapt: int) -> StageModel:
        """Stage t over this model (freezes and unfreezes the body's children)."""
        return StageModel(self.body, self.split, t, self.head(t), co_adapt)

    def stage_tensors(self, t: int, co_adapt: int) -> list[str]:
        """The state-dict names stage t trains (trainable children and head t), in state order."""
        children = [name for name, _ in self.body.named_children()]
        prefixes = tuple(f"{children[i]}." for i in trainable_children(self.body, self.split, t, co_adapt))
        if t < self.split.blocks - 1:
            prefixes += (f"{HEADS}.{t}.",)
        return [name for name in self.state_dict() if name.startswith(prefixes)]


def _tail_copy(tail: list[nn.Module], z: Tensor, out_shape: tuple[int, ...]) -> nn.Module | None:
    """A copy of the last block if it maps ``z`` to logits of ``out_shape`` (else None: shapes do not fit)."""
    copy = deepcopy(nn.Sequential(*tail))
    try:
        with probing(copy):
            out = copy(z)
    except (RuntimeError, ValueError):
        return None
    return copy if tuple(out.shape[1:]) == out_shape else None


def final_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """A block-wise model's state without its output modules: the state of the user's model."""
    return {name: value for name, value in state.items() if not name.startswith(f"{HEADS}.")}
