"""λ-FL: a tree of aggregators. Leaves fold k client updates each into weighted partials, the root divides.

The paper's reimplementation: two levels, ``k = ⌈√N⌉`` clients per leaf, ``⌈N/k⌉`` leaves and one root. With a
smaller k, intermediate levels combine k partials each until at most k remain for the root. Every aggregator
holds full-size vectors, so each needs memory for the whole model.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gradshard.aggregation.contracts import PartialRef, TreeReduceArgs
from gradshard.errors import PlanError
from gradshard.format.keys import partial_key
from gradshard.format.round import RoundManifest
from gradshard.topology.base import Invocation, Plan
from gradshard.topology.common import PlanOutput, ReduceOptions, window_memory


def tree_node_memory(manifest: RoundManifest, options: ReduceOptions, has_clients: bool) -> int:
    """A tree node holds a full accumulator and one whole input: a client's update, or a child's partial sum."""
    layout = manifest.spec.model_layout()
    itemsize = np.dtype(layout.flat_dtype).itemsize
    held = itemsize if has_clients else max(itemsize, np.dtype(options.accumulate).itemsize)
    return window_memory(layout.numel, held, options.accumulate)


def groups(items: list[str], size: int) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def tree_args(manifest_sha256: str, upload: PlanOutput, options: ReduceOptions, /, **fields: Any) -> TreeReduceArgs:
    """One tree node's arguments; ``target`` (the aggregate's upload) is set for the root only."""
    return TreeReduceArgs(round=upload.round_ref(manifest_sha256), settings=options.settings(), **fields)


def lambda_fl_plan(manifest: RoundManifest, manifest_sha256: str, output: PlanOutput, options: ReduceOptions,
                   k: int | None = None) -> Plan:
    """Leaves of ``k`` clients (default ⌈√N⌉), combining levels of ``k`` partials, one root."""
    clients = [c.client for c in manifest.clients]
    k = k or max(1, math.ceil(math.sqrt(len(clients))))
    if k < 2 and len(clients) > 1:
        raise PlanError(f"a λ-FL group size k = {k} cannot reduce {len(clients)} clients; use k >= 2")
    def key(name: str) -> str:
        return partial_key(manifest.round, output.upload_id, name)

    invocations: list[Invocation] = []
    level: list[str] = []  # ids of the previous level's invocations
    for g, members in enumerate(groups(clients, k)):
        name = f"leaf-{g:04d}"
        args = tree_args(manifest_sha256, output, options, clients=tuple(members), output=PartialRef(key=key(name)))
        invocations.append(Invocation(name, "tree_reduce", args, tree_node_memory(manifest, options, True)))
        level.append(name)
    depth = 1
    while len(level) > k:
        nxt = []
        for g, children in enumerate(groups(level, k)):
            name = f"l{depth}-{g:04d}"
            args = tree_args(manifest_sha256, output, options, partials=tuple(PartialRef(key=key(c)) for c in children),
                             output=PartialRef(key=key(name)))
            invocations.append(Invocation(name, "tree_reduce", args, tree_node_memory(manifest, options, False),
                                          tuple(children)))
            nxt.append(name)
        level, depth = nxt, depth + 1
    args = tree_args(manifest_sha256, output, options, partials=tuple(PartialRef(key=key(c)) for c in level),
                     target=output.target())
    invocations.append(Invocation("root", "tree_reduce", args, tree_node_memory(manifest, options, False),
                                  tuple(level)))
    return Plan("lambda-fl", tuple(invocations), {"k": k, "leaves": len(groups(clients, k))})
