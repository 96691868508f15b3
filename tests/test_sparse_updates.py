"""Top-k sparse updates (gradshard.format.sparse): the selection, aggregation equal to the densified vectors for
every M, bytes read per client bounded by the entries, and damaged files refused."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradshard.aggregation.driver import AggregateConfig, aggregate_round
from gradshard.core.layout import ModelLayout, TensorSpec
from gradshard.core.reduce import fedavg, fedavg_weights
from gradshard.errors import GradshardError, UpdateError
from gradshard.format.compact import open_client_update
from gradshard.format.keys import aggregate_key, update_key
from gradshard.format.round import RoundSpec, open_round, prepare_round
from gradshard.format.sparse import SparseReader, densified, k_of, top_k, write_topk_update
from gradshard.format.update import UpdateMeta, open_update, read_flat
from gradshard.format.writer import write_update
from gradshard.runtime import InlineExecutor
from gradshard.store import MemoryStore


@settings(max_examples=80, deadline=None)
@given(values=st.lists(st.sampled_from([0.0, 1.0, -1.0, 2.5, -2.5, 7.0]), min_size=1, max_size=60),
       k=st.integers(0, 60))
def test_top_k_keeps_the_largest_magnitudes_ties_by_the_lower_index(values: list[float], k: int) -> None:
    x = np.array(values, dtype=np.float32)
    k = min(k, len(x))

    kept = top_k(x, k).tolist()

    reference = sorted(sorted(range(len(x)), key=lambda i: (-abs(values[i]), i))[:k])
    assert kept == reference
    dense = densified(x, k)
    assert np.array_equal(dense[kept], x[kept]) and not np.delete(dense, kept).any()


def _round(numel: int, chunk: int, fraction: float, sparse: tuple[int, ...], n: int = 4
           ) -> tuple[MemoryStore, ModelLayout, list[npt.NDArray[np.float32]], list[int], int]:
    layout = ModelLayout([TensorSpec("w", (numel - 100,), "float32"), TensorSpec("b", (100,), "float32")])
    store = MemoryStore()
    open_round(store, RoundSpec.create(0, layout, chunk_elems=chunk))
    rng = np.random.default_rng(1)
    k = k_of(fraction, numel)
    vectors, examples = [], []
    for i in range(n):
        v = rng.standard_normal(numel).astype(np.float32)
        client, count = f"c{i}", 5 + i
        meta = UpdateMeta(client=client, round=0, examples=count, layout_digest=layout.digest(), chunk_elems=chunk)
        if i in sparse:
            write_topk_update(store, update_key(0, client), layout, v, meta, k=k)
            v = densified(v, k)
        else:
            write_update(store, update_key(0, client), layout, v, meta)
        vectors.append(v)
        examples.append(count)
    return store, layout, vectors, examples, k


def test_a_top_k_round_aggregates_the_densified_updates_the_same_for_every_m() -> None:
    store, layout, vectors, examples, _ = _round(20_000, 512, 0.05, sparse=(0, 2, 3))
    expected = fedavg(vectors, fedavg_weights(examples))

    outputs = set()
    for m in (1, 3, 8):
        if store.exists(aggregate_key(0)):
            store.delete(aggregate_key(0))
        result = aggregate_round(store, 0, InlineExecutor(), AggregateConfig(shards=m))
        outputs.add(store.get(aggregate_key(0)))

    assert len(outputs) == 1
    assert read_flat(store, aggregate_key(0), layout).tobytes() == expected.tobytes()
    assert [c.encoding for c in result.manifest.clients] == ["topk", "", "topk", "topk"]


def test_a_shard_reads_only_its_entries_of_a_one_percent_update() -> None:
    # Prepare: 1 % of 1 M elements (10,000 entries, 80 kB) per client, 4 clients, 64 chunks of 16,384
    store, _, _, _, k = _round(1_000_000, 16_384, 0.01, sparse=(0, 1, 2, 3))

    # Execute
    result = aggregate_round(store, 0, InlineExecutor(), AggregateConfig(shards=2))

    # Assert: every function reads its chunks' entries, its clients' headers and the manifest; ≤ 1.1·k·8 a client
    total = sum(r.bytes_read for r in result.reports)
    manifest = len(store.get("rounds/000000/manifest.json"))
    assert 4 * k * 8 <= total - 2 * manifest <= 4 * 1.1 * k * 8


def test_a_flipped_bit_in_a_top_k_update_is_refused_naming_the_client() -> None:
    for where in ("values", "pointer table"):
        store, *_ = _round(20_000, 512, 0.05, sparse=(0, 1, 2, 3))
        key = update_key(0, "c2")
        blob = bytearray(store.get(key))
        if where == "values":
            blob[len(blob) - 3] ^= 0x01  # the last value
        else:
            at = blob.index(b'"gradshard.topk_counts":"') + len(b'"gradshard.topk_counts":"')
            blob[at] = ord("B") if blob[at] != ord("B") else ord("C")
        store.put(key, bytes(blob))

        result = aggregate_round(store, 0, InlineExecutor(), AggregateConfig(shards=2))

        reason = result.manifest.rejected["c2"]
        assert ("checksum mismatch" in reason) if where == "values" else ("header digest mismatch" in reason)


def test_top_k_updates_open_as_sparse_readers_and_refuse_bad_arguments() -> None:
    store, layout, *_ = _round(2_000, 256, 0.1, sparse=(0,), n=1)
    with open_client_update(store, update_key(0, "c0"), "c0", layout) as reader:
        assert isinstance(reader, SparseReader) and reader.k == 200
    assert prepare_round(store, 0).clients[0].encoding == "topk"
    with pytest.raises(GradshardError, match="fraction"):
        k_of(0.0, 100)
    with pytest.raises(GradshardError, match="NaN or inf"):
        top_k(np.array([1.0, np.inf], dtype=np.float32), 1)
    with pytest.raises(GradshardError, match="pointer table"):
        UpdateMeta(client="c", round=0, examples=1, layout_digest="d", chunk_elems=4, encoding="topk")
    with pytest.raises(UpdateError, match="topk update"):
        open_update(store, update_key(0, "c0"), "c0", layout)


def test_training_with_top_k_uploads_and_refusing_a_bad_compression() -> None:
    from pydantic import ValidationError

    from gradshard.fl.config import DataConfig, TrainConfig
    from gradshard.fl.driver import Trainer

    config = TrainConfig(model="mlp", data=DataConfig(name="digits", partition="iid"), clients=4, rounds=2, epochs=1,
                         batch_size=32, lr=0.1, seed=0, compression="topk:0.05")
    store = MemoryStore()
    history = Trainer(store, config, InlineExecutor()).run()

    manifest = prepare_round(store, 1)
    assert all(c.encoding == "topk" for c in manifest.clients) and len(history) == 2
    for bad in ("topk", "topk:0", "topk:1.5", "gzip"):
        with pytest.raises(ValidationError, match="use none, int8 or topk"):
            TrainConfig(compression=bad)
