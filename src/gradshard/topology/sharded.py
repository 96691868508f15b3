"""GradsSharding: M independent shard functions, each averaging one contiguous range across all clients.

Coverage contract: when every client of the round trained only part of the model (each declares a coverage), the
reducer uses coverage (an element nobody trained gets 0: the updates are deltas and the round has no base model)
and no noise is added, the shards cover only the chunks some client trained (:func:`active_ranges`). The other
chunks of the aggregate are zeros that no function reads or writes: every store completes an upload with unwritten
bytes zero, and the driver supplies their digests (``plan.params["covered"]`` names the covered ranges). So a
block-wise round costs in proportion to its active blocks, not to the model.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from gradshard.aggregation.contracts import ShardReduceArgs
from gradshard.core.checksum import ChunkGrid
from gradshard.core.coverage import CoverageMap, covered_chunks
from gradshard.core.reducers import REDUCERS, parse_reducer
from gradshard.core.shards import ShardPlan, tensor_cuts
from gradshard.format.round import RoundManifest
from gradshard.topology.base import Invocation, Plan
from gradshard.topology.common import PlanOutput, ReduceOptions, reduce_memory

Partition = Literal["contiguous", "tensor-aligned"]


def shard_plan_for(manifest: RoundManifest, m: int, partition: Partition = "contiguous") -> ShardPlan:
    """The paper's partition (or one that cuts only between tensors), with inner boundaries on checksum chunks so
    each shard digests its own output chunks."""
    spec = manifest.spec
    if partition == "tensor-aligned":
        return ShardPlan.tensor_aligned(spec.model_layout(), m, align=spec.chunk_elems)
    return ShardPlan.contiguous(spec.model_layout().numel, m, align=spec.chunk_elems)


def most_shards(manifest: RoundManifest, partition: Partition = "contiguous") -> int:
    """The most shards ``partition`` can cut the round's model into (every shard a whole number of chunks)."""
    spec = manifest.spec
    layout = spec.model_layout()
    if partition == "tensor-aligned":
        return 1 + len(tensor_cuts(layout, spec.chunk_elems))
    return max(1, -(-layout.numel // spec.chunk_elems))


def active_ranges(manifest: RoundManifest, options: ReduceOptions) -> list[tuple[int, int]] | None:
    """The chunk-aligned ranges the shards must cover under the coverage contract (module docstring), or None when
    the whole vector must be reduced."""
    spec = manifest.spec
    if (not manifest.clients or any(not c.partial for c in manifest.clients) or spec.base_key
            or options.noise is not None or not REDUCERS[parse_reducer(options.reducer).name].uses_coverage):
        return None
    layout = spec.model_layout()
    maps = (CoverageMap(layout, c.coverage) for c in manifest.clients if c.coverage is not None)
    return covered_chunks(maps, ChunkGrid(layout.numel, spec.chunk_elems))


def split_ranges(ranges: list[tuple[int, int]], m: int, align: int) -> list[tuple[int, int]]:
    """About ``m`` chunk-aligned shards over ``ranges``: each range gets a share of ``m`` by its length (at least
    one shard, at most one per chunk), cut as the paper's partition cuts a vector."""
    total = sum(hi - lo for lo, hi in ranges)
    shards = []
    for lo, hi in ranges:
        k = min(max(1, round(m * (hi - lo) / total)), -(-(hi - lo) // align))
        shards += [(lo + a, lo + b) for a, b in ShardPlan.contiguous(hi - lo, k, align=align).ranges]
    return shards


def sharded_plan(manifest: RoundManifest, manifest_sha256: str, output: PlanOutput, options: ReduceOptions,
                 m: int, partition: Partition = "contiguous") -> Plan:
    """One ``shard_reduce`` invocation per shard; each needs memory for its window, not the model."""
    layout = manifest.spec.model_layout()
    active = active_ranges(manifest, options) if partition == "contiguous" else None
    if active is None:
        shards = shard_plan_for(manifest, m, partition)
        ranges, params = list(shards.ranges), {"m": m, "numel": layout.numel, "shards": shards.manifest()}
    elif not active:
        ranges, params = [], {"m": m, "numel": layout.numel, "covered": []}
    else:
        ranges = split_ranges(active, m, manifest.spec.chunk_elems)
        params = {"m": m, "numel": layout.numel, "covered": [list(r) for r in active],
                  "shard_ranges": [list(r) for r in ranges]}
    itemsize = np.dtype(layout.flat_dtype).itemsize
    invocations = []
    for s, (start, stop) in enumerate(ranges):
        window = min(options.window_elems(itemsize), stop - start)
        args = ShardReduceArgs(round=output.round_ref(manifest_sha256), output=output.target(),
                               settings=options.settings(), start=start, stop=stop)
        memory = reduce_memory(manifest, options, window, options.parallel_reads)
        invocations.append(Invocation(f"shard-{s:04d}", "shard_reduce", args, memory))
    return Plan("sharded", tuple(invocations), params)
