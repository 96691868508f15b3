"""The ``[supernet]`` table of a training run: the supernet's shape, its subnetworks and how rounds use them.

Pure pydantic (no torch), so :mod:`gradshard.fl.config` can hold it without importing the model.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

StrictFloat = Annotated[float, Field(strict=True)]
Policy = Literal["sandwich", "static", "random"]
SupernetWeighting = Literal["beta", "uniform", "examples"]


class SubnetSpec(BaseModel):
    """One subnetwork: the first ``depth[s]`` blocks of stage ``s``, the leading ``width[s]`` share of its channels
    (the stem takes stage 0's width) and the leading ``inner[s]`` share of its blocks' inner layer (conv1's output;
    default: ``width``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    depth: tuple[StrictInt, ...]
    width: tuple[StrictFloat, ...]
    inner: tuple[StrictFloat, ...] | None = None

    @property
    def label(self) -> str:
        def short(values: tuple[float, ...]) -> str:
            return "/".join(f"{w:g}" for w in (values[:1] if len(set(values)) == 1 else values))

        inner = f"-i{short(self.inner)}" if self.inner is not None and self.inner != self.width else ""
        return "d" + "".join(str(d) for d in self.depth) + "-w" + short(self.width) + inner


#: Named families: ``"corners4"`` (4 subnetworks from the smallest to the full net) and ``"grid9"`` (depth 1..3
#: by width 0.25/0.5/1.0 of a depth-3 supernet, SuperFed's k = 9 shape).
FAMILIES: dict[str, tuple[SubnetSpec, ...]] = {
    "corners4": (SubnetSpec(depth=(1, 1, 1), width=(0.25, 0.25, 0.25)),
                 SubnetSpec(depth=(1, 1, 1), width=(0.5, 0.5, 0.5)),
                 SubnetSpec(depth=(2, 2, 2), width=(0.5, 0.5, 0.5)),
                 SubnetSpec(depth=(2, 2, 2), width=(1.0, 1.0, 1.0))),
    "grid9": tuple(SubnetSpec(depth=(d, d, d), width=(w, w, w)) for d in (1, 2, 3) for w in (0.25, 0.5, 1.0)),
}


class SupernetConfig(BaseModel):
    """SuperFed settings (``[supernet]``); see docs/superfed.md for every field's role.

    ``weighting``: ``beta`` gives the clients that train the largest subnetwork a total weight β (the rest 1 − β),
    β going from ``beta_start`` to ``beta_end`` over the first ``beta_share`` of the rounds (``schedule`` cosine or
    linear) and staying there; ``uniform`` and ``examples`` are FedAvg's weights. Every weighting aggregates with
    ``coverage-mean``: an element is averaged over the clients whose subnetwork holds it, others keep their value.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    widths: tuple[StrictInt, ...] = Field(default=(16, 32, 64), description="full channels per stage")
    depths: tuple[StrictInt, ...] = Field(default=(2, 2, 2), description="full residual blocks per stage")
    group_size: StrictInt = Field(default=4, ge=1, description="GroupNorm channels per group")
    family: Literal["corners4", "grid9", ""] = Field(default="corners4", description="named subnetworks (or '')")
    subnets: tuple[SubnetSpec, ...] = Field(default=(), description="explicit subnetworks (replace family)")
    policy: Policy = "sandwich"
    sandwich_clients: StrictInt = Field(default=1, ge=1, description="sandwich: clients per round given the "
                                                                     "largest (and as many the smallest)")
    weighting: SupernetWeighting = "beta"
    beta_start: StrictFloat = Field(default=0.9, gt=0, lt=1)
    beta_end: StrictFloat = Field(default=0.125, gt=0, lt=1)
    beta_share: StrictFloat = Field(default=0.8, gt=0, le=1, description="share of the rounds β decays over")
    schedule: Literal["cosine", "linear"] = "cosine"
    evaluate: tuple[StrictInt, ...] | None = Field(default=None, description="indices of the subnetworks to "
                                                                             "evaluate every round (None: all)")

    @model_validator(mode="after")
    def _consistent(self) -> SupernetConfig:
        if len(self.widths) != len(self.depths) or not self.widths:
            raise ValueError(f"widths {list(self.widths)} and depths {list(self.depths)} must name the same stages")
        if not self.subnets and not self.family:
            raise ValueError("give subnets or a family")
        for i, sub in enumerate(self.family_specs()):
            inner = sub.inner if sub.inner is not None else sub.width
            if len(sub.depth) != len(self.depths) or len(sub.width) != len(self.widths) or len(inner) != len(
                    self.widths):
                raise ValueError(f"subnet {i} ({sub.label}) must give a depth and a width (and inner width, if "
                                 f"any) per stage ({len(self.depths)} stages)")
            for s, (d, w, m) in enumerate(zip(sub.depth, sub.width, inner, strict=True)):
                if not 1 <= d <= self.depths[s]:
                    raise ValueError(f"subnet {i} ({sub.label}): depth {d} of stage {s} is not in 1..{self.depths[s]}")
                for what, share in (("width", w), ("inner width", m)):
                    channels = share * self.widths[s]
                    if not 0 < share <= 1 or channels != int(channels) or int(channels) % self.group_size:
                        raise ValueError(f"subnet {i} ({sub.label}): {what} {share} of stage {s} gives "
                                         f"{channels:g} of {self.widths[s]} channels, not a whole multiple of "
                                         f"group_size {self.group_size}")
        if self.evaluate is not None and not all(0 <= i < len(self.family_specs()) for i in self.evaluate):
            raise ValueError(f"evaluate {list(self.evaluate)} names subnets outside 0..{len(self.family_specs()) - 1}")
        return self

    def family_specs(self) -> tuple[SubnetSpec, ...]:
        """The subnetworks, in the order given (``subnets``, else the named ``family``)."""
        return self.subnets or FAMILIES[self.family]
