"""Fuzzing the input path: a mutated update never crashes, hangs or skews a round (issue 11).

A round of three honest clients and one client whose valid object (format 1 or 2) is mutated: bit flips, truncation,
extension, the length field, JSON structure (deep nesting, duplicate keys, wrong types, huge numbers), metadata
values and the tensor table. Every case must either reject the mutated client with a reason (the aggregate is then
the honest clients' exact bytes) or accept it, and then the aggregate is the exact bytes of a round where that
client wrote its original data cleanly with what the round accepted (its example count; its coverage). A mutation
that changes an accepted example count is possible only in format 1 (no header digest) or with the digest
recomputed (a forged but well-formed object): it is counted apart. Run with ``-s`` to see the counts.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradshard.aggregation.driver import AggregateConfig, aggregate_round
from gradshard.core.layout import ModelLayout, TensorSpec
from gradshard.format.keys import aggregate_key, update_key
from gradshard.format.round import RoundSpec, open_round
from gradshard.format.update import HEADER_DIGEST_KEY, UpdateMeta, header_digest
from gradshard.format.writer import update_metadata, write_update
from gradshard.runtime import InlineExecutor
from gradshard.store import MemoryStore

CHUNK = 4
LAYOUT = ModelLayout([TensorSpec("w", (3, 4), "float32"), TensorSpec("b", (5,), "float32")])
HONEST = ["c0", "c1", "c2"]
TARGET = "c3"
CONFIG = AggregateConfig(shards=2, policy="skip")
Mutation = Callable[[bytes], bytes]


def _vector(seed: int) -> npt.NDArray[np.float32]:
    return np.random.default_rng(seed).standard_normal(LAYOUT.numel).astype(np.float32)


def _store() -> MemoryStore:
    store = MemoryStore()
    open_round(store, RoundSpec.create(0, LAYOUT, chunk_elems=CHUNK))
    for i, client in enumerate(HONEST):
        write_update(store, update_key(0, client), LAYOUT, _vector(i),
                     UpdateMeta(client=client, round=0, examples=10 + i, layout_digest=LAYOUT.digest(),
                                chunk_elems=CHUNK))
    return store


def _target_object(version: str) -> bytes:
    """The mutated client's valid object before mutation: format 2 from our writer, or format 1 by hand."""
    vec = _vector(3)
    if version == "2":
        store = MemoryStore()
        write_update(store, "u", LAYOUT, vec, UpdateMeta(client=TARGET, round=0, examples=55,
                                                         layout_digest=LAYOUT.digest(), chunk_elems=CHUNK))
        return store.get("u")
    md = update_metadata(LAYOUT, vec, client=TARGET, round=0, examples=55, chunk_elems=CHUNK)
    del md[HEADER_DIGEST_KEY]
    md["gradshard.format"] = "1"
    tensors = {k: np.ascontiguousarray(v) for k, v in LAYOUT.unflatten(vec).items()}
    return bytes(safetensors.numpy.save(tensors, metadata=md))


ORIGINAL = {version: _target_object(version) for version in ("1", "2")}


def _aggregate(store: MemoryStore) -> tuple[bytes, dict[str, str], list[Any]]:
    result = aggregate_round(store, 0, InlineExecutor(), CONFIG)
    return store.get(aggregate_key(0)), dict(result.manifest.rejected), list(result.manifest.clients)


HONEST_BYTES = _aggregate(_store())[0]
_REFERENCES: dict[tuple[int, str], bytes] = {}


def _reference(examples: int, coverage: dict[str, tuple[int, ...]] | None) -> bytes:
    """The aggregate of the honest clients and the target's original data written cleanly as accepted."""
    cache_key = (examples, json.dumps(coverage, sort_keys=True))
    if cache_key not in _REFERENCES:
        store = _store()
        write_update(store, update_key(0, TARGET), LAYOUT, _vector(3),
                     UpdateMeta(client=TARGET, round=0, examples=examples, layout_digest=LAYOUT.digest(),
                                chunk_elems=CHUNK, coverage=coverage))
        _REFERENCES[cache_key] = _aggregate(store)[0]
    return _REFERENCES[cache_key]


# --- mutations ---------------------------------------------------------------------------------------------------
def _split(blob: bytes) -> tuple[int, bytes, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return n, blob[8 : 8 + n], blob[8 + n :]


def _join(header: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def _edit_header(edit: Callable[[dict[str, Any]], None], redigest: bool) -> Mutation:
    """Edit the parsed header; with ``redigest`` the header digest is recomputed (a forged, well-formed object)."""
    def mutate(blob: bytes) -> bytes:
        _, raw, data = _split(blob)
        header = json.loads(raw)
        edit(header)
        md = header.get("__metadata__")
        if redigest and isinstance(md, dict) and HEADER_DIGEST_KEY in md:
            md[HEADER_DIGEST_KEY] = header_digest(header)
        return _join(json.dumps(header).encode(), data)
    return mutate


def _set_meta(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(header: dict[str, Any]) -> None:
        if value is None:
            header["__metadata__"].pop(f"gradshard.{field}", None)
        else:
            header["__metadata__"][f"gradshard.{field}"] = value
    return edit


def _set_tensor(name: str, field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(header: dict[str, Any]) -> None:
        header[name][field] = value
    return edit


def _raw_text(edit: Callable[[bytes], bytes]) -> Mutation:
    def mutate(blob: bytes) -> bytes:
        _, raw, data = _split(blob)
        return _join(edit(raw), data)
    return mutate


def _flip(bit: int) -> Mutation:
    def mutate(blob: bytes) -> bytes:
        out = bytearray(blob)
        out[(bit // 8) % len(out)] ^= 1 << (bit % 8)
        return bytes(out)
    return mutate


def _length(value: int) -> Mutation:
    return lambda blob: struct.pack("<Q", value) + blob[8:]


def _nest(depth: int) -> Callable[[bytes], bytes]:
    return lambda raw: raw[:-1] + b', "deep": ' + b"[" * depth + b"]" * depth + b"}"


def _duplicate(field: str, value: str) -> Callable[[bytes], bytes]:
    return lambda raw: raw.replace(b'"__metadata__":{', b'"__metadata__":{"gradshard.%s":"%s",'
                                   % (field.encode(), value.encode()), 1)


ODD_NAMES = ["", "c0", "c1", "C3", "c3 ", "c3/../c0", "ç3", "c3\u0000", "..", "x" * 200, "c\\3", '"c3"']
META_VALUES = st.one_of(
    st.sampled_from(["0", "-1", "55", "45", "1" + "0" * 400, str(10**30), str(10**12), str(10**12 + 1), "1e3",
                     " 55", "55 ", "٥٥", "", "abc", "1" * 5000]),
    st.text(max_size=12),
    st.integers(), st.lists(st.integers(), max_size=3), st.just(None), st.booleans())
COVERAGES = st.one_of(
    st.sampled_from(['{"w": [2, 4]}', '{"b": [5]}', '{"w": [3, 4], "b": [5]}', '{"w": [9, 9]}', '{"q": [1]}',
                     '{"w": [1]}', "[]", "{}", "{", '{"w": [-1, 4]}', '{"w": [1.5, 4]}', '{"w": [true, 4]}',
                     "[" * 3000 + "]" * 3000]),
    st.text(max_size=20))


def _mutations() -> st.SearchStrategy[Mutation]:
    redigest = st.booleans()
    meta_fields = st.sampled_from(["examples", "round", "chunk_elems", "checksums", "client", "format", "kind",
                                   "checksum", "layout", "base_model", "header_digest"])
    return st.one_of(
        st.integers(0, 8 * 2000).map(_flip),  # header and payload (the object is ~1.6 KB)
        st.integers(0, 2000).map(lambda k: lambda blob: blob[:k]),
        st.binary(min_size=1, max_size=16).map(lambda tail: lambda blob: blob + tail),
        st.one_of(st.integers(0, 2000), st.integers(0, 2**64 - 1)).map(_length),
        st.integers(1, 20_000).map(lambda d: _raw_text(_nest(d))),
        st.tuples(meta_fields, st.text(max_size=8)).map(lambda fv: _raw_text(_duplicate(*fv))),
        st.builds(lambda f, v, r: _edit_header(_set_meta(f, v), r), meta_fields, META_VALUES, redigest),
        st.builds(lambda c, r: _edit_header(_set_meta("client", c), r), st.sampled_from(ODD_NAMES), redigest),
        st.builds(lambda c, r: _edit_header(_set_meta("coverage", c), r), COVERAGES, redigest),
        st.builds(lambda n, f, v, r: _edit_header(_set_tensor(n, f, v), r), st.sampled_from(["w", "b"]),
                  st.sampled_from(["dtype", "shape", "data_offsets"]),
                  st.one_of(st.sampled_from(["F16", "F64", "I32", "BOOL", "X"]), st.lists(st.integers(-3, 70),
                            max_size=4), st.just([0, 10**400]), st.integers(), st.text(max_size=4)), redigest),
        st.builds(lambda r: _edit_header(lambda h: h.update({"w": h["b"], "b": h["w"]}), r), redigest),
        st.sampled_from([_raw_text(lambda raw: raw + b"   "), _raw_text(lambda raw: b" " + raw),
                         _raw_text(lambda raw: raw.replace(b'"F32"', b'"F32" ', 1)),
                         _raw_text(lambda raw: raw.replace(b'"55"', b'"\\u0035\\u0035"', 1)),
                         _raw_text(lambda raw: raw.replace(b"[", b"[" * 10, 1)),
                         _raw_text(lambda raw: raw.replace(b"[0,", b"[1e400,", 1)),
                         _raw_text(lambda raw: raw.replace(b"0,", b"0.0,", 1)),
                         _raw_text(lambda raw: raw + b"\xff"), _raw_text(lambda raw: raw.decode().encode("utf-16")),
                         _raw_text(lambda raw: b'"' + b'\\"' * 5000)]),
    )


# --- the property ------------------------------------------------------------------------------------------------
OUTCOMES: Counter[str] = Counter()


def _check(version: str, mutate: Mutation) -> str:
    store = _store()
    try:
        blob = mutate(ORIGINAL[version])
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return "not applicable"  # the mutation does not apply to this object (e.g. no such field)
    store.put(update_key(0, TARGET), blob)
    aggregate, rejected, clients = _aggregate(store)  # any exception fails the test
    if TARGET in rejected:
        assert rejected[TARGET], "a rejection must give a reason"
        assert [c.client for c in clients] == HONEST
        assert aggregate == HONEST_BYTES
        return "rejected"
    assert rejected == {}
    assert [c.client for c in clients] == [*HONEST, TARGET]
    entry = clients[-1]
    assert aggregate == _reference(entry.examples, entry.coverage)
    return "accepted, exact" if (entry.examples, entry.coverage) == (55, None) else "accepted as rewritten, exact"


def _run(version: str, mutate: Mutation) -> None:
    OUTCOMES[f"v{version} {_check(version, mutate)}"] += 1


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(version=st.sampled_from(["1", "2"]), mutate=_mutations())
def test_a_mutated_update_is_rejected_or_aggregated_exactly(version: str, mutate: Mutation) -> None:
    _run(version, mutate)


@pytest.mark.slow
@settings(max_examples=4000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(version=st.sampled_from(["1", "2"]), mutate=_mutations())
def test_a_mutated_update_is_rejected_or_aggregated_exactly_long(version: str, mutate: Mutation) -> None:
    _run(version, mutate)


def test_the_unmutated_objects_are_accepted_exactly() -> None:
    assert _check("1", lambda blob: blob) == "accepted, exact"
    assert _check("2", lambda blob: blob) == "accepted, exact"


@pytest.fixture(scope="module", autouse=True)
def _print_outcomes() -> Any:
    yield
    print("\nfuzz outcomes:", dict(sorted(OUTCOMES.items())), f"(total {sum(OUTCOMES.values())})")
