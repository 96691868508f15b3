"""The aggregation driver: validate a round, run a topology's plan on an executor, publish the aggregate.

The output object is opened as an upload before the functions run; each function writes its byte range; the
driver writes the header (with every chunk's checksum, which the functions return) and completes the upload
only when every invocation succeeded. So no partial aggregate is ever visible. A function that finds a bad
update (checksum, non-finite values) fails with the client's name; under policy ``skip`` the driver rejects
that client and runs the plan again without it, under ``fail`` the round fails.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gradshard.aggregation import (  # noqa: F401 - register functions, phases
    functions,
    secure,
    selection,
    tree_functions,
    trust,
)
from gradshard.aggregation.contracts import NoiseSpec, ReduceResult, TreeReduceResult
from gradshard.aggregation.phases import PhaseContext, phase_function, phase_of, reject_bad_updates
from gradshard.core import digests
from gradshard.core.checksum import ChunkGrid
from gradshard.core.reducers import REDUCERS, normalised_weights, parse_reducer
from gradshard.errors import GradshardError, InvocationError, PlanError, RoundError, StoreError
from gradshard.format.keys import aggregate_key, manifest_key, partials_prefix, reports_key
from gradshard.format.round import Policy, RoundManifest, Weighting, check_enough, prepare_round, write_manifest
from gradshard.format.update import UpdateMeta
from gradshard.format.writer import ObjectUpload, merge_digests
from gradshard.privacy import central
from gradshard.privacy.central import check_config as check_central_dp
from gradshard.privacy.config import CentralDPRound
from gradshard.runtime.executor import Executor, ProgressCallback
from gradshard.runtime.registry import parse_result
from gradshard.runtime.report import InvocationReport
from gradshard.store import STALE_UPLOAD_S, Store
from gradshard.topology import Plan, PlanOutput, ReduceOptions, flat_plan, sharded_plan
from gradshard.topology.common import DEFAULT_WINDOW_BYTES
from gradshard.topology.hierarchical import lifl_plan, node_memory
from gradshard.topology.names import Topology
from gradshard.topology.sharded import Partition, most_shards
from gradshard.topology.tree import lambda_fl_plan

log = logging.getLogger(__name__)


class AggregateConfig(BaseModel):
    """How to aggregate a round (maps one to one onto ``gradshard aggregate`` options and a TOML table)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    topology: Topology = "sharded"
    shards: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        default="auto", description="shard functions M; 'auto': one per invocation the executor runs at once")
    partition: Partition = Field(default="contiguous", description="sharded: contiguous (the paper's) or "
                                                                   "tensor-aligned (cuts only between tensors)")
    group_size: int | None = Field(default=None, ge=1, description="λ-FL clients per leaf (default ⌈√N⌉)")
    branching: int | None = Field(default=None, ge=2, description="LIFL branching (default max(2, ⌈N^(1/3)⌉))")
    nodes: int = Field(default=2, ge=1, description="LIFL nodes to place aggregators on")
    wait_s: float = Field(default=0.0, ge=0, description="LIFL leaves wait this long for late updates")
    window_bytes: int = Field(default=DEFAULT_WINDOW_BYTES, ge=1)
    parallel_reads: int = Field(default=1, ge=1, description="clients a shard function reads at once")
    accumulate: Literal["float32", "float64"] = "float32"
    reducer: str = Field(default="mean", description="mean, coverage-mean, median, trimmed-mean:<beta>, krum:<f>, "
                                                     "multi-krum:<f>,<k>, bulyan:<f>, fltrust or secagg:<bits>")
    weighting: Weighting = "examples"
    weights: dict[str, float] | None = Field(default=None, description="per-client weights (weighting 'server')")
    policy: Policy = "skip"
    central_dp: CentralDPRound | None = Field(default=None, description="clip every update and add Gaussian noise "
                                                                         "(uniform weighting, reducer mean)")
    require_signatures: bool = Field(default=False, description="every update must be signed by a registered, "
                                                                "unrevoked key of its client (blake3/sha256 rounds)")

    @field_validator("reducer")
    @classmethod
    def _known_reducer(cls, value: str) -> str:
        try:
            return parse_reducer(value).text
        except GradshardError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _weights_for_server(self) -> AggregateConfig:
        if (self.weighting == "server") != (self.weights is not None):
            raise ValueError("per-client weights go with weighting 'server' (and only with it)")
        if self.central_dp is not None:
            try:
                check_central_dp(self.central_dp, weighting=self.weighting, reducer=self.reducer,
                                 topology=self.topology)
            except GradshardError as exc:
                raise ValueError(str(exc)) from None
        return self

    def for_executor(self, executor: Executor, most: int | None = None) -> AggregateConfig:
        """This config with ``shards='auto'`` made concrete: one shard per invocation ``executor`` runs at once (at
        most ``most``: the shards the round's chunks allow).

        A shard function's memory is its window, not its shard, so shards beyond the executor's concurrency buy
        nothing: they only add invocations, each opening every client again, and run in a second wave (on 2 local
        workers, rounds with M = 2 took 0.86x (N = 16) and 0.92x (N = 64) the time of M = 4: ``bench/round_overheads.py
        --pairs auto``). The aggregate is the same bytes for every M."""
        if self.shards != "auto":
            return self
        return self.model_copy(update={"shards": max(1, min(executor.workers, most or executor.workers))})

    @property
    def m(self) -> int:
        """The number of shards, once :meth:`for_executor` made it concrete."""
        if self.shards == "auto":
            raise PlanError("shards='auto' is decided by the executor: call AggregateConfig.for_executor first")
        return self.shards

    def reduce_options(self, noise: NoiseSpec | None = None) -> ReduceOptions:
        return ReduceOptions(self.window_bytes, self.accumulate, self.weighting, self.parallel_reads, self.reducer,
                             noise)


def check_reducer(config: AggregateConfig, manifest: RoundManifest) -> None:
    """Refuse a reducer the topology cannot run, or (policy 'fail') a round whose partial clients the reducer would
    misread; under policy 'skip' those clients are rejected instead."""
    spec = parse_reducer(config.reducer)
    if spec.name not in ("mean", "secagg") and config.topology not in ("sharded", "flat"):
        raise PlanError(f"topology {config.topology!r} sums weighted partials, which only reducers mean and secagg do; "
                        f"run reducer {spec.text!r} with topology 'sharded' (or 'flat')")
    masked = [c.client for c in manifest.clients if c.encoding == "secagg"] if spec.name != "secagg" else []
    if masked and config.policy == "fail":
        raise PlanError(f"clients {masked[:5]} uploaded masked updates (secure aggregation), which only reducer "
                        "'secagg:<bits>' can sum")
    for client in masked:
        manifest.reject(client, f"a masked update (secure aggregation), which reducer {spec.text!r} cannot read; "
                                "aggregate with 'secagg:<bits>'")
    if masked:
        check_enough(manifest)
    partial = [c.client for c in manifest.clients if c.partial]
    if partial and not REDUCERS[spec.name].uses_coverage:
        if config.policy == "fail":
            raise PlanError(f"clients {partial[:5]} trained only part of the model (their updates declare a "
                            f"coverage), which reducer {spec.text!r} would average as if they covered everything; "
                            "use reducer 'coverage-mean'")
        for client in partial:  # under 'skip' one client's coverage must not stop the round
            manifest.reject(client, f"it trained only part of the model (its update declares a coverage), which "
                                    f"reducer {spec.text!r} would average as if it covered everything; aggregate "
                                    "with reducer 'coverage-mean'")
        check_enough(manifest)


@dataclass
class AggregateResult:
    """The published aggregate and everything measured on the way."""

    round: int
    output_key: str
    manifest: RoundManifest
    plan: Plan
    reports: list[InvocationReport]
    runs: int
    wall_s: float
    all_reports: list[InvocationReport] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        peaks = [r.peak_rss_bytes for r in self.reports if r.peak_rss_bytes is not None]
        return {"round": self.round, "output": self.output_key, "topology": self.plan.topology,
                "invocations": len(self.reports), "runs": self.runs, "clients": len(self.manifest.clients),
                "rejected": dict(self.manifest.rejected), "wall_s": self.wall_s,
                "max_peak_rss_bytes": max(peaks) if peaks else None,
                "bytes_read": sum(r.bytes_read for r in self.reports),
                "bytes_written": sum(r.bytes_written for r in self.reports),
                "gets": sum(r.gets for r in self.reports), "puts": sum(r.puts for r in self.reports)}


def output_meta(manifest: RoundManifest, config: AggregateConfig) -> UpdateMeta:
    """Metadata of the aggregate: what was averaged and how — never which topology (outputs must be identical)."""
    spec = manifest.spec
    clients = [c.client for c in manifest.clients]
    weights = normalised_weights([c.weight for c in manifest.clients])
    scales = manifest.scales()
    if scales is not None:
        weights = [w * s for w, s in zip(weights, scales, strict=True)]
    extra = {"clients": ",".join(clients), "weights": json.dumps(weights), "weighting": config.weighting,
             "accumulate": config.accumulate, "reducer": config.reducer}
    if manifest.privacy is not None:  # what was released (never the noise key)
        extra["central_dp"] = json.dumps(manifest.privacy, sort_keys=True)
    return UpdateMeta(client="aggregate", round=manifest.round, kind="aggregate",
                      examples=sum(c.examples for c in manifest.clients),
                      layout_digest=spec.model_layout().digest(), chunk_elems=spec.chunk_elems,
                      base_model=spec.base_model, digest=spec.digest, extra=extra)


def build_plan(config: AggregateConfig, manifest: RoundManifest, manifest_sha256: str, output: PlanOutput,
               node_stores: list[dict[str, Any]] | None = None, noise: NoiseSpec | None = None) -> Plan:
    """The plan of ``config.topology``; LIFL needs one shared-memory store spec per node."""
    options = config.reduce_options(noise)
    if config.topology == "flat":
        return flat_plan(manifest, manifest_sha256, output, options)
    if config.topology == "lambda-fl":
        return lambda_fl_plan(manifest, manifest_sha256, output, options, config.group_size)
    if config.topology == "lifl":
        if node_stores is None:
            raise PlanError("a LIFL plan needs the nodes' shared-memory stores")
        return lifl_plan(manifest, manifest_sha256, output, options, node_stores=node_stores,
                         branching=config.branching, wait_s=config.wait_s)
    return sharded_plan(manifest, manifest_sha256, output, options, config.m, config.partition)


def _remove_partials(store: Store, r: int, upload_id: str) -> None:
    """Intermediate partials of tree topologies are scratch: remove them once the run is over."""
    for key in store.list(partials_prefix(r, upload_id)):
        store.delete(key)


def _describe_failures(failed: list[InvocationReport]) -> str:
    lines = [f"{r.invocation} ({r.function}, {r.attempts} attempt(s)): {r.error_type}: {r.error}" for r in failed]
    return "; ".join(lines)


def _result_digests(report: InvocationReport) -> dict[int, str]:
    """The output chunks' digests an aggregation function returned (tree nodes but the root return none)."""
    if report.function == "tree_reduce":
        return parse_result(report.function, report.result, TreeReduceResult).checksums
    return parse_result(report.function, report.result, ReduceResult).checksums


def _run_once(store: Store, manifest: RoundManifest, config: AggregateConfig, executor: Executor,
              on_done: ProgressCallback | None, noise: NoiseSpec | None = None
              ) -> tuple[Plan, list[InvocationReport], bool, str]:
    """Run the plan once; returns (plan, reports, published, the sha256 of the manifest it ran on). Bad updates are
    moved to ``manifest.rejected``."""
    sha = write_manifest(store, manifest)
    pending = ObjectUpload.begin(store, aggregate_key(manifest.round), manifest.spec.model_layout(),
                                 output_meta(manifest, config))
    failed_already = False
    try:
        with contextlib.ExitStack() as stack:
            node_stores = stack.enter_context(node_memory(config.nodes)) if config.topology == "lifl" else None
            target = PlanOutput(manifest_key(manifest.round), pending.key, pending.upload_id, pending.header_len,
                                pending.meta.digest)
            plan = build_plan(config, manifest, sha, target, node_stores, noise)
            params = ", ".join(f"{k}={v}" for k, v in plan.params.items() if isinstance(v, int | str))
            log.info("round %d: plan %s of %d invocations (%s) over %d clients", manifest.round, plan.topology,
                     len(plan.invocations), params or "-", len(manifest.clients))
            reports = executor.run(plan, store, on_done)
        if reject_bad_updates(manifest, reports, config.policy):
            pending.abort()
            return plan, reports, False, sha
        failed = [r for r in reports if not r.ok]
        if failed or len(reports) != len(plan.invocations):
            raise InvocationError(f"round {manifest.round} ({plan.topology}) failed: {_describe_failures(failed)}")
        chunk_digests = merge_digests(_result_digests(r) for r in reports)
        if "covered" in plan.params:  # the coverage contract: the chunks outside were not written, they are zeros
            chunk_digests.update(zero_chunk_digests(pending.grid, pending.meta.digest, plan.params["covered"],
                                              manifest.spec.model_layout().flat_dtype))
        pending.commit(chunk_digests)
        return plan, reports, True, sha
    except BaseException:
        failed_already = True
        # Best effort: a store that fails (a server killed mid-round) must not hide why the round failed.
        for what, step in ((f"aborting the upload of {pending.key}", pending.abort),
                           (f"removing the partials of round {manifest.round}",
                            lambda: _remove_partials(store, manifest.round, pending.upload_id))):
            try:
                step()
            except Exception as cleanup:
                log.warning("%s after the round failed also failed: %s", what, cleanup)
        raise
    finally:
        if not failed_already:
            _remove_partials(store, manifest.round, pending.upload_id)


def zero_chunk_digests(grid: ChunkGrid, digest: str, covered: list[list[int]], dtype: str) -> dict[int, str]:
    """The digests of every chunk outside the ``covered`` element ranges, each all zeros (one digest per distinct
    chunk length: at most two)."""
    inside = {i for lo, hi in covered for i in grid.covering(lo, hi)}
    algorithm, itemsize, known = digests.algorithm(digest), np.dtype(dtype).itemsize, {}
    out = {}
    for i in range(grid.count):
        if i not in inside:
            lo, hi = grid.bounds(i)
            if hi - lo not in known:
                known[hi - lo] = algorithm.hexdigest(np.zeros((hi - lo) * itemsize, dtype=np.uint8))
            out[i] = known[hi - lo]
    return out


def _collect_own_leftovers(store: Store, r: int) -> None:
    """Abort uploads of this round's aggregate that a crashed earlier run left, idle for ``STALE_UPLOAD_S``."""
    try:
        for upload in store.collect_stale_uploads(STALE_UPLOAD_S, key=aggregate_key(r)):
            log.info("aborted stale upload %s of %s (idle %.0f s)", upload.upload_id, upload.key, upload.idle_s)
    except StoreError as exc:  # e.g. no permission to list multipart uploads: the round does not need it
        log.warning("could not collect stale uploads of %s: %s", aggregate_key(r), exc)


def _functions_of(config: AggregateConfig) -> tuple[str, ...]:
    """The functions a round's plans invoke (what the executor can start ahead)."""
    main = {"flat": "flat_reduce", "lambda-fl": "tree_reduce", "lifl": "tree_reduce"}.get(config.topology,
                                                                                          "shard_reduce")
    phases: tuple[str, ...] = ("client_norms",) if config.central_dp is not None else ()
    phase = phase_function(parse_reducer(config.reducer).name)
    return (main, *phases, *((phase,) if phase is not None else ()))


def aggregate_round(store: Store, r: int, executor: Executor, config: AggregateConfig | None = None,
                    on_done: ProgressCallback | None = None) -> AggregateResult:
    """Aggregate round ``r`` and publish ``rounds/<r>/aggregate.safetensors``; reports go to ``reports.json``."""
    config = config or AggregateConfig()
    started = time.perf_counter()
    executor.prestart(_functions_of(config), store)  # the runtime starts while the round is validated
    _collect_own_leftovers(store, r)
    manifest = prepare_round(store, r, config.policy, config.weighting, config.weights,
                             require_signatures=config.require_signatures)
    check_reducer(config, manifest)
    config = config.for_executor(executor, most_shards(manifest, config.partition))
    log.info("round %d: %d client updates accepted, %d rejected; %s topology, reducer %s, weighting %s", r,
             len(manifest.clients), len(manifest.rejected), config.topology, config.reducer, config.weighting)
    history: list[InvocationReport] = []
    noise = None
    reducer = parse_reducer(config.reducer)
    phase = phase_of(reducer.name)
    if phase is not None:  # phase 1 of a two-phase reducer: it changes the manifest for the reduction
        history.extend(phase(manifest, reducer, PhaseContext(
            store, executor, config.m if config.topology == "sharded" else 1, config.partition, on_done,
            config.policy)))
    if config.central_dp is not None:  # phase 1: exact norms, clip factors, the release in the ledger
        noise, norm_reports = central.prepare_round(store, manifest, config.central_dp, executor,
                                                    shards=config.m if config.topology == "sharded" else 1,
                                                    partition=config.partition, on_done=on_done,
                                                    policy=config.policy)
        history.extend(norm_reports)
    for run in range(1, len(manifest.clients) + 2):
        plan, reports, published, ran_on = _run_once(store, manifest, config, executor, on_done, noise)
        history.extend(reports)
        log.info("round %d, run %d: %d of %d invocations ok in %.2f s; %s", r, run,
                 sum(rep.ok for rep in reports), len(plan.invocations), time.perf_counter() - started,
                 "published " + aggregate_key(r) if published else "bad updates found: run again without them")
        if published:
            result = AggregateResult(r, aggregate_key(r), manifest, plan, reports, run,
                                     time.perf_counter() - started, history)
            write_manifest(store, manifest, unless=ran_on)
            store.put(reports_key(r), json.dumps(
                {"summary": result.summary(), "plan": plan.to_dict(),
                 "reports": [rep.model_dump(mode="json") for rep in reports]}, indent=1).encode())
            return result
    raise RoundError(f"round {r} kept finding bad updates; rejected: {manifest.rejected}")
