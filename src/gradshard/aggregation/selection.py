"""The selection phase of ``krum:f``, ``multi-krum:f,k`` and ``bulyan:f`` (aggregation contract v2, two phases).

Phase 1 runs ``pairwise_distances`` over the round's shards (:mod:`gradshard.aggregation.distances`); the driver
adds the per-chunk partials exactly into the N×N matrix of squared distances (the same bytes for every M), applies
the rule (:mod:`gradshard.core.selection`) and takes the clients not selected out of the round, each with its reason
and score. The matrix, the scores and the selection are stored in ``rounds/<r>/selection.json`` and pinned by the
manifest. Phase 2 is the round's ordinary plan over the selected clients, with the reducer's kernel (the weighted
mean for Krum and Multi-Krum; Bulyan's closest-to-the-median mean).

A client whose data fails a digest or holds NaN/inf fails phase 1 naming it; under policy ``skip`` it is rejected
and the phase runs again without it (every client then compared with the same, valid set).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import TYPE_CHECKING

import numpy as np

from gradshard.aggregation.chunks import padded_width
from gradshard.aggregation.contracts import RoundRef
from gradshard.aggregation.distances import DistanceArgs, DistanceResult, combine_distances
from gradshard.aggregation.phases import PhaseContext, register_phase, reject_bad_updates
from gradshard.core import selection
from gradshard.core.checksum import ChunkGrid
from gradshard.core.reducers import ReducerSpec
from gradshard.errors import RoundError
from gradshard.format.keys import manifest_key, selection_key
from gradshard.format.round import RoundManifest, write_manifest
from gradshard.runtime.executor import Executor, ProgressCallback
from gradshard.runtime.registry import parse_result
from gradshard.store import Store
from gradshard.topology.base import Invocation, Plan
from gradshard.topology.common import FUNCTION_OVERHEAD_BYTES
from gradshard.topology.sharded import Partition, shard_plan_for

if TYPE_CHECKING:
    from gradshard.runtime.report import InvocationReport

log = logging.getLogger(__name__)


def distances_plan(manifest: RoundManifest, manifest_sha256: str, shards: int, partition: Partition) -> Plan:
    """Phase 1: one ``pairwise_distances`` invocation per shard of the round's partition."""
    spec = manifest.spec
    n, chunk = len(manifest.clients), spec.chunk_elems
    itemsize = np.dtype(spec.model_layout().flat_dtype).itemsize
    width = padded_width(chunk)
    memory = chunk * itemsize + (2 * n - 1) * width * 8 + FUNCTION_OVERHEAD_BYTES  # one chunk, rows, differences
    ref = RoundRef(manifest_key=manifest_key(manifest.round), manifest_sha256=manifest_sha256)
    invocations = tuple(
        Invocation(f"distances-{s:04d}", "pairwise_distances", DistanceArgs(round=ref, start=a, stop=b),
                   memory + len(range(a, b, chunk)) * (n * (n - 1) // 2) * 8 * 3)  # partials, base64
        for s, (a, b) in enumerate(shard_plan_for(manifest, shards, partition).ranges))
    return Plan("selection-distances", invocations, {"m": shards})


def select(spec: ReducerSpec, d: np.ndarray) -> tuple[list[int], list[float]]:
    """The selected positions (canonical order) and every client's Krum score on the whole matrix."""
    if spec.name == "krum":
        chosen = selection.krum(d, spec.f)
    elif spec.name == "multi-krum":
        chosen = selection.multi_krum(d, spec.f, spec.k)
    else:
        chosen = selection.bulyan(d, spec.f)
    return chosen, selection.krum_scores(d, spec.f)


def _distances(store: Store, manifest: RoundManifest, executor: Executor, shards: int, partition: Partition,
               on_done: ProgressCallback | None, policy: str, history: list[InvocationReport]) -> np.ndarray:
    """Run phase 1 until no client fails it; the exact distance matrix of the remaining clients."""
    for _ in range(len(manifest.clients) + 1):
        sha = write_manifest(store, manifest)
        plan = distances_plan(manifest, sha, shards, partition)
        reports = executor.run(plan, store, on_done)
        history.extend(reports)
        if reject_bad_updates(manifest, reports, policy):
            continue
        failed = [r for r in reports if not r.ok]
        if failed or len(reports) != len(plan.invocations):
            why = "; ".join(f"{r.invocation}: {r.error_type}: {r.error}" for r in failed)
            raise RoundError(f"round {manifest.round}: the distance phase failed: {why or 'not every shard ran'}")
        grid = ChunkGrid(manifest.spec.model_layout().numel, manifest.spec.chunk_elems)
        results = [parse_result("pairwise_distances", r.result, DistanceResult) for r in reports]
        return combine_distances(results, grid.count, len(manifest.clients))
    raise RoundError(f"round {manifest.round} kept finding bad updates; rejected: {manifest.rejected}")


def select_round(manifest: RoundManifest, spec: ReducerSpec, run: PhaseContext) -> list[InvocationReport]:
    """Phase 1 and the selection: the clients not selected leave ``manifest`` (with their score in the reason)."""
    history: list[InvocationReport] = []
    store = run.store
    d = _distances(store, manifest, run.executor, run.shards, run.partition, run.on_done, run.policy, history)
    clients = [c.client for c in manifest.clients]
    chosen, scores = select(spec, d)
    record = json.dumps({"reducer": spec.text, "clients": clients, "distances": d.tolist(),
                         "krum_scores": scores, "selected": [clients[i] for i in chosen]},
                        allow_nan=False).encode()
    store.put(selection_key(manifest.round), record)
    for i in sorted(set(range(len(clients))) - set(chosen)):
        manifest.reject(clients[i], f"not selected by {spec.text} (Krum score {scores[i]:.6g}; selected "
                                    f"{len(chosen)} of {len(clients)})")
    manifest.selection = {"reducer": spec.text, "selected": [clients[i] for i in chosen],
                          "record": selection_key(manifest.round),
                          "record_sha256": hashlib.sha256(record).hexdigest()}
    log.info("round %d: %s selected %s of %d clients", manifest.round, spec.text,
             [clients[i] for i in chosen][:8], len(clients))
    return history


for _name in ("krum", "multi-krum", "bulyan"):
    register_phase(_name, select_round, "pairwise_distances")
