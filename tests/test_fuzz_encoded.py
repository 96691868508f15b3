"""Fuzzing encoded updates (block-wise int8, top-k): a mutated object never crashes or skews a round. Every mutation
either rejects the mutated client with a reason — the aggregate is then the honest clients' exact bytes — or is
accepted, and then the aggregate is the exact bytes of the round with the unmutated object."""

from __future__ import annotations

import struct
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradshard.aggregation.driver import AggregateConfig, aggregate_round
from gradshard.core.layout import ModelLayout, TensorSpec
from gradshard.format.keys import aggregate_key, update_key
from gradshard.format.quantized import write_quantized_update
from gradshard.format.round import RoundSpec, open_round
from gradshard.format.sparse import write_topk_update
from gradshard.format.update import UpdateMeta
from gradshard.format.writer import write_update
from gradshard.runtime import InlineExecutor
from gradshard.store import MemoryStore

CHUNK = 4
LAYOUT = ModelLayout([TensorSpec("w", (3, 4), "float32"), TensorSpec("b", (5,), "float32")])
TARGET = "c3"
Writer = Callable[[MemoryStore, str, np.ndarray, UpdateMeta], object]
WRITERS: dict[str, Writer] = {
    "int8": lambda store, key, vec, meta: write_quantized_update(store, key, LAYOUT, vec, meta),
    "topk": lambda store, key, vec, meta: write_topk_update(store, key, LAYOUT, vec, meta, k=7),
}


def _meta(client: str, examples: int) -> UpdateMeta:
    return UpdateMeta(client=client, round=0, examples=examples, layout_digest=LAYOUT.digest(), chunk_elems=CHUNK)


def _store(target: bytes | None) -> MemoryStore:
    store = MemoryStore()
    open_round(store, RoundSpec.create(0, LAYOUT, chunk_elems=CHUNK))
    for i in range(3):
        vec = np.random.default_rng(i).standard_normal(LAYOUT.numel).astype(np.float32)
        write_update(store, update_key(0, f"c{i}"), LAYOUT, vec, _meta(f"c{i}", 10 + i))
    if target is not None:
        store.put(update_key(0, TARGET), target)
    return store


def _aggregate(store: MemoryStore) -> tuple[bytes, dict[str, str]]:
    result = aggregate_round(store, 0, InlineExecutor(), AggregateConfig(shards=2))
    return store.get(aggregate_key(0)), dict(result.manifest.rejected)


def _original(encoding: str) -> bytes:
    store = MemoryStore()
    vec = np.random.default_rng(9).standard_normal(LAYOUT.numel).astype(np.float32)
    WRITERS[encoding](store, "u", vec, _meta(TARGET, 20))
    return store.get("u")


ORIGINAL = {encoding: _original(encoding) for encoding in WRITERS}
HONEST = _aggregate(_store(None))[0]
CLEAN = {encoding: _aggregate(_store(blob))[0] for encoding, blob in ORIGINAL.items()}


def _mutations(blob: bytes) -> st.SearchStrategy[bytes]:
    header = struct.unpack("<Q", blob[:8])[0]
    flip = st.tuples(st.integers(0, len(blob) - 1), st.integers(1, 255)).map(
        lambda p: blob[: p[0]] + bytes([blob[p[0]] ^ p[1]]) + blob[p[0] + 1 :])
    data_flip = st.tuples(st.integers(8 + header, len(blob) - 1), st.integers(1, 255)).map(
        lambda p: blob[: p[0]] + bytes([blob[p[0]] ^ p[1]]) + blob[p[0] + 1 :])
    cut = st.integers(0, len(blob) - 1).map(lambda n: blob[:n])
    grow = st.binary(min_size=1, max_size=16).map(lambda extra: blob + extra)
    return st.one_of(flip, data_flip, cut, grow)


@pytest.mark.parametrize("encoding", sorted(WRITERS))
def test_a_mutated_encoded_update_is_rejected_or_changes_nothing(encoding: str) -> None:
    @settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(mutated=_mutations(ORIGINAL[encoding]))
    def check(mutated: bytes) -> None:
        output, rejected = _aggregate(_store(mutated))
        if TARGET in rejected:
            assert rejected[TARGET] and output == HONEST
        else:
            assert output == CLEAN[encoding], "an accepted mutation changed the aggregate"

    check()
