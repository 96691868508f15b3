"""The headline property: sharded aggregation is byte-for-byte the flat aggregation, which is reference FedAvg."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gradshard.aggregation.driver import AggregateConfig, aggregate_round
from gradshard.core.layout import ModelLayout
from gradshard.core.reduce import fedavg, fedavg_weights
from gradshard.core.zoo import synthetic
from gradshard.format.keys import aggregate_key, update_key
from gradshard.format.round import RoundSpec, open_round
from gradshard.format.update import UpdateMeta, read_flat
from gradshard.format.writer import write_update
from gradshard.runtime import InlineExecutor, LocalExecutor
from gradshard.runtime.executor import Executor
from gradshard.store import LocalStore, MemoryStore, Store

_ID_CHARS = string.ascii_letters + string.digits + "_.-"
client_ids = st.text(_ID_CHARS, min_size=1, max_size=12).filter(lambda s: not s.startswith("."))


def _updates(layout: ModelLayout, clients: list[str], seed: int) -> dict[str, npt.NDArray[np.float32]]:
    """Random updates spanning several orders of magnitude, so every multiply and add rounds."""
    rng = np.random.default_rng(seed)
    out = {}
    for c in clients:
        scale = 10.0 ** rng.uniform(-3, 3, layout.numel)
        out[c] = (rng.standard_normal(layout.numel) * scale).astype(np.float32)
    return out


def _fill(store: Store, layout: ModelLayout, chunk: int, vecs: dict[str, npt.NDArray[Any]],
          examples: dict[str, int], order: list[str]) -> None:
    open_round(store, RoundSpec.create(0, layout, chunk_elems=chunk))
    for c in order:
        write_update(store, update_key(0, c), layout, vecs[c], UpdateMeta(
            client=c, round=0, examples=examples[c], layout_digest=layout.digest(), chunk_elems=chunk))


def _aggregate(store: Store, executor: Executor, **config: Any) -> bytes:
    aggregate_round(store, 0, executor, AggregateConfig(**config))
    return store.get(aggregate_key(0))


def _reference(vecs: dict[str, npt.NDArray[Any]], examples: dict[str, int], accumulate: str,
               weighting: str) -> npt.NDArray[np.float32]:
    order = sorted(vecs)
    weights = fedavg_weights([examples[c] for c in order], weighting)
    return fedavg([vecs[c] for c in order], weights, accumulate).astype(np.float32)


@st.composite
def _rounds(draw: st.DrawFn) -> dict[str, Any]:
    p = draw(st.integers(1, 5000), label="P")
    chunk = draw(st.integers(1, 64), label="chunk_elems")
    m = draw(st.sampled_from([1, 2, 3, 7, 16]), label="M")
    assume(m <= -(-p // chunk))
    clients = draw(st.lists(client_ids, min_size=1, max_size=8, unique=True), label="clients")
    return {
        "p": p, "chunk": chunk, "m": m,
        "tensor_elems": draw(st.integers(1, p), label="tensor_elems"),
        "examples": {c: draw(st.integers(1, 1000)) for c in clients},
        "order": draw(st.permutations(clients), label="arrival order"),
        "window_bytes": draw(st.integers(4, 4096), label="window_bytes"),
        "accumulate": draw(st.sampled_from(["float32", "float64"])),
        "weighting": draw(st.sampled_from(["examples", "uniform"])),
        "parallel_reads": draw(st.integers(1, 9), label="parallel_reads"),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


@settings(max_examples=25, deadline=None)
@given(_rounds())
def test_sharded_aggregate_is_byte_identical_to_flat_and_equals_reference_fedavg(case: dict[str, Any]) -> None:
    # Prepare
    layout = synthetic(case["p"], tensor_elems=case["tensor_elems"])
    vecs = _updates(layout, list(case["examples"]), case["seed"])
    store = MemoryStore()
    _fill(store, layout, case["chunk"], vecs, case["examples"], list(case["order"]))
    common = {"window_bytes": case["window_bytes"], "accumulate": case["accumulate"],
              "weighting": case["weighting"]}

    # Execute
    flat = _aggregate(store, InlineExecutor(), topology="flat", **common)
    sharded = _aggregate(store, InlineExecutor(), topology="sharded", shards=case["m"],
                         parallel_reads=case["parallel_reads"], **common)
    data = read_flat(store, aggregate_key(0), layout)

    # Assert
    assert sharded == flat
    expected = _reference(vecs, case["examples"], case["accumulate"], case["weighting"])
    np.testing.assert_array_equal(data.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_arrival_order_does_not_change_the_aggregate(seed: int) -> None:
    # Prepare: the same updates written into two stores in different orders
    rng = np.random.default_rng(seed)
    layout = synthetic(777, tensor_elems=100)
    clients = [f"client-{i:02d}" for i in rng.permutation(6)]
    vecs = _updates(layout, clients, seed)
    examples = {c: int(rng.integers(1, 1000)) for c in clients}
    first, second = MemoryStore(), MemoryStore()
    _fill(first, layout, 16, vecs, examples, clients)
    _fill(second, layout, 16, vecs, examples, [clients[i] for i in rng.permutation(len(clients))])

    # Execute
    outputs = [_aggregate(s, InlineExecutor(), topology=t, shards=m, window_bytes=100)
               for s in (first, second) for t, m in (("sharded", 7), ("flat", 1))]

    # Assert
    assert len(set(outputs)) == 1


def test_sharded_aggregate_does_not_depend_on_the_window() -> None:
    # Prepare
    layout = synthetic(1000, tensor_elems=300)
    clients = ["a", "b", "c"]
    vecs = _updates(layout, clients, 5)
    store = MemoryStore()
    _fill(store, layout, 8, vecs, {"a": 1, "b": 2, "c": 3}, clients)

    # Execute
    outputs = {w: _aggregate(store, InlineExecutor(), shards=3, window_bytes=w) for w in (4, 12, 100, 4000, 1 << 20)}

    # Assert
    assert len(set(outputs.values())) == 1


@pytest.mark.integration
def test_process_executor_sharded_aggregate_is_byte_identical_to_flat(tmp_path: Path) -> None:
    # Prepare
    layout = synthetic(1000, tensor_elems=128)
    clients = ["zeta", "alpha", "mid", "beta"]
    vecs = _updates(layout, clients, 11)
    examples = {"zeta": 5, "alpha": 700, "mid": 33, "beta": 1}
    store = LocalStore(tmp_path / "store", fsync=False)
    _fill(store, layout, 16, vecs, examples, clients)
    executor = LocalExecutor(workers=2)

    # Execute
    try:
        flat = _aggregate(store, executor, topology="flat", window_bytes=256)
        sharded = {m: _aggregate(store, executor, topology="sharded", shards=m, window_bytes=256) for m in (1, 3, 7)}
        data = read_flat(store, aggregate_key(0), layout)
    finally:
        executor.close()

    # Assert
    assert all(out == flat for out in sharded.values())
    expected = _reference(vecs, examples, "float32", "examples")
    np.testing.assert_array_equal(data.view(np.uint32), expected.view(np.uint32))
