"""GradsSharding: M independent shard functions, each averaging one contiguous range across all clients."""

from __future__ import annotations

from typing import Literal

import numpy as np

from gradshard.aggregation.contracts import ShardReduceArgs
from gradshard.core.shards import ShardPlan
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


def sharded_plan(manifest: RoundManifest, manifest_sha256: str, output: PlanOutput, options: ReduceOptions,
                 m: int, partition: Partition = "contiguous") -> Plan:
    """One ``shard_reduce`` invocation per shard; each needs memory for its window, not the model."""
    shards = shard_plan_for(manifest, m, partition)
    layout = manifest.spec.model_layout()
    itemsize = np.dtype(layout.flat_dtype).itemsize
    invocations = []
    for s, (start, stop) in enumerate(shards.ranges):
        window = min(options.window_elems(itemsize), stop - start)
        args = ShardReduceArgs(round=output.round_ref(manifest_sha256), output=output.target(),
                               settings=options.settings(), start=start, stop=stop)
        memory = reduce_memory(manifest, options, window, options.parallel_reads)
        invocations.append(Invocation(f"shard-{s:04d}", "shard_reduce", args, memory))
    return Plan("sharded", tuple(invocations), {"m": m, "shards": shards.manifest()})
