"""Block-wise int8 updates (gradshard.format.quantized): the quantizer, the file, aggregation exact across M with a
quarter of the bytes read, and refusal of damaged files."""

from __future__ import annotations

import struct

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
from gradshard.format.quantized import QuantizedReader, dequantized, pack, write_quantized_update
from gradshard.format.round import RoundSpec, open_round, prepare_round
from gradshard.format.update import UpdateMeta, open_update, read_flat
from gradshard.format.writer import write_update
from gradshard.runtime import InlineExecutor
from gradshard.store import MemoryStore

CHUNK = 256


def _layout(numel: int = 3000) -> ModelLayout:
    return ModelLayout([TensorSpec("w", (numel - 10,), "float32"), TensorSpec("b", (10,), "float32")])


def _meta(layout: ModelLayout, client: str, examples: int = 10) -> UpdateMeta:
    return UpdateMeta(client=client, round=0, examples=examples, layout_digest=layout.digest(), chunk_elems=CHUNK)


def _round(n: int = 5, quantized: tuple[int, ...] = (0, 1, 2, 3, 4), seed: int = 0, numel: int = 3000,
           chunk: int = CHUNK) -> tuple[MemoryStore, ModelLayout, list[npt.NDArray[np.float32]], list[int]]:
    layout, store = _layout(numel), MemoryStore()
    open_round(store, RoundSpec.create(0, layout, chunk_elems=chunk))
    rng = np.random.default_rng(seed)
    vectors, examples = [], []
    for i in range(n):
        v = (rng.standard_normal(layout.numel) * (i + 1)).astype(np.float32)
        client, count = f"c{i}", 10 + 3 * i
        meta = UpdateMeta(client=client, round=0, examples=count, layout_digest=layout.digest(), chunk_elems=chunk)
        if i in quantized:
            write_quantized_update(store, update_key(0, client), layout, v, meta)
            v = dequantized(v, chunk)  # what every reader gets back
        else:
            write_update(store, update_key(0, client), layout, v, meta)
        vectors.append(v)
        examples.append(count)
    return store, layout, vectors, examples


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=700))
def test_dequantized_values_are_within_half_a_step_of_the_input(values: list[float]) -> None:
    x = np.array(values, dtype=np.float32)

    got = dequantized(x, CHUNK)

    for a in range(0, len(x), CHUNK):
        block = x[a : a + CHUNK].astype(np.float64)
        step = np.abs(block).max() / 127
        assert np.all(np.abs(got[a : a + CHUNK] - block) <= step / 2 * (1 + 1e-5) + 1e-30)
    assert len(pack(x, CHUNK)) == len(x) + 4 * -(-len(x) // CHUNK)


def test_an_int8_round_aggregates_the_dequantized_updates_the_same_for_every_m_reading_a_quarter() -> None:
    # Prepare: five clients; two of them float32, three int8
    store, layout, vectors, examples = _round(quantized=(0, 2, 4))
    expected = fedavg(vectors, fedavg_weights(examples))  # the same float32 operations in the same order

    # Execute
    outputs, reads = {}, {}
    for m in (1, 2, 4, 8):
        if store.exists(aggregate_key(0)):
            store.delete(aggregate_key(0))
        result = aggregate_round(store, 0, InlineExecutor(), AggregateConfig(shards=m))
        outputs[m] = store.get(aggregate_key(0))
        reads[m] = sum(r.bytes_read for r in result.reports)

    # Assert: identical bytes, equal to FedAvg of what the readers decode; int8 clients read ~¼ of float32
    assert len(set(outputs.values())) == 1
    assert read_flat(store, aggregate_key(0), layout).tobytes() == expected.tobytes()
    chunks = -(-layout.numel // CHUNK)
    data = 2 * layout.numel * 4 + 3 * (layout.numel + 4 * chunks)  # the data each shard function reads, in total
    assert data <= reads[1] < data + 5 * 40_000  # plus the manifest and every client's header
    assert {c.client: c.encoding for c in result.manifest.clients} == {
        "c0": "int8", "c1": "", "c2": "int8", "c3": "", "c4": "int8"}


def test_an_all_int8_round_reads_a_quarter_of_a_float_round() -> None:
    int8_store, *_ = _round(numel=400_000, chunk=4096)
    float_store, *_ = _round(quantized=(), numel=400_000, chunk=4096)

    int8 = aggregate_round(int8_store, 0, InlineExecutor(), AggregateConfig(shards=2))
    plain = aggregate_round(float_store, 0, InlineExecutor(), AggregateConfig(shards=2))

    data_int8 = sum(r.bytes_read for r in int8.reports)
    data_float = sum(r.bytes_read for r in plain.reports)
    assert 0.25 <= data_int8 / data_float < 0.26  # (P + 4·chunks) / 4P, plus the headers


def test_robust_and_phase_reducers_read_int8_updates() -> None:
    store, *_ = _round(n=7)
    result = aggregate_round(store, 0, InlineExecutor(), AggregateConfig(shards=3, reducer="krum:1"))
    assert len(result.manifest.clients) == 1
    store.delete(aggregate_key(0))
    result = aggregate_round(store, 0, InlineExecutor(), AggregateConfig(shards=3, reducer="median"))
    assert result.manifest.rejected == {}


def test_a_flipped_bit_in_an_int8_chunk_or_scale_is_refused_naming_the_client() -> None:
    for where in ("value", "scale"):
        store, *_ = _round(n=3)
        key = update_key(0, "c1")
        blob = bytearray(store.get(key))
        (header,) = struct.unpack("<Q", blob[:8])
        at = 8 + header + (5 if where == "value" else CHUNK + 1)  # in chunk 0: a value, or its scale
        blob[at] ^= 0x10
        store.put(key, bytes(blob))

        result = aggregate_round(store, 0, InlineExecutor(), AggregateConfig(shards=2))

        assert "checksum mismatch in chunk 0" in result.manifest.rejected["c1"]


def test_int8_updates_are_refused_where_they_cannot_be_read() -> None:
    store, layout, _, _ = _round(n=2)
    with pytest.raises(UpdateError, match="is an int8 update; read it with"):
        open_update(store, update_key(0, "c0"), "c0", layout)
    with open_client_update(store, update_key(0, "c0"), "c0", layout) as reader:
        assert isinstance(reader, QuantizedReader)
    with pytest.raises(GradshardError, match="float32"):
        half = ModelLayout([TensorSpec("w", (10,), "float16")])
        write_quantized_update(store, "x", half, np.zeros(10, np.float16), _meta(half, "c9"))
    with pytest.raises(GradshardError, match="NaN or inf"):
        write_quantized_update(store, "x", layout, np.full(layout.numel, np.nan, np.float32), _meta(layout, "c9"))
    with pytest.raises(GradshardError, match="unknown encoding"):
        UpdateMeta(client="c", round=0, examples=1, layout_digest="d", chunk_elems=4, encoding="int4")
    manifest = prepare_round(store, 0)
    assert [c.encoding for c in manifest.clients] == ["int8", "int8"]


def test_training_with_int8_uploads_writes_quarter_size_updates_and_still_learns() -> None:
    from gradshard.fl.config import DataConfig, TrainConfig
    from gradshard.fl.driver import Trainer

    def run(compression: str) -> tuple[MemoryStore, list[dict[str, object]]]:
        config = TrainConfig(model="mlp", data=DataConfig(name="digits", partition="iid"), clients=4, rounds=3,
                             epochs=1, batch_size=32, lr=0.1, momentum=0.9, seed=0, compression=compression)
        store = MemoryStore()
        return store, Trainer(store, config, InlineExecutor()).run()

    int8_store, int8_history = run("int8")
    float_store, float_history = run("none")

    key = update_key(2, "client-0001")
    assert 0.24 < len(int8_store.get(key)) / len(float_store.get(key)) < 0.3
    assert all(c.encoding == "int8" for c in prepare_round(int8_store, 2).clients)
    assert float(str(int8_history[-1]["test_accuracy"])) > float(str(float_history[-1]["test_accuracy"])) - 0.05
