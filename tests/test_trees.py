"""Tree baselines (λ-FL, LIFL): FedAvg through weighted partials, the paper's plan shapes, shared-memory locality,
whole-model memory, faults and eager leaves.

Most tests run in-process (MemoryStore or LocalStore + InlineExecutor; LIFL's node stores are LocalStores under
/dev/shm made by the driver). The integration test runs the trees as worker processes.
"""

from __future__ import annotations

import re
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import gradshard.aggregation.driver as aggregate_mod
from gradshard.aggregation.driver import AggregateConfig, AggregateResult, aggregate_round
from gradshard.core.layout import ModelLayout
from gradshard.core.reduce import fedavg, fedavg_weights
from gradshard.core.zoo import synthetic
from gradshard.demo.synthetic import make_round as make_synthetic_round
from gradshard.errors import InvocationError, PlanError, RoundError
from gradshard.format.keys import aggregate_key, manifest_key, round_prefix, update_key
from gradshard.format.round import ClientEntry, RoundManifest, RoundSpec, open_round
from gradshard.format.update import UpdateMeta, read_flat
from gradshard.format.writer import write_update
from gradshard.runtime import InlineExecutor, LocalExecutor
from gradshard.runtime.executor import Executor, ProgressCallback
from gradshard.runtime.report import InvocationReport
from gradshard.store import LocalStore, MemoryStore, Store
from gradshard.topology import Invocation, Plan, PlanOutput, ReduceOptions, check_fits, sharded_plan
from gradshard.topology.hierarchical import cube_root_ceil, default_placement, lifl_plan
from gradshard.topology.tree import lambda_fl_plan

R = 0
NUMEL = 777  # not a multiple of the chunk or of the tensor size
CHUNK = 64
TENSOR = 300
EXAMPLES7 = [1, 1000, 3, 50, 7, 7, 900]  # very unequal weights: a mean of means is far from FedAvg
RTOL = 1e-5
MIB = 1 << 20


def name(i: int) -> str:
    return f"c{i:02d}"


# --- rounds --------------------------------------------------------------------------------------------------------
@dataclass
class TreeRound:
    """A round in a store, with the clients' vectors kept for the reference computations."""

    store: Store
    layout: ModelLayout
    vectors: dict[str, npt.NDArray[np.float32]]
    examples: dict[str, int]
    r: int = R

    def counts(self, weighting: str) -> dict[str, int]:
        return {c: (n if weighting == "examples" else 1) for c, n in self.examples.items()}

    def reference(self, weighting: str, *, without: Sequence[str] = ()) -> npt.NDArray[np.float64]:
        """FedAvg in float64 (gradshard.core.reduce.fedavg) over the clients in canonical order."""
        clients = sorted(c for c in self.vectors if c not in without)
        weights = fedavg_weights([self.examples[c] for c in clients], weighting)
        return fedavg([self.vectors[c] for c in clients], weights, "float64")

    def aggregate(self) -> npt.NDArray[np.float32]:
        """The published aggregate (every chunk's checksum verified)."""
        return read_flat(self.store, aggregate_key(self.r), self.layout, "aggregate")

    def atol(self) -> float:
        """Float32 tolerance scaled to the data: a few ulps of the largest input, times a safety margin."""
        return RTOL * max(float(np.abs(v).max()) for v in self.vectors.values())

    def run(self, executor: Executor, **config: Any) -> tuple[AggregateResult, npt.NDArray[np.float32]]:
        res = aggregate_round(self.store, self.r, executor, AggregateConfig(**config))
        return res, self.aggregate()

    def path(self, client: str) -> Path:
        assert isinstance(self.store, LocalStore)
        return self.store.root / update_key(self.r, client)


def make_round(store: Store, examples: Sequence[int], *, seed: int = 0, numel: int = NUMEL) -> TreeRound:
    """Clients ``c00, c01, ...``; client i's values sit around an offset of ``3 (i + 1)``, so re-weighting shows."""
    layout = synthetic(numel, tensor_elems=TENSOR)
    open_round(store, RoundSpec.create(R, layout, chunk_elems=CHUNK))
    rng = np.random.default_rng(seed)
    rnd = TreeRound(store, layout, {}, {})
    for i, n in enumerate(examples):
        c = name(i)
        vec = (3.0 * (i + 1) + rng.standard_normal(numel) * (1 + i % 4)).astype(np.float32)
        rnd.vectors[c], rnd.examples[c] = vec, n
        write_update(store, update_key(R, c), layout, vec, UpdateMeta(
            client=c, round=R, examples=n, layout_digest=layout.digest(), chunk_elems=CHUNK))
    return rnd


class RecordingExecutor(InlineExecutor):
    """An InlineExecutor that remembers every plan it ran (to find the node stores of every run afterwards)."""

    def __init__(self) -> None:
        super().__init__()
        self.plans: list[Plan] = []

    def run(self, plan: Plan, store: Store, on_done: ProgressCallback | None = None) -> list[InvocationReport]:
        self.plans.append(plan)
        return super().run(plan, store, on_done)


# --- the tree's arithmetic, recomputed from the plan --------------------------------------------------------------
def producers(plan: Plan) -> dict[str, str]:
    """Partial key -> id of the invocation that writes it."""
    return {inv.args.output.key: inv.id for inv in plan.invocations if inv.args.output}


def tree_weights(plan: Plan, counts: dict[str, int], *, mean_of_means: bool) -> tuple[npt.NDArray[np.float64],
                                                                                     dict[str, float]]:
    """Each client's effective weight in the root's result (over sorted clients), and every node's weight.

    Weighted partials: a node passes ``(S, W) = (Σ nᵢ eᵢ, Σ nᵢ)`` up and the root divides. Mean of means (the
    published reimplementation): a node passes its *mean* up, and a parent averages its children's means plainly.
    """
    clients = sorted(counts)
    index = {c: i for i, c in enumerate(clients)}
    made = producers(plan)
    sums: dict[str, tuple[npt.NDArray[np.float64], float]] = {}
    for inv in plan.invocations:  # dependency order
        s, w = np.zeros(len(clients)), 0.0
        for c in inv.args.clients:
            s[index[c]] += counts[c]
            w += counts[c]
        for ref in inv.args.partials:
            child_s, child_w = sums[made[ref.key]]
            if mean_of_means:
                s, w = s + child_s / child_w, w + 1.0
            else:
                s, w = s + child_s, w + child_w
        sums[inv.id] = (s, w)
    roots = [inv.id for inv in plan.invocations if not inv.args.output]
    assert len(roots) == 1, f"a tree has one root, found {roots}"
    s, w = sums[roots[0]]
    return s / w, {k: v[1] for k, v in sums.items()}


def check_coverage(plan: Plan, clients: Sequence[str]) -> None:
    """Every client is folded by exactly one leaf, and every partial is consumed exactly once."""
    folded = [c for inv in plan.invocations for c in inv.args.clients]
    assert sorted(folded) == sorted(clients)
    consumed = [ref.key for inv in plan.invocations for ref in inv.args.partials]
    assert sorted(consumed) == sorted(producers(plan))


def check_tree_is_fedavg(rnd: TreeRound, res: AggregateResult, tree: npt.NDArray[np.float32],
                         flat: npt.NDArray[np.float32], weighting: str, *, discriminating: bool | None = True) -> bool:
    """The tree's aggregate equals flat and float64 FedAvg; the same tree averaging means would not.

    ``discriminating``: True asserts that the mean of means is far from FedAvg for this grouping (a fixed case
    chosen to be unequal); None asserts it whenever the mean of means re-weights any client noticeably.
    Returns whether the mean-of-means check was made.
    """
    clients = [c.client for c in res.manifest.clients]
    counts = {c: rnd.counts(weighting)[c] for c in clients}
    plan = res.plan
    check_coverage(plan, clients)
    atol = rnd.atol()
    np.testing.assert_allclose(tree, flat, rtol=RTOL, atol=atol)
    np.testing.assert_allclose(tree, rnd.reference(weighting, without=tuple(res.manifest.rejected)), rtol=RTOL,
                               atol=atol)
    # The partials carry weights: every node reports Σ nᵢ of the clients below it (a mean of means would lose it).
    fedavg_w = np.array(fedavg_weights([rnd.examples[c] for c in sorted(clients)], weighting))
    weighted, node_weight = tree_weights(plan, counts, mean_of_means=False)
    np.testing.assert_allclose(weighted, fedavg_w, rtol=1e-12)
    for report in res.reports:
        assert report.ok, report.error
        assert report.result["weight"] == node_weight[report.invocation], report.invocation
    # The same grouping with a plain mean at each level is not FedAvg, and the tolerance above would catch it.
    mom_w, _ = tree_weights(plan, counts, mean_of_means=True)
    matrix = np.stack([rnd.vectors[c].astype(np.float64) for c in sorted(clients)])
    mean_of_means = mom_w @ matrix
    if discriminating or (discriminating is None and np.abs(mom_w - fedavg_w).sum() > 1e-3):
        assert not np.allclose(mean_of_means, flat, rtol=RTOL, atol=atol)
        assert np.abs(mean_of_means - flat).max() > 100 * atol
        return True
    return False


# --- 1. trees are FedAvg, not a mean of means ---------------------------------------------------------------------
TREE_CASES = [
    {"topology": "lambda-fl"},  # k = ceil(sqrt 7) = 3: groups 3, 3, 1
    {"topology": "lambda-fl", "group_size": 2},  # 4 leaves > k: an extra combining level
    {"topology": "lambda-fl", "group_size": 4},
    {"topology": "lifl", "nodes": 1},
    {"topology": "lifl", "nodes": 2},
    {"topology": "lifl", "nodes": 3},
    {"topology": "lifl", "nodes": 2, "branching": 3},
    {"topology": "lifl", "nodes": 3, "accumulate": "float64"},
]


@pytest.mark.parametrize("weighting", ["examples", "uniform"])
@pytest.mark.parametrize("case", TREE_CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_tree_equals_flat_fedavg_not_mean_of_means(case: dict[str, Any], weighting: str) -> None:
    # Prepare: seven clients with very unequal example counts
    rnd = make_round(MemoryStore(), EXAMPLES7, seed=7)
    executor = InlineExecutor()
    accumulate = case.get("accumulate", "float32")
    # Execute
    _, flat = rnd.run(executor, topology="flat", weighting=weighting, accumulate=accumulate)
    res, tree = rnd.run(executor, weighting=weighting, **case)
    # Assert
    assert res.plan.topology == case["topology"]
    assert res.manifest.rejected == {}
    check_tree_is_fedavg(rnd, res, tree, flat, weighting)


def test_lambda_fl_k2_adds_levels_and_stays_fedavg() -> None:
    # Prepare
    rnd = make_round(MemoryStore(), [*EXAMPLES7, 13, 2, 400], seed=3)
    executor = InlineExecutor()
    # Execute
    _, flat = rnd.run(executor, topology="flat")
    res, tree = rnd.run(executor, topology="lambda-fl", group_size=2)
    # Assert: 10 clients -> 5 leaves -> 3 -> 2 -> root
    assert res.plan.levels == 4
    assert [len(s) for s in res.plan.stages()] == [5, 3, 2, 1]
    check_tree_is_fedavg(rnd, res, tree, flat, "examples")


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("topology", ["lambda-fl", "lifl"])
def test_trees_of_one_or_two_clients(topology: str, n: int) -> None:
    # Prepare
    rnd = make_round(MemoryStore(), [900, 3][:n], seed=n)
    executor = InlineExecutor()
    # Execute
    _, flat = rnd.run(executor, topology="flat")
    res, tree = rnd.run(executor, topology=topology, nodes=3)
    # Assert: λ-FL has one leaf; LIFL one leaf per client here (one client per node), none on the empty node 2
    leaves = [inv for inv in res.plan.invocations if inv.args.clients]
    assert len(leaves) == (1 if topology == "lambda-fl" else n)
    assert all(inv.node < n for inv in res.plan.invocations)
    check_tree_is_fedavg(rnd, res, tree, flat, "examples", discriminating=False)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 30), data=st.data())
def test_trees_are_fedavg_for_random_rounds(n: int, data: st.DataObject) -> None:
    # Prepare
    examples = data.draw(st.lists(st.integers(1, 1000), min_size=n, max_size=n), label="examples")
    weighting = data.draw(st.sampled_from(["examples", "uniform"]), label="weighting")
    k = data.draw(st.none() | st.integers(2, 6), label="group_size")
    branching = data.draw(st.none() | st.integers(2, 5), label="branching")
    nodes = data.draw(st.integers(1, 3), label="nodes")
    rnd = make_round(MemoryStore(), examples, seed=n, numel=300)
    executor = InlineExecutor()
    # Execute
    _, flat = rnd.run(executor, topology="flat", weighting=weighting)
    lam, lam_tree = rnd.run(executor, topology="lambda-fl", weighting=weighting, group_size=k)
    lifl, lifl_tree = rnd.run(executor, topology="lifl", weighting=weighting, branching=branching, nodes=nodes)
    # Assert
    for topology, (res, tree) in {"lambda-fl": (lam, lam_tree), "lifl": (lifl, lifl_tree)}.items():
        if check_tree_is_fedavg(rnd, res, tree, flat, weighting, discriminating=None):
            event(f"{topology}: a mean of means would differ")


# --- 2. plan shapes match the paper -------------------------------------------------------------------------------
OUTPUT = PlanOutput(manifest_key(R), aggregate_key(R), "0123456789abcdef" * 2, 0)


def fake_manifest(n: int, layout: ModelLayout | None = None, *, chunk: int | None = CHUNK) -> RoundManifest:
    """A validated-looking manifest for planning only (no objects behind it)."""
    layout = layout or synthetic(NUMEL, tensor_elems=TENSOR)
    spec = RoundSpec.create(R, layout, chunk_elems=chunk)
    clients = [ClientEntry(client=name(i), key=update_key(R, name(i)), examples=i + 1, header_sha256="0" * 64,
                           size=layout.nbytes) for i in range(n)]
    return RoundManifest(round=R, spec=spec, clients=clients)


def fake_nodes(k: int) -> list[dict[str, Any]]:
    return [{"kind": "local", "root": f"/nonexistent/gradshard-test/node-{j}", "fsync": False} for j in range(k)]


def plan_lifl(manifest: RoundManifest, nodes: int, **kw: Any) -> Plan:
    return lifl_plan(manifest, "0" * 64, OUTPUT, ReduceOptions(), node_stores=fake_nodes(nodes), **kw)


def kinds(plan: Plan) -> dict[str, int]:
    out: dict[str, int] = {}
    for inv in plan.invocations:
        kind = "top" if inv.id == "top" else inv.id.split("-")[1]
        out[kind] = out.get(kind, 0) + 1
    return out


def test_lambda_fl_n20_is_the_papers_tree() -> None:
    # Prepare
    manifest = fake_manifest(20)
    # Execute
    plan = lambda_fl_plan(manifest, "0" * 64, OUTPUT, ReduceOptions())
    # Assert: k = ceil(sqrt 20) = 5, 4 leaves of 5 clients + 1 root, two levels
    assert plan.params == {"k": 5, "leaves": 4}
    assert [inv.id for inv in plan.invocations] == ["leaf-0000", "leaf-0001", "leaf-0002", "leaf-0003", "root"]
    assert plan.levels == 2
    assert all(len(inv.args.clients) == 5 for inv in plan.invocations[:4])
    assert len(plan.invocations[-1].args.partials) == 4
    check_coverage(plan, [c.client for c in manifest.clients])


def test_lambda_fl_small_k_adds_levels() -> None:
    # Prepare
    manifest = fake_manifest(100)
    # Execute
    plan = lambda_fl_plan(manifest, "0" * 64, OUTPUT, ReduceOptions(), k=3)
    # Assert: 34 leaves -> 12 -> 4 -> 2 -> root; every node folds at most k inputs
    assert plan.params["leaves"] == 34
    assert plan.levels > 2
    assert [len(s) for s in plan.stages()] == [34, 12, 4, 2, 1]
    for inv in plan.invocations:
        assert 1 <= len(inv.args.clients) + len(inv.args.partials) <= 3
    check_coverage(plan, [c.client for c in manifest.clients])


def test_lambda_fl_rejects_k1_for_several_clients() -> None:
    with pytest.raises(PlanError, match="k >= 2"):
        lambda_fl_plan(fake_manifest(5), "0" * 64, OUTPUT, ReduceOptions(), k=1)


def test_lifl_n20_one_node_is_the_papers_tree() -> None:
    # Prepare
    manifest = fake_manifest(20)
    # Execute
    plan = plan_lifl(manifest, 1)
    # Assert: branching max(2, ceil(20^(1/3))) = 3: 7 leaves + 3 middles + 1 top, three levels, all on node 0
    assert plan.params["branching"] == 3
    assert kinds(plan) == {"leaf": 7, "middle": 3, "top": 1}
    assert len(plan.invocations) == 11
    assert plan.levels == 3
    assert {inv.node for inv in plan.invocations} == {0}
    assert plan.params["store_handoffs"] == 0
    assert plan.params["shm_handoffs"] == 7 + 3
    check_coverage(plan, [c.client for c in manifest.clients])


@pytest.mark.parametrize(("n", "b"), [(1, 2), (2, 2), (7, 2), (8, 2), (9, 3), (27, 3), (28, 4), (64, 4), (65, 5),
                                     (200, 6), (1000, 10), (1001, 11)])
def test_lifl_default_branching(n: int, b: int) -> None:
    assert plan_lifl(fake_manifest(n), 1).params["branching"] == b


@pytest.mark.parametrize("b", [2, 3, 4, 10, 100, 12345])
def test_cube_root_ceil_exact_at_and_around_cubes(b: int) -> None:
    assert cube_root_ceil(b**3) == b
    assert cube_root_ceil(b**3 - 1) == b
    assert cube_root_ceil(b**3 + 1) == b + 1


def test_cube_root_ceil_small() -> None:
    assert [cube_root_ceil(n) for n in range(1, 10)] == [1, 2, 2, 2, 2, 2, 2, 2, 3]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 10**30))
def test_cube_root_ceil_is_the_smallest_b_with_b_cubed_at_least_n(n: int) -> None:
    b = cube_root_ceil(n)
    assert b**3 >= n
    assert (b - 1) ** 3 < n


# --- 3. shared-memory hand-offs stay within a node ----------------------------------------------------------------
def check_locality(plan: Plan, node_stores: Sequence[dict[str, Any]], placement: dict[str, int]) -> None:
    """shm only between aggregators of one node, store only across nodes; top on the node with most middles."""
    by_id = {inv.id: inv for inv in plan.invocations}
    made = producers(plan)
    shm = store = 0
    for inv in plan.invocations:
        assert inv.args.node_store == node_stores[inv.node], inv.id
        assert all(placement[c] == inv.node for c in inv.args.clients), inv.id
        for ref in inv.args.partials:
            producer = by_id[made[ref.key]]
            assert producer.args.output.via == ref.via
            if ref.via == "shm":
                shm += 1
                assert producer.node == inv.node, (producer.id, inv.id)
            else:
                assert ref.via == "store"
                store += 1
                assert producer.node != inv.node, (producer.id, inv.id)
    middles = [inv for inv in plan.invocations if "-middle-" in inv.id]
    per_node = {j: sum(1 for m in middles if m.node == j) for j in range(len(node_stores))}
    top = by_id["top"]
    assert plan.params["top_node"] == top.node
    assert per_node[top.node] == max(per_node.values())
    assert store == sum(1 for m in middles if m.node != top.node) == plan.params["store_handoffs"]
    assert shm == plan.params["shm_handoffs"]
    for inv in plan.invocations:  # leaves hand off through shm always; middles through store iff off the top's node
        if "-leaf-" in inv.id:
            assert inv.args.output.via == "shm"
        elif "-middle-" in inv.id:
            assert inv.args.output.via == ("shm" if inv.node == top.node else "store")


@pytest.mark.parametrize("nodes", [2, 3])
@pytest.mark.parametrize("n", [7, 20, 25])
def test_lifl_plan_keeps_shm_within_nodes(n: int, nodes: int) -> None:
    # Prepare
    manifest = fake_manifest(n)
    clients = [c.client for c in manifest.clients]
    # Execute
    plan = plan_lifl(manifest, nodes)
    # Assert
    assert plan.params["placement"] == default_placement(clients, nodes)
    check_coverage(plan, clients)
    check_locality(plan, fake_nodes(nodes), plan.params["placement"])


def test_lifl_top_goes_to_the_node_with_most_middles() -> None:
    # Prepare: node 2 holds 9 of 12 clients (5 leaves -> 3 middles with b = 2), nodes 0 and 1 one middle each
    manifest = fake_manifest(12)
    placement = {name(i): 2 for i in range(12)}
    placement.update({name(0): 0, name(5): 0, name(7): 1})
    # Execute
    plan = plan_lifl(manifest, 3, branching=2, placement=placement)
    # Assert
    assert plan.params["top_node"] == 2
    assert plan.params["placement"] == placement
    assert plan.params["store_handoffs"] == 2
    check_locality(plan, fake_nodes(3), placement)


@pytest.mark.parametrize("nodes", [2, 3])
def test_lifl_run_reads_and_writes_shared_memory(nodes: int) -> None:
    # Prepare
    rnd = make_round(MemoryStore(), [5, 17, 2, 300, 41, 9, 88, 1, 60, 12, 7, 250], seed=nodes)
    executor = InlineExecutor()
    # Execute
    _, flat = rnd.run(executor, topology="flat")
    res, tree = rnd.run(executor, topology="lifl", nodes=nodes, branching=2)
    # Assert
    check_tree_is_fedavg(rnd, res, tree, flat, "examples")
    plan = {inv.id: inv for inv in res.plan.invocations}
    node_stores = {inv.node: inv.args.node_store for inv in res.plan.invocations}
    assert sorted(node_stores) == list(range(nodes))
    check_locality(res.plan, [node_stores[j] for j in range(nodes)], res.plan.params["placement"])
    top_node = res.plan.params["top_node"]
    for report in res.reports:
        inv, shm = plan[report.invocation], report.result["shm"]
        if "-leaf-" in inv.id:  # leaves read updates from the object store and write only to shared memory
            assert report.puts == 0 and report.bytes_written == 0, inv.id
            assert report.bytes_read >= rnd.layout.nbytes * len(inv.args.clients)
            assert shm["puts"] > 0 and shm["bytes_written"] > rnd.layout.nbytes, inv.id
        elif "-middle-" in inv.id:  # middles read their leaves' partials from shared memory
            assert shm["gets"] > 0 and shm["bytes_read"] >= rnd.layout.nbytes * len(inv.args.partials), inv.id
            if inv.node == top_node:
                assert report.puts == 0 and report.bytes_written == 0, inv.id
            else:  # crossing to the top's node goes through the object store
                assert report.bytes_written > rnd.layout.nbytes, inv.id
                assert shm["puts"] == 0, inv.id
        else:
            assert shm["bytes_read"] >= rnd.layout.nbytes * sum(p.via == "shm" for p in inv.args.partials)
            assert shm["bytes_read"] > 0
            assert shm["puts"] == 0


def test_lifl_custom_placement_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a non-contiguous placement, handed to the planner the driver calls
    rnd = make_round(MemoryStore(), EXAMPLES7, seed=11)
    placement = {"c00": 2, "c01": 0, "c02": 2, "c03": 2, "c04": 1, "c05": 2, "c06": 2}  # node 2: 2 middles

    def placed_plan(*args: Any, **kwargs: Any) -> Plan:
        return lifl_plan(*args, placement=placement, **kwargs)

    monkeypatch.setattr(aggregate_mod, "lifl_plan", placed_plan)
    executor = InlineExecutor()
    # Execute
    _, flat = rnd.run(executor, topology="flat")
    res, tree = rnd.run(executor, topology="lifl", nodes=3, branching=2)
    # Assert
    assert res.plan.params["placement"] == placement
    for inv in res.plan.invocations:
        assert all(placement[c] == inv.node for c in inv.args.clients)
    assert res.plan.params["top_node"] == 2
    check_tree_is_fedavg(rnd, res, tree, flat, "examples")


@pytest.mark.parametrize(("placement", "message"), [
    ({"c00": 0, "c01": 1, "c02": 2}, "c02"),  # node out of range
    ({"c00": 0, "c01": -1, "c02": 1}, "c01"),
    ({"c00": 0, "c01": 1}, "c02"),  # a client without a node
])
def test_lifl_invalid_placement_is_a_plan_error(placement: dict[str, int], message: str) -> None:
    with pytest.raises(PlanError, match="placement") as info:
        plan_lifl(fake_manifest(3), 2, placement=placement)
    assert message in str(info.value)


def test_lifl_placement_ignores_clients_that_are_not_in_the_round() -> None:
    plan = plan_lifl(fake_manifest(3), 2, placement={"c00": 0, "c01": 1, "c02": 1, "rejected": 0})

    assert plan.params["placement"] == {"c00": 0, "c01": 1, "c02": 1}


# --- 4. a tree node needs the whole model -------------------------------------------------------------------------
BIG = 1 << 26  # 256 MiB of float32: planned only, never materialised


@pytest.fixture(scope="module")
def big_manifest() -> RoundManifest:
    return fake_manifest(16, synthetic(BIG), chunk=None)


def test_tree_nodes_need_the_whole_model_shards_do_not(big_manifest: RoundManifest) -> None:
    # Prepare
    model_bytes = BIG * 4
    # Execute
    trees = [lambda_fl_plan(big_manifest, "0" * 64, OUTPUT, ReduceOptions()),
             lambda_fl_plan(big_manifest, "0" * 64, OUTPUT, ReduceOptions(), k=2),
             plan_lifl(big_manifest, 2)]
    sharded = sharded_plan(big_manifest, "0" * 64, OUTPUT, ReduceOptions(), 16)
    # Assert
    for plan in trees:
        for inv in plan.invocations:
            assert inv.memory_bytes >= model_bytes, (plan.topology, inv.id)
        assert plan.peak_memory_bytes >= 2 * model_bytes  # accumulator + a whole update
    assert sharded.peak_memory_bytes * 10 < model_bytes
    assert sum(inv.memory_bytes for inv in sharded.invocations) < model_bytes


@pytest.mark.parametrize("topology", ["lambda-fl", "lifl"])
def test_check_fits_rejects_trees_under_a_model_sized_limit(big_manifest: RoundManifest, topology: str) -> None:
    # Prepare
    limit, baseline = BIG * 4, 64 * MIB
    tree = (lambda_fl_plan(big_manifest, "0" * 64, OUTPUT, ReduceOptions()) if topology == "lambda-fl"
            else plan_lifl(big_manifest, 2))
    sharded = sharded_plan(big_manifest, "0" * 64, OUTPUT, ReduceOptions(), 16)
    # Execute
    with pytest.raises(PlanError, match=re.escape(topology)) as info:
        check_fits(tree, limit, baseline)
    check_fits(sharded, limit, baseline)
    # Assert: the message names an invocation of the plan that needs the plan's peak
    named = re.search(r"invocation '([^']+)'", str(info.value))
    assert named is not None, str(info.value)
    worst = {inv.id: inv for inv in tree.invocations}[named.group(1)]
    assert worst.memory_bytes == tree.peak_memory_bytes
    check_fits(tree, tree.peak_memory_bytes + baseline, baseline)  # exactly enough fits
    check_fits(tree, None, baseline)


# --- 5. bad updates and cleanup in trees --------------------------------------------------------------------------
def corrupt(rnd: TreeRound, client: str) -> None:
    """Flip one byte in the middle of the client's data section (the header stays valid)."""
    path = rnd.path(client)
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + n + rnd.layout.nbytes // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x40]))


def poison(rnd: TreeRound, client: str) -> None:
    """A well-formed update (valid checksums) whose values contain NaN."""
    vec = rnd.vectors[client].copy()
    vec[NUMEL // 3] = np.nan
    write_update(rnd.store, update_key(R, client), rnd.layout, vec, UpdateMeta(
        client=client, round=R, examples=rnd.examples[client], layout_digest=rnd.layout.digest(), chunk_elems=CHUNK))


def check_scratch_removed(rnd: TreeRound, executor: RecordingExecutor) -> None:
    """No partial left in the object store, no shared-memory node directory left on the machine."""
    assert rnd.store.list(f"{round_prefix(R)}/partials/") == []
    roots = {Path(inv.args.node_store["root"]) for plan in executor.plans for inv in plan.invocations
             if inv.args.node_store}
    for root in roots:
        assert not root.exists(), root
        assert not root.parent.exists(), root.parent


@pytest.mark.parametrize("fault", ["bitflip", "nan"])
@pytest.mark.parametrize("case", [{"topology": "lambda-fl"}, {"topology": "lambda-fl", "group_size": 2},
                                  {"topology": "lifl", "nodes": 1}, {"topology": "lifl", "nodes": 2}],
                         ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_bad_update_is_skipped_in_trees(tmp_path: Path, case: dict[str, Any], fault: str) -> None:
    # Prepare: client c03 (50 examples) is bad at the data level, which only the leaf reading it can find
    rnd = make_round(LocalStore(tmp_path, fsync=False), EXAMPLES7, seed=5)
    (corrupt if fault == "bitflip" else poison)(rnd, "c03")
    executor = RecordingExecutor()
    # Execute
    res, tree = rnd.run(executor, **case)
    _, flat = rnd.run(InlineExecutor(), topology="flat")
    # Assert
    assert list(res.manifest.rejected) == ["c03"]
    assert ("checksum" if fault == "bitflip" else "non-finite") in res.manifest.rejected["c03"]
    assert res.runs == 2
    assert "c03" not in [c.client for c in res.manifest.clients]
    check_tree_is_fedavg(rnd, res, tree, flat, "examples")
    np.testing.assert_allclose(tree, rnd.reference("examples", without=["c03"]), rtol=RTOL, atol=rnd.atol())
    assert not np.allclose(tree, rnd.reference("examples"), rtol=RTOL, atol=rnd.atol())
    check_scratch_removed(rnd, executor)
    assert len(executor.plans) == 2


@pytest.mark.parametrize("topology", ["lambda-fl", "lifl"])
def test_bad_update_under_policy_fail_publishes_nothing(tmp_path: Path, topology: str) -> None:
    # Prepare
    rnd = make_round(LocalStore(tmp_path, fsync=False), EXAMPLES7, seed=6)
    corrupt(rnd, "c05")
    executor = RecordingExecutor()
    # Execute
    with pytest.raises(RoundError, match="c05"):
        aggregate_round(rnd.store, R, executor, AggregateConfig(topology=topology, policy="fail"))
    # Assert
    assert not rnd.store.exists(aggregate_key(R))
    check_scratch_removed(rnd, executor)
    uploads = tmp_path / ".uploads"
    assert not uploads.exists() or list(uploads.iterdir()) == []


# --- 6. eager leaves wait for late updates ------------------------------------------------------------------------
def arrive_late(monkeypatch: pytest.MonkeyPatch, rnd: TreeRound, client: str, delay_s: float | None,
                ) -> list[threading.Timer]:
    """After validation, the client's object disappears; it reappears (same bytes) ``delay_s`` later, or never.

    The driver validates headers before planning, so a late arrival is an object that the manifest lists but that
    is not (yet) in the store when the leaf starts.
    """
    real = aggregate_mod.prepare_round
    key = update_key(R, client)
    timers: list[threading.Timer] = []

    def prepare_then_vanish(store: Store, r: int, *args: Any, **kwargs: Any) -> RoundManifest:
        manifest = real(store, r, *args, **kwargs)
        if store.exists(key):
            blob = store.get(key)
            store.delete(key)
            if delay_s is not None:
                timer = threading.Timer(delay_s, store.put, (key, blob))
                timers.append(timer)
                timer.start()
        return manifest

    monkeypatch.setattr(aggregate_mod, "prepare_round", prepare_then_vanish)
    return timers


def test_eager_leaf_folds_a_late_update(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    rnd = make_round(MemoryStore(), EXAMPLES7, seed=9)
    _, flat = rnd.run(InlineExecutor(), topology="flat")
    timers = arrive_late(monkeypatch, rnd, "c05", 0.5)
    executor = RecordingExecutor()
    # Execute
    res, tree = rnd.run(executor, topology="lifl", nodes=2, wait_s=5)
    for timer in timers:
        timer.join()
    # Assert: the round waited for c05 and includes it
    assert len(timers) == 1
    assert "c05" in [c.client for c in res.manifest.clients]
    assert res.manifest.rejected == {}
    check_tree_is_fedavg(rnd, res, tree, flat, "examples")
    waiting = next(r for r in res.reports if "c05" in {inv.id: inv for inv in res.plan.invocations}[
        r.invocation].args.clients)
    assert waiting.duration_s >= 0.2  # it waited (had it not, it would have failed: 'did not arrive')
    check_scratch_removed(rnd, executor)


def test_late_update_that_never_arrives_fails_the_round(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    rnd = make_round(MemoryStore(), EXAMPLES7, seed=10)
    arrive_late(monkeypatch, rnd, "c02", None)
    executor = RecordingExecutor()
    # Execute
    with pytest.raises((InvocationError, RoundError), match="did not arrive within") as info:
        rnd.run(executor, topology="lifl", nodes=2, wait_s=0.3)
    # Assert
    assert "c02" in str(info.value)
    assert not rnd.store.exists(aggregate_key(R))
    check_scratch_removed(rnd, executor)


# --- integration: trees as worker processes -----------------------------------------------------------------------
@pytest.mark.integration
def test_trees_in_worker_processes_match_flat_and_hold_the_model(tmp_path: Path) -> None:
    # Prepare: an 8 MiB model, so a node holding it stands out against a streaming shard
    numel = 1 << 21
    rnd = make_round(LocalStore(tmp_path, fsync=False), [3, 500, 20, 1], seed=12, numel=numel)
    with LocalExecutor(workers=2, retries=0, timeout_s=120) as executor:
        # Execute
        _, flat = rnd.run(executor, topology="flat")
        sharded, _ = rnd.run(executor, topology="sharded", shards=4)
        lam, lam_tree = rnd.run(executor, topology="lambda-fl")
        lifl, lifl_tree = rnd.run(executor, topology="lifl", nodes=2)
    # Assert
    check_tree_is_fedavg(rnd, lam, lam_tree, flat, "examples")
    check_tree_is_fedavg(rnd, lifl, lifl_tree, flat, "examples")
    shard_peak = max(r.peak_rss_bytes or 0 for r in sharded.reports)
    for res in (lam, lifl):
        peaks = [r.peak_rss_bytes for r in res.reports]
        assert all(p is not None and p > 0 for p in peaks)
        assert max(p or 0 for p in peaks) - shard_peak >= rnd.layout.nbytes, res.plan.topology
    assert rnd.store.list(f"{round_prefix(R)}/partials/") == []


@pytest.mark.integration
def test_every_tree_node_stays_within_its_predicted_memory(tmp_path: Path) -> None:
    """A node holds its accumulator and one input at a time; a third full vector would exceed the prediction."""
    store = LocalStore(tmp_path, fsync=False)
    model = 1 << 24  # 64 MiB of float32
    make_synthetic_round(store, 0, synthetic(model), 5)

    with LocalExecutor(workers=2) as executor:
        [baseline] = executor.run(Plan("noop", (Invocation("noop", "noop", {}, 0),)), store)
        results = [aggregate_round(store, 0, executor, AggregateConfig(topology=t)) for t in ("lambda-fl", "lifl")]

    assert baseline.peak_rss_bytes is not None
    for report in (r for result in results for r in result.reports):
        assert report.peak_rss_bytes is not None and report.predicted_bytes is not None
        slack = model  # bytes: a quarter of one full vector
        assert report.peak_rss_bytes <= baseline.peak_rss_bytes + report.predicted_bytes + slack, report
