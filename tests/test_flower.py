"""The Flower integration: GradshardFedAvg equals Flower's FedAvg byte for byte (replies sorted by node id).

Expected values come from Flower's own ``aggregate_arrayrecords`` (what ``flwr.serverapp.strategy.FedAvg`` runs)
and from a Flower simulation with ``FedAvg``; gradshard's numbers are never the reference.
"""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from gradshard.errors import LayoutError
from gradshard.flower import GradshardFedAvg, client_id, write_reply
from gradshard.format.keys import update_key
from gradshard.store import LocalStore, MemoryStore, Store

NODES = [9_223_372_036_854_775_807, 17, 4_000_000_001, 250, 3]  # unsorted, as Flower's random node ids are
EXAMPLES = {9_223_372_036_854_775_807: 64, 17: 3, 4_000_000_001: 101, 250: 1, 3: 37}
SHAPES = {"conv.weight": (8, 3, 3, 3), "conv.bias": (8,), "fc.weight": (10, 1001), "fc.bias": (10,)}


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages made outside a Flower run need the identity a ServerApp process would have."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def examples(node: int) -> int:
    return EXAMPLES.get(node, 5)


def trained_arrays(node: int, dtype: str = "float32") -> ArrayRecord:
    rng = np.random.default_rng(node % 2**32)
    return ArrayRecord({name: Array(rng.standard_normal(shape).astype(dtype)) for name, shape in SHAPES.items()})


def global_arrays(dtype: str = "float32") -> ArrayRecord:
    return ArrayRecord({name: Array(np.zeros(shape, dtype=dtype)) for name, shape in SHAPES.items()})


class InProcessGrid:
    """The two Grid methods a strategy uses, running a train function in this process."""

    def __init__(self, nodes: list[int], train: Callable[[Message], Message]) -> None:
        self.nodes, self.train = nodes, train

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = [self.train(msg) for msg in messages]
        random.Random(len(replies)).shuffle(replies)  # arrival order must not matter
        return replies


def gradshard_client(store: Store | None, dtype: str = "float32",
                     ordinary: frozenset[int] = frozenset()) -> Callable[[Message], Message]:
    """A ClientApp train function adopting write_reply; nodes in ``ordinary`` reply the ordinary way."""

    def train(msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        arrays, metrics = trained_arrays(node, dtype), MetricRecord({"num-examples": examples(node)})
        if node in ordinary:
            return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)
        return write_reply(msg, arrays, metrics, store=store)

    return train


def flower_fedavg(nodes: list[int], dtype: str = "float32") -> ArrayRecord:
    """Flower's FedAvg of the clients' ordinary replies, sorted by node id."""
    contents = [RecordDict({"arrays": trained_arrays(n, dtype), "metrics": MetricRecord({"num-examples": examples(n)})})
                for n in sorted(nodes)]
    return aggregate_arrayrecords(contents, "num-examples")


def run_round(strategy: GradshardFedAvg, train: Callable[[Message], Message], dtype: str = "float32",
              mutate: Callable[[list[Message]], None] | None = None, nodes: list[int] = NODES) -> ArrayRecord | None:
    grid = InProcessGrid(nodes, train)
    strategy.min_train_nodes = strategy.min_available_nodes = len(nodes)
    messages = strategy.configure_train(1, global_arrays(dtype), ConfigRecord(), grid)  # type: ignore[arg-type]
    replies = grid.send_and_receive(messages)
    if mutate is not None:
        mutate(replies)
    arrays, _ = strategy.aggregate_train(1, replies)
    return arrays


def assert_same_bytes(actual: ArrayRecord | None, expected: ArrayRecord) -> None:
    assert actual is not None
    assert list(actual.keys()) == list(expected.keys())
    for name, want in expected.items():
        got, ref = actual[name].numpy(), want.numpy()
        assert (got.dtype, got.shape) == (ref.dtype, ref.shape), name
        assert got.tobytes() == ref.tobytes(), f"{name}: {np.count_nonzero(got != ref)} elements differ"


# --- byte equality ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shards", [1, 2, 3, 8])
def test_references_aggregate_to_flowers_fedavg_bytes_for_every_m(shards: int) -> None:
    # Prepare
    store = MemoryStore()
    strategy = GradshardFedAvg(store, shards=shards)
    # Execute
    arrays = run_round(strategy, gradshard_client(store))
    # Assert
    assert_same_bytes(arrays, flower_fedavg(NODES))
    assert strategy.failures[1] == []
    assert store.exists(update_key(1, client_id(17)))


@pytest.mark.parametrize("shards", [1, 3])
def test_ordinary_replies_and_mixed_replies_aggregate_to_the_same_bytes(shards: int) -> None:
    for ordinary in (frozenset(NODES), frozenset(NODES[::2])):
        store = MemoryStore()
        arrays = run_round(GradshardFedAvg(store, shards=shards), gradshard_client(store, ordinary=ordinary))
        assert_same_bytes(arrays, flower_fedavg(NODES))


def test_float64_models_are_averaged_in_float64_like_flower() -> None:
    store = MemoryStore()
    arrays = run_round(GradshardFedAvg(store, shards=3), gradshard_client(store, "float64"), "float64")
    assert_same_bytes(arrays, flower_fedavg(NODES, "float64"))


def test_flowers_legacy_inplace_average_has_other_bytes_so_the_api_version_matters() -> None:
    # Flower's legacy aggregate_inplace (float64 products) differs from the Message API's float32 products.
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.server.strategy.aggregate import aggregate_inplace

    results = [(None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(trained_arrays(n).to_numpy_ndarrays()),
                             examples(n), {})) for n in sorted(NODES)]
    legacy = aggregate_inplace(results)  # type: ignore[arg-type]
    message_api = flower_fedavg(NODES).to_numpy_ndarrays()
    assert any(a.tobytes() != b.tobytes() for a, b in zip(legacy, message_api, strict=True))


# --- dtypes -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["int64", "bool", "float16"])
def test_non_float32_or_float64_arrays_are_refused_before_clients_train(dtype: str) -> None:
    arrays = ArrayRecord({"w": Array(np.zeros(4, np.float32)), "steps": Array(np.zeros(3, dtype=dtype))})
    strategy = GradshardFedAvg(MemoryStore())
    with pytest.raises(LayoutError, match=r"array 'steps' is " + dtype + r".*cast it to float32"):
        strategy.configure_train(1, arrays, ConfigRecord(), InProcessGrid(NODES, gradshard_client(None)))  # type: ignore[arg-type]


def test_mixed_float_dtypes_are_refused() -> None:
    arrays = ArrayRecord({"a": Array(np.zeros(4, np.float32)), "b": Array(np.zeros(3, np.float64))})
    with pytest.raises(LayoutError, match="mix dtypes"):
        GradshardFedAvg(MemoryStore()).configure_train(1, arrays, ConfigRecord(),
                                                       InProcessGrid(NODES, gradshard_client(None)))  # type: ignore[arg-type]


# --- bad replies are failures of their client -------------------------------------------------------------------
def _corrupt_data(store: MemoryStore, key: str) -> None:
    blob = bytearray(store.get(key))
    blob[-5] ^= 0xFF  # a byte of the last tensor's data: the header (and its sha256) stays the same
    store.put(key, bytes(blob))


@pytest.mark.parametrize("fault", ["missing", "corrupt-data", "corrupt-header", "no-metrics", "error-reply",
                                   "wrong-client"])
def test_a_bad_reply_is_a_failure_of_that_client_and_the_round_goes_on(fault: str) -> None:
    # Prepare
    store, bad = MemoryStore(), 4_000_000_001
    key = update_key(1, client_id(bad))

    def mutate(replies: list[Message]) -> None:
        i = next(i for i, m in enumerate(replies) if m.metadata.src_node_id == bad)
        if fault == "missing":
            store.delete(key)
        elif fault == "corrupt-data":
            _corrupt_data(store, key)
        elif fault == "corrupt-header":
            store.put(key, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      " + store.get(key)[24:])
        elif fault == "no-metrics":
            del replies[i].content["metrics"]
        elif fault == "error-reply":
            replies[i] = Message(Error(code=1, reason="ClientApp crashed"), reply_to=_instruction(bad))
        else:
            replies[i].content["gradshard"]["client"] = client_id(17)

    strategy = GradshardFedAvg(store, shards=3)
    # Execute
    arrays = run_round(strategy, gradshard_client(store), mutate=mutate)
    # Assert
    assert [node for node, _ in strategy.failures[1]] == [bad]
    assert_same_bytes(arrays, flower_fedavg([n for n in NODES if n != bad]))


def _instruction(node: int) -> Message:
    return Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)


def test_a_round_whose_every_reply_fails_returns_none_like_fedavg() -> None:
    store = MemoryStore()
    arrays = run_round(GradshardFedAvg(store), gradshard_client(store),
                       mutate=lambda replies: [store.delete(update_key(1, client_id(n))) for n in NODES])
    assert arrays is None


def test_updates_left_by_an_earlier_run_are_not_aggregated() -> None:
    # Prepare: a first run on the same store wrote round 1 for NODES
    store = MemoryStore()
    run_round(GradshardFedAvg(store), gradshard_client(store))
    nodes = [*NODES, 77]

    def lose_250(replies: list[Message]) -> None:  # node 250 trains but its reply never arrives
        replies.remove(next(m for m in replies if m.metadata.src_node_id == 250))

    # Execute: the second run's round 1
    arrays = run_round(GradshardFedAvg(store, shards=2), gradshard_client(store), mutate=lose_250, nodes=nodes)
    # Assert
    assert_same_bytes(arrays, flower_fedavg([n for n in nodes if n != 250]))


def test_write_reply_talking_to_plain_fedavg_sends_the_ordinary_reply() -> None:
    msg = _instruction(17)
    reply = write_reply(msg, trained_arrays(17), MetricRecord({"num-examples": 3}))
    assert list(reply.content.array_records) == ["arrays"]
    assert list(reply.content.config_records) == []


def test_importing_gradshard_does_not_import_flwr() -> None:
    code = "import sys, gradshard; gradshard.aggregate_round; gradshard.open_store; assert 'flwr' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- three rounds ----------------------------------------------------------------------------------------------------
class SortedFedAvg(FedAvg):
    """Flower's FedAvg on replies sorted by node id (the order gradshard aggregates in)."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> Any:
        return super().aggregate_train(server_round, sorted(replies, key=lambda m: m.metadata.src_node_id))


def local_sgd(msg: Message, partition: int, store: Store | None = None) -> Message:
    """A few steps of least squares on a client's fixed data: a deterministic numpy ClientApp."""
    record = msg.content["arrays"]
    w, b = (record[name].numpy().copy() for name in ("w", "b"))
    rng = np.random.default_rng(partition)
    n = 20 + 15 * partition
    x = rng.standard_normal((n, w.shape[0])).astype(np.float32)
    y = (x @ np.arange(1, w.shape[0] + 1, dtype=np.float32) + np.float32(0.5)).astype(np.float32)
    for _ in range(5):
        err = x @ w + b - y
        w -= np.float32(0.05) * (x.T @ err) / np.float32(n)
        b -= np.float32(0.05) * err.mean(dtype=np.float32)
    arrays = ArrayRecord({"w": Array(w), "b": Array(b)})
    return write_reply(msg, arrays, MetricRecord({"num-examples": n, "loss": float((err**2).mean())}), store=store)


def initial_model() -> ArrayRecord:
    return ArrayRecord({"w": Array(np.zeros(7, np.float32)), "b": Array(np.zeros(1, np.float32))})


def test_three_rounds_in_process_end_with_fedavgs_model(tmp_path: Path) -> None:
    nodes = [901, 12, 345]
    partition = {node: i for i, node in enumerate(nodes)}

    def train(msg: Message) -> Message:
        return local_sgd(msg, partition[msg.metadata.dst_node_id])

    kwargs: dict[str, Any] = {"fraction_evaluate": 0.0, "min_train_nodes": 3, "min_available_nodes": 3}
    reference = SortedFedAvg(**kwargs).start(InProcessGrid(nodes, train), initial_model(), num_rounds=3)  # type: ignore[arg-type]
    ours = GradshardFedAvg(LocalStore(tmp_path), shards=2, **kwargs).start(
        InProcessGrid(nodes, train), initial_model(), num_rounds=3)  # type: ignore[arg-type]
    assert_same_bytes(ours.arrays, reference.arrays)
    assert ours.train_metrics_clientapp[3]["loss"] == reference.train_metrics_clientapp[3]["loss"]


def test_three_round_flower_simulation_ends_with_fedavgs_model(tmp_path: Path) -> None:
    """Flower's own simulation engine (Ray), 3 supernodes: both strategies in one ServerApp (one Ray start)."""
    pytest.importorskip("ray")
    from flwr.app import Context
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return local_sgd(msg, int(context.node_config["partition-id"]))

    server_app = ServerApp()
    results: dict[str, ArrayRecord] = {}

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        kwargs: dict[str, Any] = {"fraction_evaluate": 0.0, "min_train_nodes": 3, "min_available_nodes": 3}
        results["fedavg"] = SortedFedAvg(**kwargs).start(grid, initial_model(), num_rounds=3).arrays
        results["gradshard"] = GradshardFedAvg(LocalStore(tmp_path / "store"), shards=3, **kwargs).start(
            grid, initial_model(), num_rounds=3).arrays

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False}})
    assert set(results) == {"fedavg", "gradshard"}
    assert_same_bytes(results["gradshard"], results["fedavg"])
    rounds = sorted((tmp_path / "store" / "rounds").iterdir())
    assert [len(list((r / "updates").iterdir())) for r in rounds] == [3, 3, 3]
