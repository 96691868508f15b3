"""What a round costs and how long it takes on a serverless platform: requests, memory, latency, dollars.

A round's *shape* (:class:`RoundShape`) lists its aggregator functions and what each moves through the object
store; it comes from an architecture and N, M (:func:`shape_for`) or from an executed :class:`Plan`
(:func:`shape_from_plan`). From the shape:

- **requests** (:func:`count_requests`) in one of two object layouts: ``paper`` (each client uploads M shard
  objects and reads back M) or ``ranged`` (gradshard's: one object per client, ranged reads, one output object);
- **memory** per function (:class:`MemoryRule`, the paper's ``3·|θ|/M + 450 MB`` by default, or the measured peak
  of local reports) and its feasibility under a per-function cap (:func:`check_feasible`);
- **durations** (:class:`LatencyModel`, preset fitted to the paper's AWS measurements, or :func:`calibrate` to
  local reports) and the round's latency along its stages;
- **dollars** (:func:`round_cost`): function compute, invocation requests (optional: the paper did not count them)
  and object-store operations, priced by a :class:`~gradshard.cost.pricing.PriceSheet`.

Sizes are in MB of 2^20 bytes, as Lambda and the paper count them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from gradshard.aggregation.contracts import FlatReduceArgs, ShardReduceArgs, TreeReduceArgs
from gradshard.cost.pricing import AWS_LAMBDA_X86, PriceSheet
from gradshard.errors import PlanError
from gradshard.runtime.report import InvocationReport
from gradshard.store.s3 import DEFAULT_MAX_STREAMS
from gradshard.topology.base import Invocation, Plan
from gradshard.topology.common import DEFAULT_WINDOW_BYTES
from gradshard.topology.hierarchical import cube_root_ceil
from gradshard.topology.names import TOPOLOGIES, Topology, topology_name
from gradshard.units import MIB

MB = MIB  # Lambda and the paper call 2^20 bytes a MB
ObjectLayout = Literal["paper", "ranged"]
OBJECT_LAYOUTS: tuple[ObjectLayout, ...] = get_args(ObjectLayout)
# Per-function memory caps: the paper's account limit and the AWS Lambda maximum.
MEMORY_CAPS_MB = {"account": 3008, "aws-max": 10240}
# Requests the ranged layout's output upload adds: create, the header part (written last, with the checksums), complete.
RANGED_OUTPUT_EXTRA_PUTS = 3


@dataclass(frozen=True)
class Aggregator:
    """One function of a round and what it moves through the object store, in units of its share of the model.

    ``fraction`` is the share of the model each object it touches holds (1/M for a shard function, 1 for a tree
    node). It reads ``client_reads`` client objects and ``partial_reads`` partials from the store and writes one
    object; LIFL's hand-offs within a node go through shared memory (not counted in ``partial_reads``; an output
    with ``writes_shm``): no request, no transfer time.
    """

    id: str
    stage: int
    fraction: float
    client_reads: int
    partial_reads: int = 0
    writes_shm: bool = False

    @property
    def store_reads(self) -> int:
        return self.client_reads + self.partial_reads


@dataclass(frozen=True)
class RoundShape:
    """The aggregator functions of one round of ``arch`` over ``clients`` clients."""

    arch: Topology
    clients: int
    aggregators: tuple[Aggregator, ...]

    @property
    def shards(self) -> int:
        """M for GradsSharding, 1 for the architectures that write one whole output."""
        return len(self.aggregators) if self.arch == "sharded" else 1

    @property
    def stages(self) -> list[list[int]]:
        """Indices of the aggregators of each stage (a stage starts when the one before has finished)."""
        out: list[list[int]] = [[] for _ in range(1 + max(a.stage for a in self.aggregators))]
        for i, a in enumerate(self.aggregators):
            out[a.stage].append(i)
        return out


def shape_for(arch: Topology, clients: int, shards: int = 4, *, group_size: int | None = None,
              branching: int | None = None) -> RoundShape:
    """The paper's shape of ``arch``: M shard functions, one flat aggregator, a λ-FL tree (k = ⌈√N⌉ clients per
    leaf) or a LIFL tree (branching max(2, ⌈N^(1/3)⌉), all hand-offs through the object store as on Lambda)."""
    if clients < 1 or shards < 1:
        raise PlanError(f"a round needs at least one client and one shard, got N = {clients}, M = {shards}")
    if arch == "sharded":
        aggs = tuple(Aggregator(f"shard-{s:04d}", 0, 1 / shards, clients) for s in range(shards))
    elif arch == "flat":
        aggs = (Aggregator("flat", 0, 1.0, clients),)
    elif arch == "lambda-fl":
        aggs = _lambda_fl(clients, group_size or math.ceil(math.sqrt(clients)))
    else:
        aggs = _lifl(clients, branching or max(2, cube_root_ceil(clients)))
    return RoundShape(arch, clients, aggs)


def _sizes(n: int, group: int) -> list[int]:
    """Sizes of the groups of ``group`` that ``n`` items fall into, in order."""
    return [min(group, n - i) for i in range(0, n, group)]


def _lambda_fl(clients: int, k: int) -> tuple[Aggregator, ...]:
    """Leaves of k clients, levels of k partials while more than k remain, one root (as ``lambda_fl_plan``)."""
    if k < 2 and clients > 1:
        raise PlanError(f"a λ-FL group size k = {k} cannot reduce {clients} clients; use k >= 2")
    aggs = [Aggregator(f"leaf-{g:04d}", 0, 1.0, n) for g, n in enumerate(_sizes(clients, k))]
    level, stage = len(aggs), 1
    while level > k:
        sizes = _sizes(level, k)
        aggs += [Aggregator(f"l{stage}-{g:04d}", stage, 1.0, 0, n) for g, n in enumerate(sizes)]
        level, stage = len(sizes), stage + 1
    return (*aggs, Aggregator("root", stage, 1.0, 0, level))


def _lifl(clients: int, b: int) -> tuple[Aggregator, ...]:
    """Leaves of b clients, middles of b leaves, one top over all middles (one node, as ``lifl_plan``)."""
    if b < 2:
        raise PlanError(f"LIFL branching must be at least 2, got {b}")
    leaves = _sizes(clients, b)
    middles = _sizes(len(leaves), b)
    return (*(Aggregator(f"leaf-{g:03d}", 0, 1.0, n) for g, n in enumerate(leaves)),
            *(Aggregator(f"middle-{g:03d}", 1, 1.0, 0, n) for g, n in enumerate(middles)),
            Aggregator("top", 2, 1.0, 0, len(middles)))


def shape_from_plan(plan: Plan, clients: int) -> RoundShape:
    """The shape of an executed plan; LIFL hand-offs that went through shared memory cost no request."""
    if plan.topology not in TOPOLOGIES:
        raise PlanError(f"no cost model for topology {plan.topology!r}")
    # plans record "numel"; reports stored before it did have it under "shards"
    numel = int(plan.params.get("numel") or plan.params["shards"]["numel"]) if plan.topology == "sharded" else 0
    aggs = tuple(_aggregator(inv, stage, clients, numel)
                 for stage, invocations in enumerate(plan.stages()) for inv in invocations)
    return RoundShape(topology_name(plan.topology), clients, aggs)


def _aggregator(inv: Invocation, stage: int, clients: int, numel: int) -> Aggregator:
    """What an invocation moves, read from its typed arguments."""
    args = inv.args
    if isinstance(args, ShardReduceArgs):
        return Aggregator(inv.id, stage, (args.stop - args.start) / numel, clients)
    if isinstance(args, FlatReduceArgs):
        return Aggregator(inv.id, stage, 1.0, clients)
    if isinstance(args, TreeReduceArgs):
        vias = [ref.via for ref in args.partials]
        return Aggregator(inv.id, stage, 1.0, len(args.clients), vias.count("store"),
                          args.output is not None and args.output.via == "shm")
    raise PlanError(f"invocation {inv.id!r} runs {inv.function!r}, which the cost model does not know")


@dataclass(frozen=True)
class RequestCounts:
    """Object-store requests of one round, by who makes them, and the number of function invocations."""

    client_puts: int
    client_gets: int
    function_puts: int
    function_gets: int
    driver_puts: int
    invocations: int

    @property
    def puts(self) -> int:
        return self.client_puts + self.function_puts + self.driver_puts

    @property
    def gets(self) -> int:
        return self.client_gets + self.function_gets

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "puts": self.puts, "gets": self.gets}


def count_requests(shape: RoundShape, layout: ObjectLayout = "paper", header_gets: int = 2, *,
                   model_mb: float | None = None, max_streams: int = DEFAULT_MAX_STREAMS,
                   window_bytes: int = DEFAULT_WINDOW_BYTES) -> RequestCounts:
    """Requests of a full round (clients' uploads and read-backs included, as the paper counted them).

    Trees and flat: each client PUTs one object and GETs the one output; every aggregator GETs each input once
    and PUTs one object (none for hand-offs in shared memory), in either layout. GradsSharding, ``paper``:
    clients PUT N·M shard objects and GET N·M output shards; functions GET N·M and PUT M. ``ranged``: clients
    PUT N objects and GET the one output; each function reads each client's range with one streamed GET plus
    ``header_gets`` for the client's header (2 as gradshard's reader does it: the length prefix, then the
    header; 0 if offsets came with the manifest), and writes its range as one part of a multipart upload that
    the driver creates, completes and writes the header part of. A function streams at most ``max_streams``
    clients at once (``S3Store(max_streams=…)``); the clients past that are read with one GET per window of
    ``window_bytes``, which is counted when ``model_mb`` says how large a range is. The driver's validation reads
    and the manifest are not counted (nor were they in the paper).
    """
    n, aggs = shape.clients, shape.aggregators
    reads = sum(a.store_reads for a in aggs)
    if shape.arch != "sharded":
        return RequestCounts(n, n, sum(not a.writes_shm for a in aggs), reads, 0, len(aggs))
    m = len(aggs)
    if layout == "paper":
        return RequestCounts(n * m, n * m, m, reads, 0, m)
    window_gets = 0
    if model_mb is not None:
        for a in aggs:
            windows = max(1, math.ceil(a.fraction * model_mb * MB / window_bytes))
            window_gets += max(0, a.store_reads - max_streams) * (windows - 1)
    return RequestCounts(n, n, m, reads * (1 + header_gets) + window_gets, RANGED_OUTPUT_EXTRA_PUTS, m)


class MemoryRule(BaseModel):
    """Function memory = ``factor`` × the model bytes a function holds + ``overhead_mb``, rounded up to a MB.

    A shard function holds |θ|/M, a tree node or the flat aggregator |θ|. The default is the paper's rule
    (sum + response body + parsed array, plus 450 MB of runtime): ``3·|θ|/M + 450`` and ``3·|θ| + 450``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    factor: float = Field(default=3.0, ge=0)
    overhead_mb: float = Field(default=450.0, ge=0)

    def memory_mb(self, shape: RoundShape, model_mb: float) -> int:
        """One memory size for every function of the round (a platform configures it per function)."""
        held = model_mb * max(a.fraction for a in shape.aggregators)
        return math.ceil(round(self.factor * held + self.overhead_mb, 6))


PAPER_MEMORY_RULE = MemoryRule()


def measured_memory_mb(reports: Sequence[InvocationReport]) -> int:
    """The largest measured peak resident set of the reports, in whole MB (what to configure at the least)."""
    peaks = [r.peak_rss_bytes for r in reports if r.peak_rss_bytes is not None]
    if not peaks:
        raise PlanError("the reports carry no measured peak memory (run with the local executor)")
    return math.ceil(max(peaks) / MB)


@dataclass(frozen=True)
class Feasibility:
    feasible: bool
    reason: str | None = None


def check_feasible(memory_mb: float, longest_s: float, cap_mb: float, prices: PriceSheet = AWS_LAMBDA_X86
                   ) -> Feasibility:
    """Whether functions of ``memory_mb`` running up to ``longest_s`` fit the cap and the platform's limits."""
    cap = min(cap_mb, prices.function.max_memory_mb)
    if memory_mb > cap:
        return Feasibility(False, f"needs {memory_mb:,.0f} MB per function > {cap:,.0f} MB cap")
    if longest_s > prices.function.max_duration_s:
        return Feasibility(False, f"a function runs {longest_s:,.0f} s > {prices.function.max_duration_s:,.0f} s "
                                  f"limit of {prices.function_service}")
    return Feasibility(True)


class LatencyModel(BaseModel):
    """Billed duration of a function = ``fixed_s`` + requests × ``request_latency_s`` / streams + MB moved /
    (``stream_mb_s`` × streams) + MB read / ``compute_mb_s``; a stage adds ``invocation_overhead_s`` (unbilled).

    The defaults are fitted to the paper's warm AWS Lambda runs (every GradsSharding shard function, N = 20) and
    rounded: reads ran at 47.6 MB/s per function plus 0.086 s per GET (the paper: 45-57 MB/s per function,
    sequential), the reduction at 4,800 MB/s of input, and a round took 0.06 s longer than its slowest function.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    stream_mb_s: float = Field(default=48.0, gt=0, description="object-store throughput of one stream, MB/s")
    streams: int = Field(default=1, ge=1, description="concurrent streams per function")
    request_latency_s: float = Field(default=0.09, ge=0, description="time to first byte of one request")
    compute_mb_s: float | None = Field(default=4800.0, gt=0, description="reduction rate; None: in the throughput")
    fixed_s: float = Field(default=0.0, ge=0, description="billed start-up time of each invocation")
    invocation_overhead_s: float = Field(default=0.06, ge=0, description="unbilled time to invoke a stage")

    def duration_s(self, read_mb: float, write_mb: float, requests: int) -> float:
        moved = (read_mb + write_mb) / (self.stream_mb_s * self.streams)
        compute = read_mb / self.compute_mb_s if self.compute_mb_s else 0.0
        return self.fixed_s + requests * self.request_latency_s / self.streams + moved + compute


PAPER_LATENCY = LatencyModel()


def predict_durations(shape: RoundShape, model_mb: float, latency: LatencyModel = PAPER_LATENCY,
                      layout: ObjectLayout = "paper", header_gets: int = 2) -> tuple[float, ...]:
    """The billed duration of each aggregator: its store reads and its one write (shared memory is free)."""
    gets_per_read = 1 + header_gets if shape.arch == "sharded" and layout == "ranged" else 1
    out = []
    for a in shape.aggregators:
        write_mb = 0.0 if a.writes_shm else a.fraction * model_mb
        requests = a.store_reads * gets_per_read + (0 if a.writes_shm else 1)
        out.append(latency.duration_s(a.store_reads * a.fraction * model_mb, write_mb, requests))
    return tuple(out)


def round_latency_s(shape: RoundShape, durations_s: Sequence[float], latency: LatencyModel | None = None) -> float:
    """The round's latency: per stage its slowest function, plus the invocation overhead of each stage."""
    overhead = latency.invocation_overhead_s if latency else 0.0
    return sum(overhead + max(durations_s[i] for i in stage) for stage in shape.stages)


def calibrate(reports: Sequence[InvocationReport]) -> LatencyModel:
    """A latency model fitted to local reports: billed duration = fixed + MB moved / throughput (least squares).

    The unbilled overhead is the median of wall − billed time. Requests and compute are folded into the fit
    (local ``gets`` count window reads, not object-store requests), so ``request_latency_s`` is 0 and
    ``compute_mb_s`` is None. With one transfer size only, the fixed time is taken as 0.
    """
    ok = [r for r in reports if r.ok and r.duration_s > 0]
    if not ok:
        raise PlanError("no successful invocation reports to calibrate from")
    moved = np.array([(r.bytes_read + r.bytes_written) / MB for r in ok])
    seconds = np.array([r.duration_s for r in ok])
    fixed, per_mb = _fit_line(moved, seconds)
    if per_mb <= 0:
        raise PlanError("the reports moved no bytes in measurable time; cannot fit a throughput")
    return LatencyModel(stream_mb_s=1 / per_mb, request_latency_s=0.0, compute_mb_s=None, fixed_s=fixed,
                        invocation_overhead_s=statistics.median(max(0.0, r.wall_s - r.duration_s) for r in ok))


def _fit_line(x: np.ndarray[Any, Any], y: np.ndarray[Any, Any]) -> tuple[float, float]:
    """(intercept, slope) of y over x by least squares; through the origin when x has one value or the
    intercept would be negative."""
    if np.ptp(x) > 0:
        slope, intercept = np.polyfit(x, y, 1)
        if intercept >= 0 and slope > 0:
            return float(intercept), float(slope)
    return 0.0, float(np.dot(x, y) / np.dot(x, x)) if np.dot(x, x) > 0 else 0.0


@dataclass(frozen=True)
class CostBreakdown:
    """Dollars split into function compute, invocation requests and object-store operations."""

    compute: float
    requests: float
    storage_put: float
    storage_get: float

    @property
    def storage(self) -> float:
        return self.storage_put + self.storage_get

    @property
    def total(self) -> float:
        return self.compute + self.requests + self.storage

    def scaled(self, factor: float) -> CostBreakdown:
        return CostBreakdown(self.compute * factor, self.requests * factor, self.storage_put * factor,
                             self.storage_get * factor)

    @staticmethod
    def mean(items: Sequence[CostBreakdown]) -> CostBreakdown:
        """The field-wise mean (the mean of per-run costs is the cost of the mean durations: it is linear)."""
        if not items:
            raise PlanError("no costs to average")
        return CostBreakdown(*(statistics.fmean(getattr(c, f) for c in items)
                               for f in ("compute", "requests", "storage_put", "storage_get")))

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "storage": self.storage, "total": self.total}


class CostOptions(BaseModel):
    """How a round is priced: object layout, prices, whether invocation fees count, header reads (ranged)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layout: ObjectLayout = "paper"
    prices: PriceSheet = AWS_LAMBDA_X86
    count_request_fees: bool = False
    header_gets: int = Field(default=2, ge=0)
    max_streams: int = Field(default=DEFAULT_MAX_STREAMS, ge=0)


@dataclass(frozen=True)
class RoundCost:
    """The price of one round: its shape, function memory and durations, requests, and dollars."""

    shape: RoundShape
    options: CostOptions
    memory_mb: int
    durations_s: tuple[float, ...]
    latency_s: float
    requests: RequestCounts
    per_round: CostBreakdown

    @property
    def per_1000_rounds(self) -> CostBreakdown:
        return self.per_round.scaled(1000)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: dollars per round and per 1000 rounds, requests, billed memory and durations."""
        prices = self.options.prices
        return {"arch": self.shape.arch, "layout": self.options.layout, "clients": self.shape.clients,
                "shards": self.shape.shards, "invocations": len(self.shape.aggregators),
                "memory_mb": self.memory_mb, "billed_memory_mb": prices.billed_memory_mb(self.memory_mb),
                "durations_s": list(self.durations_s), "latency_s": self.latency_s,
                "prices": {"name": prices.name, "as_of": prices.as_of.isoformat()},
                "count_request_fees": self.options.count_request_fees, "header_gets": self.options.header_gets,
                "requests": self.requests.to_dict(), "per_round": self.per_round.to_dict(),
                "per_1000_rounds": self.per_1000_rounds.to_dict()}


def round_cost(shape: RoundShape, memory_mb: int, durations_s: Sequence[float], options: CostOptions | None = None,
               latency: LatencyModel | None = None, model_mb: float | None = None) -> RoundCost:
    """Price one round: compute = Σ billed duration × memory (GB) × $/GB-s, plus requests and operations.

    ``durations_s`` are the billed durations of ``shape``'s aggregators, one each (measured or predicted);
    ``latency`` only adds its per-stage invocation overhead to the reported round latency; ``model_mb`` lets the
    request count include the window GETs of clients past ``options.max_streams`` (see :func:`count_requests`).
    """
    options = options or CostOptions()
    if len(durations_s) != len(shape.aggregators):
        raise PlanError(f"{shape.arch} with N = {shape.clients}, M = {shape.shards} has "
                        f"{len(shape.aggregators)} functions, got {len(durations_s)} durations")
    prices = options.prices
    requests = count_requests(shape, options.layout, options.header_gets, model_mb=model_mb,
                              max_streams=options.max_streams)
    fees = requests.invocations * prices.function.per_million_requests / 1e6 if options.count_request_fees else 0.0
    per_round = CostBreakdown(compute=sum(prices.compute_cost(memory_mb, d) for d in durations_s), requests=fees,
                              storage_put=requests.puts * prices.storage.put_per_1000 / 1000,
                              storage_get=requests.gets * prices.storage.get_per_1000 / 1000)
    return RoundCost(shape, options, memory_mb, tuple(durations_s), round_latency_s(shape, durations_s, latency),
                     requests, per_round)


def predict_cost(shape: RoundShape, model_mb: float, options: CostOptions | None = None,
                 latency: LatencyModel = PAPER_LATENCY, rule: MemoryRule = PAPER_MEMORY_RULE) -> RoundCost:
    """The analytic cost of a round: memory from ``rule``, durations from ``latency``."""
    options = options or CostOptions()
    durations = predict_durations(shape, model_mb, latency, options.layout, options.header_gets)
    return round_cost(shape, rule.memory_mb(shape, model_mb), durations, options, latency, model_mb)


@dataclass(frozen=True)
class LocalRunCost:
    """A local run priced two ways: at its own durations and measured peak memory, and predicted on the cloud."""

    measured: RoundCost
    predicted: RoundCost

    def to_dict(self) -> dict[str, Any]:
        return {"measured": self.measured.to_dict(), "predicted": self.predicted.to_dict()}


def cost_of_local_run(plan: Plan, reports: Sequence[InvocationReport], clients: int, model_bytes: int,
                      options: CostOptions | None = None, latency: LatencyModel = PAPER_LATENCY,
                      rule: MemoryRule = PAPER_MEMORY_RULE) -> LocalRunCost:
    """The predicted cloud cost of a local run, next to its price at the measured durations and peak memory.

    ``measured`` bills each invocation's measured ``duration_s`` at the largest measured peak (at least the
    platform minimum); ``predicted`` prices the same plan with ``latency``'s durations and ``rule``'s memory for
    a ``model_bytes`` update, i.e. what the round would cost on the platform of ``options.prices``.
    """
    shape = shape_from_plan(plan, clients)
    by_id = {r.invocation: r for r in reports if r.ok}
    missing = [a.id for a in shape.aggregators if a.id not in by_id]
    if missing:
        raise PlanError(f"no successful report for invocations {missing}")
    durations = [by_id[a.id].duration_s for a in shape.aggregators]
    measured = round_cost(shape, measured_memory_mb(reports), durations, options)
    return LocalRunCost(measured, predict_cost(shape, model_bytes / MB, options, latency, rule))
