"""Compare aggregation architectures (flat, GradsSharding, λ-FL, LIFL) on the same round, under one memory limit.

For each architecture :func:`compare_round` first *predicts*: it builds the plan without running it and checks
that the largest invocation's need plus the interpreter baseline (measured once with a ``noop`` invocation) fits
the per-function limit. Architectures that fit are then *run* on a capped :class:`LocalExecutor`, and every row
holds the measured side next to the predicted one: peak resident memory per function, wall time, object-store and
shared-memory traffic. Infeasible architectures are reported with the reason and, only when asked, run anyway so
their failure under the cap is measured too (it is captured into the row; the output upload is aborted, so no
aggregate of that run becomes visible).

Agreement is measured against a reference output: flat when it is feasible, otherwise GradsSharding, which is
bit-identical to flat by construction (same client order, same element-wise operations). Every run publishes to
the same ``rounds/<r>/aggregate.safetensors``, so the reference is copied aside and each later output is compared
with it window by window (never two whole models in memory). At the end the reference aggregate and its
``reports.json`` are put back in place and the copy is deleted: the store is left holding the canonical FedAvg
aggregate, not whichever tree ran last.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from gradshard.aggregation.driver import AggregateConfig, aggregate_round, build_plan
from gradshard.cost.model import MB, CostOptions, cost_of_local_run, predict_cost, shape_from_plan
from gradshard.errors import GradshardError, InvocationError, PlanError
from gradshard.format.keys import aggregate_key, manifest_key, reports_key, round_prefix
from gradshard.format.round import RoundManifest, prepare_round
from gradshard.format.update import UpdateReader, open_update
from gradshard.runtime import InvocationReport, LocalExecutor
from gradshard.runtime.diagnostics import NoArgs
from gradshard.store import Store
from gradshard.topology import TOPOLOGIES, Invocation, Plan, PlanOutput, check_fits
from gradshard.topology.common import DEFAULT_WINDOW_BYTES
from gradshard.topology.hierarchical import node_memory

log = logging.getLogger(__name__)

# Elements compared at a time: two float32 windows plus a float64 difference, 64 MiB in the driver.
COMPARE_WINDOW_ELEMS = 4 << 20
COPY_PIECE_BYTES = 64 << 20
DEFAULT_SHARDS = 4
Status = Literal["ok", "failed", "skipped"]


@dataclass
class CompareRow:
    """One architecture on the round: its shape, predicted need, measurements and agreement with the reference.

    Byte counts are summed over the invocation reports of the run (object store: ``bytes_*``, ``gets``, ``puts``;
    LIFL's per-node shared memory: ``shm_*``). ``peak_rss_bytes`` is the largest measured resident set of one
    function; ``predicted_peak_bytes`` is the plan's largest need plus the interpreter baseline, comparable to it.
    """

    architecture: str
    feasible: bool
    status: Status
    invocations: int
    levels: int
    predicted_need_bytes: int
    predicted_peak_bytes: int
    shards: int | None = None
    group_size: int | None = None
    branching: int | None = None
    nodes: int | None = None
    reason: str | None = None
    error_type: str | None = None
    error: str | None = None
    peak_rss_bytes: int | None = None
    wall_s: float | None = None
    bytes_read: int = 0
    bytes_written: int = 0
    gets: int = 0
    puts: int = 0
    shm_bytes_read: int = 0
    shm_bytes_written: int = 0
    shm_handoffs: int | None = None
    store_handoffs: int | None = None
    output_visible: bool | None = None
    reference: bool = False
    exact: bool | None = None
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    cloud_predicted_per_1000: float | None = None  # $ on AWS Lambda + S3 list prices, analytic model, ranged layout
    cloud_measured_per_1000: float | None = None  # $ for this run's own durations and peak, billed at those prices
    note: str = ""

    @property
    def shape(self) -> str:
        """The architecture's parameters in a few characters (``M=4``, ``k=5``, ``b=3, 2 nodes``)."""
        if self.shards is not None:
            return f"M={self.shards}"
        if self.group_size is not None:
            return f"k={self.group_size}"
        if self.branching is not None:
            return f"b={self.branching}, {self.nodes} nodes"
        return "single"

    @property
    def shm_bytes(self) -> int:
        return self.shm_bytes_read + self.shm_bytes_written


@dataclass
class CompareResult:
    """The comparison of one round: a row per architecture, in the order asked for."""

    round: int
    clients: int
    model_bytes: int
    memory_limit_bytes: int | None
    baseline_bytes: int
    reference: str | None
    rows: list[CompareRow] = field(default_factory=list)

    def row(self, architecture: str) -> CompareRow:
        for row in self.rows:
            if row.architecture == architecture:
                return row
        raise KeyError(architecture)

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round, "clients": self.clients, "model_bytes": self.model_bytes,
                "memory_limit_bytes": self.memory_limit_bytes, "baseline_bytes": self.baseline_bytes,
                "reference": self.reference, "rows": [dataclasses.asdict(r) for r in self.rows]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    def to_csv(self) -> str:
        """One line per row, every :class:`CompareRow` field as a column (empty for None)."""
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=[f.name for f in dataclasses.fields(CompareRow)], lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow(dataclasses.asdict(row))
        return out.getvalue()


@dataclass(frozen=True)
class CompareEvent:
    """Progress of one architecture: ``start`` (``invocations`` planned), each ``invocation`` done (its
    ``report``), ``finished`` (its complete ``row``; also sent for architectures that are not run)."""

    kind: Literal["start", "invocation", "finished"]
    architecture: str
    invocations: int
    report: InvocationReport | None = None
    row: CompareRow | None = None


EventCallback = Callable[[CompareEvent], None]


def measure_baseline(store: Store) -> int:
    """Peak resident set of a function that does nothing: the interpreter baseline every function starts from.

    Measured on an uncapped executor, so that a limit below the baseline still yields the true figure.
    """
    with LocalExecutor(workers=1, retries=0) as executor:
        (report,) = executor.run(Plan("noop", (Invocation("noop", "noop", NoArgs(), 0),)), store)
    if not report.ok or report.peak_rss_bytes is None:
        raise InvocationError(f"the baseline (noop) invocation failed: {report.error_type}: {report.error}")
    return report.peak_rss_bytes


def predict_plan(config: AggregateConfig, manifest: RoundManifest) -> Plan:
    """The plan ``config`` would run on this round, built against a placeholder output (nothing is written).

    LIFL's plan names one shared-memory store per node; they are created and removed again here.
    """
    r = manifest.round
    target = PlanOutput(manifest_key(r), aggregate_key(r), "prediction", 0)
    with ExitStack() as stack:
        node_stores = stack.enter_context(node_memory(config.nodes)) if config.topology == "lifl" else None
        return build_plan(config, manifest, "", target, node_stores)


def choose_shards(manifest: RoundManifest, window_bytes: int, memory_limit_bytes: int | None,
                  baseline_bytes: int) -> int:
    """GradsSharding's M: the smallest that fits the limit, else (no limit, or none fits) 4 capped at the maximum.

    Our shard functions stream fixed windows, so their need does not depend on M (only shards shorter than one
    window need less): M = 1 fits whenever any M does, unless the model is smaller than a few windows. The need is
    non-increasing in M, so a binary search over 1..⌈P/chunk⌉ finds the smallest M that fits.
    """
    spec = manifest.spec
    most = math.ceil(spec.model_layout().numel / spec.chunk_elems)
    fallback = min(DEFAULT_SHARDS, most)
    if memory_limit_bytes is None:
        return fallback

    def fits(m: int) -> bool:
        plan = predict_plan(AggregateConfig(topology="sharded", shards=m, window_bytes=window_bytes), manifest)
        return plan.peak_memory_bytes + baseline_bytes <= memory_limit_bytes

    if not fits(most):
        return fallback
    lo, hi = 1, most
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _cloud_cost(plan: Plan, manifest: RoundManifest, reports: Sequence[InvocationReport] | None = None) -> float:
    """Dollars per 1000 rounds on AWS list prices (ranged layout): predicted, or at a run's measured figures."""
    clients, model_bytes = len(manifest.clients), manifest.spec.model_layout().nbytes
    options = CostOptions(layout="ranged")
    if reports is None:
        shape = shape_from_plan(plan, clients)
        return predict_cost(shape, model_bytes / MB, options).per_1000_rounds.total
    return cost_of_local_run(plan, reports, clients, model_bytes, options).measured.per_1000_rounds.total


def _predicted_row(architecture: str, plan: Plan, manifest: RoundManifest, memory_limit_bytes: int | None,
                   baseline_bytes: int) -> CompareRow:
    try:
        check_fits(plan, memory_limit_bytes, baseline_bytes)
        reason = None
    except PlanError as exc:
        reason = str(exc)
    params = plan.params
    return CompareRow(
        architecture=architecture, feasible=reason is None, status="skipped", invocations=len(plan.invocations),
        levels=plan.levels, predicted_need_bytes=plan.peak_memory_bytes,
        predicted_peak_bytes=plan.peak_memory_bytes + baseline_bytes,
        shards=params.get("m") if architecture == "sharded" else None, group_size=params.get("k"),
        branching=params.get("branching"), nodes=params.get("nodes"), reason=reason,
        shm_handoffs=params.get("shm_handoffs"), store_handoffs=params.get("store_handoffs"),
        cloud_predicted_per_1000=_cloud_cost(plan, manifest), note=reason or "")


def _measure(row: CompareRow, reports: Sequence[InvocationReport]) -> None:
    """Fill the measured columns from a run's reports."""
    peaks = [r.peak_rss_bytes for r in reports if r.peak_rss_bytes is not None]
    row.peak_rss_bytes = max(peaks) if peaks else None
    row.bytes_read = sum(r.bytes_read for r in reports)
    row.bytes_written = sum(r.bytes_written for r in reports)
    row.gets = sum(r.gets for r in reports)
    row.puts = sum(r.puts for r in reports)
    row.shm_bytes_read = sum(int(r.result.get("shm", {}).get("bytes_read", 0)) for r in reports)
    row.shm_bytes_written = sum(int(r.result.get("shm", {}).get("bytes_written", 0)) for r in reports)


def _run(store: Store, r: int, executor: LocalExecutor, config: AggregateConfig, row: CompareRow,
         on_event: EventCallback | None) -> None:
    """Run one architecture with no aggregate in place; a failure is captured into ``row``, never raised."""
    seen: list[InvocationReport] = []

    def on_done(report: InvocationReport) -> None:
        seen.append(report)
        if on_event is not None:
            on_event(CompareEvent("invocation", row.architecture, row.invocations, report=report))

    if on_event is not None:
        on_event(CompareEvent("start", row.architecture, row.invocations))
    store.delete(aggregate_key(r))  # so that "no output visible" after a failure is observable
    started = time.perf_counter()
    try:
        result = aggregate_round(store, r, executor, config, on_done=on_done)
    except GradshardError as exc:
        row.wall_s = time.perf_counter() - started
        failed = next((rep for rep in seen if not rep.ok), None)
        row.status = "failed"
        row.error_type = failed.error_type if failed is not None else type(exc).__name__
        row.error = failed.error if failed is not None else str(exc)
        row.note = f"{row.error_type}: {row.error}"
        _measure(row, seen)
        log.debug("%s failed: %s", row.architecture, row.note)
    else:
        row.wall_s = time.perf_counter() - started
        row.status = "ok"
        _measure(row, result.reports)
        row.cloud_measured_per_1000 = _cloud_cost(result.plan, result.manifest, result.reports)
    row.output_visible = store.exists(aggregate_key(r))


def _open(store: Store, key: str, manifest: RoundManifest) -> UpdateReader:
    return open_update(store, key, "aggregate", manifest.spec.model_layout())


def copy_object(store: Store, src: str, dst: str, piece_bytes: int = COPY_PIECE_BYTES) -> None:
    """Copy an object piece by piece through an upload (atomic at ``dst``; never the whole object in memory)."""
    size = store.size(src)
    buf = bytearray(min(piece_bytes, size))
    with store.upload(dst, size) as writer, store.open_reader(src) as reader:
        for offset in range(0, size, piece_bytes):
            view = memoryview(buf)[: min(piece_bytes, size - offset)]
            reader.read_into(offset, view)
            writer.write(view)


def agreement(store: Store, key: str, reference_key: str, manifest: RoundManifest,
              window_elems: int = COMPARE_WINDOW_ELEMS) -> tuple[bool, float, float]:
    """(bytes equal, max |a - ref|, max |a - ref| / max |ref|) of two aggregates, one window at a time.

    Both objects are read with every chunk's checksum verified.
    """
    numel = manifest.spec.model_layout().numel
    with _open(store, key, manifest) as out, _open(store, reference_key, manifest) as ref:
        n = min(window_elems, numel)
        a, b = np.empty(n, dtype=out.dtype), np.empty(n, dtype=ref.dtype)
        diff = np.empty(n, dtype=np.float64)
        streams = out.stream(0, numel), ref.stream(0, numel)
        exact, max_abs, max_ref = True, 0.0, 0.0
        for lo in range(0, numel, n):
            m = min(n, numel - lo)
            streams[0].read_next(a[:m])
            streams[1].read_next(b[:m])
            exact = exact and np.array_equal(a[:m].view(np.uint8), b[:m].view(np.uint8))
            np.subtract(a[:m], b[:m], out=diff[:m], dtype=np.float64)
            max_abs = max(max_abs, float(np.abs(diff[:m], out=diff[:m]).max()))
            max_ref = max(max_ref, float(np.abs(b[:m]).max()))
    return exact, max_abs, (max_abs / max_ref if max_ref > 0 else max_abs)


class _Reference:
    """The reference aggregate, copied aside while the other architectures overwrite the output key."""

    def __init__(self, store: Store, manifest: RoundManifest) -> None:
        self.store, self.manifest = store, manifest
        r = manifest.round
        self.out_key, self.reports_key = aggregate_key(r), reports_key(r)
        self.key = f"{round_prefix(r)}/compare/reference.safetensors"
        self.architecture: str | None = None
        self._reports: bytes | None = None

    def capture(self, architecture: str) -> None:
        copy_object(self.store, self.out_key, self.key)
        self._reports = self.store.get(self.reports_key)
        self.architecture = architecture

    def compare(self, row: CompareRow) -> None:
        exact, max_abs, max_rel = agreement(self.store, self.out_key, self.key, self.manifest)
        row.exact, row.max_abs_error, row.max_rel_error = exact, max_abs, max_rel
        row.note = f"{'bit-identical to' if exact else 'agrees to float tolerance with'} {self.architecture}"

    def restore(self) -> None:
        """Put the reference aggregate and its reports back in place, and delete the copy."""
        if self.architecture is None:
            return
        copy_object(self.store, self.key, self.out_key)
        if self._reports is not None:
            self.store.put(self.reports_key, self._reports)
        self.store.delete(self.key)


@contextmanager
def _reference(store: Store, manifest: RoundManifest) -> Iterator[_Reference]:
    ref = _Reference(store, manifest)
    try:
        yield ref
    finally:
        ref.restore()


def _reference_note(architecture: str, requested: Sequence[str], rows: dict[str, CompareRow]) -> str:
    if architecture == "flat":
        return "reference (the single aggregator)"
    why = "flat is infeasible under the limit" if "flat" in rows and not rows["flat"].feasible else (
        "flat failed" if "flat" in requested else "flat was not requested")
    return f"reference ({why}); GradsSharding is bit-identical to flat by construction"


def _configs(architectures: Sequence[str], manifest: RoundManifest, shards: int | None,
             memory_limit_bytes: int | None, baseline_bytes: int, nodes: int,
             window_bytes: int) -> dict[str, AggregateConfig]:
    configs = {}
    for arch in architectures:
        m = 1
        if arch == "sharded":
            m = shards or choose_shards(manifest, window_bytes, memory_limit_bytes, baseline_bytes)
        configs[arch] = AggregateConfig.model_validate({"topology": arch, "shards": m, "nodes": nodes,
                                                        "window_bytes": window_bytes})
    return configs


def _check_architectures(architectures: Sequence[str]) -> list[str]:
    unknown = [a for a in architectures if a not in TOPOLOGIES]
    if unknown or not architectures:
        raise PlanError(f"unknown architecture(s) {unknown}; choose from {', '.join(TOPOLOGIES)}")
    return list(dict.fromkeys(architectures))


def compare_round(store: Store, r: int, *, architectures: Sequence[str] = TOPOLOGIES, shards: int | None = None,
                  memory_limit_bytes: int | None = None, workers: int = 2, nodes: int = 2,
                  window_bytes: int = DEFAULT_WINDOW_BYTES, run_infeasible: bool = False,
                  on_event: EventCallback | None = None) -> CompareResult:
    """Aggregate round ``r`` with each architecture and compare memory, time, traffic and agreement.

    ``store`` must be one that :class:`LocalExecutor`'s worker processes can open (a ``LocalStore``).
    ``memory_limit_bytes`` caps every function (measured resident set, baseline included); architectures whose
    predicted need does not fit are skipped (``run_infeasible`` runs them anyway, to fail under the cap).
    ``shards``: GradsSharding's M; by default the smallest M that fits the limit (see :func:`choose_shards`), 4
    without a limit. ``nodes``: LIFL's nodes. The reference for agreement is flat (run first) when it fits, else
    GradsSharding; with neither requested, agreement is not measured.
    """
    requested = _check_architectures(architectures)
    manifest = prepare_round(store, r)
    baseline = measure_baseline(store)
    configs = _configs(requested, manifest, shards, memory_limit_bytes, baseline, nodes, window_bytes)
    rows = {a: _predicted_row(a, predict_plan(c, manifest), manifest, memory_limit_bytes, baseline)
            for a, c in configs.items()}
    candidates = [a for a in ("flat", "sharded") if a in rows and rows[a].feasible]
    order = candidates + [a for a in requested if a not in candidates]
    with LocalExecutor(workers=workers, memory_cap_bytes=memory_limit_bytes) as executor, \
            _reference(store, manifest) as ref:
        for arch in order:
            row = rows[arch]
            if row.feasible or run_infeasible:
                _run(store, r, executor, configs[arch], row, on_event)
                if row.status == "ok" and ref.architecture is None and arch in candidates:
                    ref.capture(arch)
                    row.reference, row.exact, row.max_abs_error, row.max_rel_error = True, True, 0.0, 0.0
                    row.note = _reference_note(arch, requested, rows)
                elif row.status == "ok" and ref.architecture is not None:
                    ref.compare(row)
            if on_event is not None:
                on_event(CompareEvent("finished", arch, row.invocations, row=row))
    layout = manifest.spec.model_layout()
    return CompareResult(round=r, clients=len(manifest.clients), model_bytes=layout.nbytes,
                         memory_limit_bytes=memory_limit_bytes, baseline_bytes=baseline,
                         reference=ref.architecture, rows=[rows[a] for a in requested])
