"""The ``[blockwise]`` table of a training run: blocks, the stage schedule, the curriculum, the harmonizer, memory.

Pure pydantic (no torch), so :mod:`gradshard.fl.config` can hold it without importing the model. See
docs/blockwise.md for every field's role.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from gradshard.blockwise.schedule import Schedule

StrictFloat = Annotated[float, Field(strict=True)]
#: One value for every stage, or one per stage.
PerStage = StrictFloat | tuple[StrictFloat, ...]


class MemoryTier(BaseModel):
    """A share of the clients (taken in client-id order) whose functions have ``memory_mib`` of memory."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fraction: StrictFloat = Field(gt=0, le=1)
    memory_mib: StrictFloat = Field(gt=0)


class BlockwiseConfig(BaseModel):
    """Block-wise training settings (``[blockwise]``).

    The run's model must be an ``nn.Sequential`` (its forward is its children in order) whose output is the logits.
    ``lambda_x`` / ``lambda_y``: the curriculum mentor's weights of −nHSIC(z_t, X) and −nHSIC(logits, Y) in stage t's
    loss (one value for all stages, or one per stage; 0 and 0 with ``co_adapt = 0`` and ``head_init = "random"`` is
    naive block-wise training). Memory: ``tiers`` and ``budgets_mib`` declare the clients' memory (the cap of their
    functions); a client trains the round's stage if it fits, else the latest earlier stage that fits, else sits out.
    A stage's need is ``stage_memory_mib`` when given, else measured once per run (``stage_memory = "measure"``: one
    profiling invocation per stage on the client executor, its peak resident memory) or estimated
    (``"estimate"``: the analytic :func:`~gradshard.blockwise.blocks.stage_memory_bytes` plus ``baseline_mib``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    blocks: StrictInt = Field(default=4, ge=1, description="blocks T (stages)")
    bounds: tuple[StrictInt, ...] | None = Field(default=None, description="explicit child indices where blocks "
                                                                           "start, ending at the model's children")
    balance: Literal["parameters", "memory"] = Field(default="memory", description="balance blocks by parameters, "
                                                     "or by parameters + activations of one batch")
    schedule: Schedule = "round-robin"
    pace: tuple[StrictInt, ...] | None = Field(default=None, description="pace schedule: rounds per stage")
    lambda_x: PerStage = Field(default=(), description="weights of nHSIC(z_t, X); default 0.1 falling to 0")
    lambda_y: PerStage = Field(default=0.1, description="weights of nHSIC(logits, Y)")
    sigma: StrictFloat = Field(default=5.0, gt=0, description="Gaussian kernel width of nHSIC")
    co_adapt: StrictInt = Field(default=1, ge=0, description="trainable modules of the previous block (harmonizer)")
    head_init: Literal["classifier", "random", "later"] = Field(
        default="classifier", description="classifier: pooled linear output modules starting from the model's "
                                          "classifier; later: copies of the last block, reloaded from it whenever "
                                          "their stage trains (NeuLite's output modules); random")
    weighting: Literal["examples", "uniform"] = Field(default="examples", description="examples: the paper's text; "
                                                      "uniform: its code")
    tiers: tuple[MemoryTier, ...] = ()
    budgets_mib: dict[str, StrictFloat] = Field(default_factory=dict, description="client -> memory (over tiers)")
    stage_memory: Literal["measure", "estimate"] = "measure"
    stage_memory_mib: tuple[StrictFloat, ...] | None = None
    baseline_mib: StrictFloat = Field(default=0.0, ge=0, description="estimate: the function's memory before "
                                                                     "training (interpreter, torch, data)")
    margin: StrictFloat = Field(default=0.1, ge=0, description="measured or estimated needs are raised by this "
                                                               "fraction (a real round reads data the probe does not)")
    probe_batch: StrictInt = Field(default=0, ge=0, description="examples per batch when measuring (0: the run's "
                                                                "batch_size)")

    @model_validator(mode="after")
    def _consistent(self) -> BlockwiseConfig:
        t = self.stages
        for name in ("lambda_x", "lambda_y"):
            value = getattr(self, name)
            if isinstance(value, tuple) and value and len(value) != t:
                raise ValueError(f"{name} gives {len(value)} values for {t} stages; give one or one per stage")
            values = value if isinstance(value, tuple) else (value,)
            if not all(v >= 0 for v in values):
                raise ValueError(f"{name} must be >= 0 (the loss subtracts λ·nHSIC), got {list(values)}")
        if self.pace is not None and (self.schedule != "pace" or len(self.pace) != t or min(self.pace) < 1):
            raise ValueError(f"pace must give {t} positive round counts, with schedule = 'pace'")
        if self.stage_memory_mib is not None and (len(self.stage_memory_mib) != t or min(self.stage_memory_mib) <= 0):
            raise ValueError(f"stage_memory_mib must give {t} positive values, one per stage")
        if self.tiers and abs(sum(tier.fraction for tier in self.tiers) - 1.0) > 1e-9:
            raise ValueError(f"the tiers' fractions must add up to 1, got {sum(tier.fraction for tier in self.tiers)}")
        bad = {c: v for c, v in self.budgets_mib.items() if not v > 0}
        if bad:
            raise ValueError(f"budgets_mib must be > 0, got {bad}")
        return self

    @property
    def stages(self) -> int:
        return len(self.bounds) - 1 if self.bounds is not None else self.blocks

    def lambdas(self, t: int) -> tuple[float, float]:
        """``(λ₁ᵗ, λ₂ᵗ)`` of stage t."""
        return _at(self.lambda_x, t, self.stages, default_x=True), _at(self.lambda_y, t, self.stages)

    def budgets(self, clients: list[str]) -> dict[str, float]:
        """Client -> memory in MiB for the clients that declare one (tiers in client order, then ``budgets_mib``)."""
        out: dict[str, float] = {}
        start = 0.0
        for tier in self.tiers:
            stop = start + tier.fraction * len(clients)
            for client in clients[round(start) : round(stop)]:
                out[client] = tier.memory_mib
            start = stop
        out.update({c: v for c, v in self.budgets_mib.items() if c in clients})
        return out


def _at(value: float | tuple[float, ...], t: int, stages: int, default_x: bool = False) -> float:
    if isinstance(value, tuple):
        if value:
            return float(value[t])
        if default_x:  # the default curriculum: λ₁ from 0.1 at the first stage to 0 at the last
            return 0.1 * (1 - t / (stages - 1)) if stages > 1 else 0.0
        return 0.0
    return float(value)
