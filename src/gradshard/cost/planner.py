"""Choose architecture, M, function memory and object layout for a model; find crossovers; sweep model sizes.

Everything here is the analytic model of :mod:`gradshard.cost.model` (memory rule, latency model, prices) evaluated
over the alternatives: no function runs.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from gradshard.cost.model import (
    MB,
    MEMORY_CAPS_MB,
    OBJECT_LAYOUTS,
    PAPER_LATENCY,
    PAPER_MEMORY_RULE,
    CostOptions,
    Feasibility,
    LatencyModel,
    MemoryRule,
    ObjectLayout,
    RoundCost,
    check_feasible,
    predict_cost,
    shape_for,
)
from gradshard.cost.pricing import AWS_LAMBDA_X86, PriceSheet
from gradshard.extras import require_extra
from gradshard.topology.names import TOPOLOGIES, Topology

# Lambda's default concurrency per account and region: more shard functions than this queue up.
DEFAULT_MAX_SHARDS = 1000
SWEEP_FILES = {"csv": "cost_vs_model_size.csv", "json": "cost_vs_model_size.json", "png": "cost_vs_model_size.png"}


class CostModel(BaseModel):
    """The assumptions every prediction shares: prices, latency, memory rule, fees, header reads."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prices: PriceSheet = AWS_LAMBDA_X86
    latency: LatencyModel = PAPER_LATENCY
    memory_rule: MemoryRule = PAPER_MEMORY_RULE
    count_request_fees: bool = False
    header_gets: int = Field(default=2, ge=0)

    def predict(self, arch: Topology, clients: int, shards: int, model_mb: float,
                layout: ObjectLayout) -> RoundCost:
        options = CostOptions(layout=layout, prices=self.prices, count_request_fees=self.count_request_fees,
                              header_gets=self.header_gets)
        return predict_cost(shape_for(arch, clients, shards), model_mb, options, self.latency, self.memory_rule)


class PlanRequest(BaseModel):
    """What to plan for: a model of ``params`` parameters, N clients, a per-function cap, an optional deadline."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    params: float = Field(gt=0)
    clients: int = Field(ge=1)
    memory_limit_mb: int = Field(default=MEMORY_CAPS_MB["aws-max"], gt=0)
    deadline_s: float | None = Field(default=None, gt=0)
    bytes_per_param: int = Field(default=4, ge=1)
    max_shards: int = Field(default=DEFAULT_MAX_SHARDS, ge=1)
    model: CostModel = CostModel()

    @property
    def model_mb(self) -> float:
        return self.params * self.bytes_per_param / MB


@dataclass(frozen=True)
class Candidate:
    """One alternative: its predicted cost and latency and whether it fits the cap, the platform and the deadline."""

    cost: RoundCost
    feasibility: Feasibility

    @property
    def per_1000_total(self) -> float:
        return self.cost.per_1000_rounds.total

    def to_dict(self) -> dict[str, Any]:
        c = self.cost
        return {"arch": c.shape.arch, "layout": c.options.layout, "shards": c.shape.shards,
                "invocations": len(c.shape.aggregators), "memory_mb": c.memory_mb, "latency_s": c.latency_s,
                "longest_function_s": max(c.durations_s), "feasible": self.feasibility.feasible,
                "reason": self.feasibility.reason, "per_round": c.per_round.to_dict(),
                "per_1000_rounds": c.per_1000_rounds.to_dict()}


@dataclass(frozen=True)
class Recommendation:
    """The cheapest feasible alternative (None if nothing fits) and every alternative considered."""

    request: PlanRequest
    best: Candidate | None
    alternatives: tuple[Candidate, ...]

    def to_dict(self) -> dict[str, Any]:
        request = self.request.model_dump(mode="json", exclude={"model"})
        return {"request": {**request, "model_mb": self.request.model_mb, "prices": self.request.model.prices.name},
                "recommended": self.best.to_dict() if self.best else None,
                "alternatives": [c.to_dict() for c in self.alternatives]}


def evaluate(request: PlanRequest, arch: Topology, layout: ObjectLayout, shards: int = 1) -> Candidate:
    """Predict one alternative and check it against the cap, the platform's time limit and the deadline."""
    cost = request.model.predict(arch, request.clients, shards, request.model_mb, layout)
    fits = check_feasible(cost.memory_mb, max(cost.durations_s), request.memory_limit_mb, request.model.prices)
    if fits.feasible and request.deadline_s is not None and cost.latency_s > request.deadline_s:
        fits = Feasibility(False, f"round takes {cost.latency_s:,.0f} s > {request.deadline_s:,.0f} s deadline")
    return Candidate(cost, fits)


def shard_counts(max_shards: int) -> list[int]:
    """The M tried: every M up to 64, then about 80 geometric steps (under 5 % apart) up to ``max_shards``."""
    steps = np.geomspace(64, max(64, max_shards), 80).round().astype(int)
    return sorted({*range(1, min(64, max_shards) + 1), *(int(m) for m in steps if m <= max_shards)})


def best_shards(request: PlanRequest, layout: ObjectLayout) -> Candidate:
    """GradsSharding's cheapest feasible M of :func:`shard_counts` (ties: the faster), or the largest M tried
    when none is feasible (the least memory and the shortest round)."""
    candidates = [evaluate(request, "sharded", layout, m) for m in shard_counts(request.max_shards)]
    feasible = [c for c in candidates if c.feasibility.feasible]
    if not feasible:
        return candidates[-1]
    return min(feasible, key=lambda c: (c.per_1000_total, c.cost.latency_s))


def recommend(request: PlanRequest) -> Recommendation:
    """GradsSharding at its best M in each layout, and λ-FL, LIFL and flat (whose requests are the same in both
    layouts: one object per client); the cheapest feasible one is recommended."""
    alternatives = [best_shards(request, layout) for layout in OBJECT_LAYOUTS]
    alternatives += [evaluate(request, arch, "paper") for arch in TOPOLOGIES if arch != "sharded"]
    alternatives.sort(key=lambda c: (not c.feasibility.feasible, c.per_1000_total, c.cost.latency_s))
    best = alternatives[0] if alternatives[0].feasibility.feasible else None
    return Recommendation(request, best, tuple(alternatives))


def crossover_mb(clients: int, shards: int, layout: ObjectLayout = "paper", other: Topology = "lambda-fl",
                 model: CostModel | None = None, lo_mb: float = 1.0, hi_mb: float = 100_000.0) -> float | None:
    """The smallest model size (MB) from which GradsSharding costs no more than ``other`` (caps ignored).

    Scans a log grid for the first change of sign of the cost difference, then bisects it; None if
    GradsSharding is dearer (or cheaper) over the whole range.
    """
    model = model or CostModel()

    def gs_minus_other(size: float) -> float:
        gs = model.predict("sharded", clients, shards, size, layout).per_1000_rounds.total
        return gs - model.predict(other, clients, shards, size, layout).per_1000_rounds.total

    grid = np.geomspace(lo_mb, hi_mb, 200)
    signs = [gs_minus_other(float(s)) > 0 for s in grid]
    index = next((i for i in range(1, len(grid)) if signs[i - 1] and not signs[i]), None)
    if index is None:
        return None
    lo, hi = float(grid[index - 1]), float(grid[index])
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if gs_minus_other(mid) > 0 else (lo, mid)
    return hi


@dataclass(frozen=True)
class SweepRow:
    """One (model size, architecture, layout) point of a sweep; dollars per 1000 rounds."""

    model_mb: float
    arch: str
    layout: str
    shards: int
    memory_mb: int
    feasible: bool
    reason: str | None
    latency_s: float
    compute: float
    storage: float
    total: float


def sweep(sizes_mb: Sequence[float], clients: int = 50, shards: int = 4,
          memory_limit_mb: int = MEMORY_CAPS_MB["account"], model: CostModel | None = None) -> list[SweepRow]:
    """Cost per 1000 rounds of every architecture in both layouts over model sizes, with feasibility."""
    model = model or CostModel()
    rows = []
    for layout in OBJECT_LAYOUTS:
        for arch in TOPOLOGIES:
            for size in sizes_mb:
                cost = model.predict(arch, clients, shards, size, layout)
                fits = check_feasible(cost.memory_mb, max(cost.durations_s), memory_limit_mb, model.prices)
                per_1000 = cost.per_1000_rounds
                rows.append(SweepRow(size, arch, layout, cost.shape.shards, cost.memory_mb, fits.feasible,
                                     fits.reason, cost.latency_s, per_1000.compute, per_1000.storage,
                                     per_1000.total))
    return rows


def default_sweep_sizes() -> list[float]:
    """10 MB to 16 GB, eight points per decade."""
    return [float(s) for s in np.geomspace(10, 16384, 27)]


def write_sweep(rows: Sequence[SweepRow], out_dir: str | Path, title: str = "") -> dict[str, Path]:
    """Write the sweep's table (CSV and JSON) and its plot (PNG) into ``out_dir``; returns the paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {kind: out / name for kind, name in SWEEP_FILES.items()}
    data = [asdict(r) for r in rows]
    paths["json"].write_text(json.dumps(data, indent=1))
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(data[0]))
        writer.writeheader()
        writer.writerows(data)
    paths["png"].write_bytes(plot_sweep(rows, title))
    return paths


def plot_sweep(rows: Sequence[SweepRow], title: str = "") -> bytes:
    """Cost per 1000 rounds against model size, one panel per layout; infeasible points hollow. PNG bytes.

    matplotlib (the ``plots`` extra) is imported here, on an explicit Agg canvas, so importing gradshard never
    needs it and the caller's matplotlib state is left alone.
    """
    import io

    require_extra("plots", "the cost sweep plot (gradshard plan --sweep)")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(OBJECT_LAYOUTS), sharey=True)
    for ax, layout in zip(axes, OBJECT_LAYOUTS, strict=True):
        for arch in TOPOLOGIES:
            _plot_arch(ax, [r for r in rows if r.layout == layout and r.arch == arch], arch)
        ax.set(xscale="log", yscale="log", xlabel="model update size (MB)", title=f"{layout} layout")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("$ per 1000 rounds")
    axes[0].legend(fontsize="small")
    if title:
        fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return buf.getvalue()


def _plot_arch(ax: Any, rows: Sequence[SweepRow], arch: str) -> None:
    """One line per architecture; infeasible points drawn hollow on the same line."""
    sizes, totals = [r.model_mb for r in rows], [r.total for r in rows]
    (line,) = ax.plot(sizes, totals, label=arch, linewidth=1.2)
    bad = [(r.model_mb, r.total) for r in rows if not r.feasible]
    if bad:
        xs, ys = zip(*bad, strict=True)
        ax.plot(xs, ys, linestyle="none", marker="o", markersize=4, markerfacecolor="white",
                color=line.get_color())
