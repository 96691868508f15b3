"""LIFL: hierarchical aggregation (leaf, middle, top) with locality-aware placement and shared-memory hand-offs.

- **Placement.** Each client's update is on a node (where its upload landed: by default the sorted clients are
  split into contiguous, balanced blocks, one per node; or a given ``placement``). Leaves aggregate the clients of
  their own node, middles the leaves of their own node, and the top sits on the node with the most middles, so the
  only hand-offs that cross nodes are those of the other nodes' middles to the top.
- **Shared memory.** A hand-off between two aggregators on the same node goes through that node's shared-memory
  store (a directory in ``/dev/shm``, i.e. RAM pages that a consumer on the same machine maps without touching the
  object store); hand-offs across nodes go through the object store.
- **Eager aggregation.** A leaf folds each update into its running sum as soon as the update is there (waiting up to
  ``wait_s`` for late ones), holding one update at a time.
- **Warm aggregators.** Every aggregator has a ``warm_key`` (node, level, index); an executor that keeps warm
  workers runs the same aggregator of the next round in the same process.
- **Weighted partials,** never a mean of means (see :mod:`gradshard.aggregation.tree_functions`).

Branching defaults to ``max(2, ⌈N^(1/3)⌉)`` (N = 20 on one node: 7 leaves, 3 middles, 1 top, as in the paper).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gradshard.aggregation.contracts import PartialRef, TreeReduceArgs, Via
from gradshard.errors import PlanError
from gradshard.format.keys import partial_key
from gradshard.format.round import RoundManifest
from gradshard.store import LocalStore
from gradshard.topology.base import Invocation, Plan
from gradshard.topology.common import PlanOutput, ReduceOptions
from gradshard.topology.tree import groups, tree_args, tree_node_memory


def cube_root_ceil(n: int) -> int:
    """The smallest integer b with b³ >= n (exact, no float rounding)."""
    b = max(1, round(math.pow(n, 1 / 3)))
    while b**3 < n:
        b += 1
    while b > 1 and (b - 1) ** 3 >= n:
        b -= 1
    return b


def default_placement(clients: Sequence[str], nodes: int) -> dict[str, int]:
    """Sorted clients split into ``nodes`` contiguous, balanced blocks (the node each upload landed on)."""
    n = len(clients)
    return {c: min(nodes - 1, i * nodes // n) for i, c in enumerate(clients)}


@contextmanager
def node_memory(nodes: int) -> Iterator[list[dict[str, Any]]]:
    """One shared-memory store per node (directories in /dev/shm when it exists), removed afterwards."""
    parent = "/dev/shm" if Path("/dev/shm").is_dir() else None
    root = Path(tempfile.mkdtemp(prefix="gradshard-shm-", dir=parent))
    try:
        yield [LocalStore(root / f"node-{j}", fsync=False).spec() for j in range(nodes)]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def lifl_plan(manifest: RoundManifest, manifest_sha256: str, output: PlanOutput, options: ReduceOptions, *,
              node_stores: Sequence[dict[str, Any]], branching: int | None = None,
              placement: dict[str, int] | None = None, wait_s: float = 0.0) -> Plan:
    """Leaf, middle and top aggregators placed on ``len(node_stores)`` nodes."""
    clients = [c.client for c in manifest.clients]
    nodes = len(node_stores)
    if nodes < 1:
        raise PlanError("LIFL needs at least one node")
    b = branching or max(2, cube_root_ceil(len(clients)))
    if b < 2:
        raise PlanError(f"LIFL branching must be at least 2, got {b}")
    # Clients the placement knows but the round does not (rejected, or not sampled) are ignored.
    placement = {c: j for c, j in (placement or default_placement(clients, nodes)).items() if c in set(clients)}
    bad = {c: j for c, j in placement.items() if not 0 <= j < nodes}
    missing = sorted(set(clients) - set(placement))
    if bad or missing:
        raise PlanError(f"placement must put every client of the round on a node in [0, {nodes}); "
                        f"out of range: {bad}, missing: {missing}")
    leaf_mem, inner_mem = tree_node_memory(manifest, options, True), tree_node_memory(manifest, options, False)

    def key(name: str) -> str:
        return partial_key(manifest.round, output.upload_id, name)

    members = [[c for c in clients if placement[c] == node] for node in range(nodes)]
    n_middles = [math.ceil(math.ceil(len(m) / b) / b) for m in members]
    top_node = max(range(nodes), key=lambda j: (n_middles[j], -j))
    invocations: list[Invocation] = []
    middles: list[tuple[str, Via]] = []  # (id, how it hands off to the top)
    for node in range(nodes):
        leaves = []
        for g, group in enumerate(groups(members[node], b)):
            name = f"n{node}-leaf-{g:03d}"
            args = tree_args(manifest_sha256, output, options, clients=tuple(group),
                             output=PartialRef(key=key(name), via="shm"), node_store=node_stores[node], wait_s=wait_s)
            invocations.append(Invocation(name, "tree_reduce", args, leaf_mem, (), node, f"lifl/{node}/leaf/{g}"))
            leaves.append(name)
        via: Via = "shm" if node == top_node else "store"
        for g, children in enumerate(groups(leaves, b)):
            name = f"n{node}-middle-{g:03d}"
            args = tree_args(manifest_sha256, output, options,
                             partials=tuple(PartialRef(key=key(c), via="shm") for c in children),
                             output=PartialRef(key=key(name), via=via), node_store=node_stores[node])
            invocations.append(Invocation(name, "tree_reduce", args, inner_mem, tuple(children), node,
                                          f"lifl/{node}/middle/{g}"))
            middles.append((name, via))
    refs = tuple(PartialRef(key=key(n), via=v) for n, v in middles)
    args = tree_args(manifest_sha256, output, options, partials=refs, target=output.target(),
                     node_store=node_stores[top_node])
    invocations.append(Invocation("top", "tree_reduce", args, inner_mem, tuple(name for name, _ in middles), top_node,
                                  f"lifl/{top_node}/top"))
    shm_handoffs = sum(1 for inv in invocations if isinstance(inv.args, TreeReduceArgs)
                       for ref in inv.args.partials if ref.via == "shm")
    return Plan("lifl", tuple(invocations), {"branching": b, "nodes": nodes, "top_node": top_node,
                                             "placement": placement, "shm_handoffs": shm_handoffs,
                                             "store_handoffs": sum(1 for _, via in middles if via == "store")})
