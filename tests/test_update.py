"""Tests of the update object: exact round trips, plain-safetensors compatibility, and validation errors."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import safetensors.numpy
from safetensors import safe_open

from gradshard.aggregation.driver import AggregateConfig, aggregate_round
from gradshard.core import checksum
from gradshard.core.layout import ModelLayout, TensorSpec
from gradshard.errors import GradshardError, RoundError, UpdateError
from gradshard.format.keys import aggregate_key, update_key
from gradshard.format.round import RoundSpec, open_round, prepare_round
from gradshard.format.update import UpdateMeta, header_digest, open_update, read_flat, read_header
from gradshard.format.writer import UpdateWriter, update_metadata, with_header_digest, write_update
from gradshard.runtime import InlineExecutor
from gradshard.store import LocalStore, MemoryStore, Store

CHUNK = 4


def _layout(dtype: str = "float32", shapes: dict[str, tuple[int, ...]] | None = None) -> ModelLayout:
    """Tensors whose names are not in sorted order (the plain library writes them sorted)."""
    shapes = shapes if shapes is not None else {"z": (3, 4), "a": (5,), "m": (2, 3)}
    return ModelLayout(TensorSpec(name, shape, dtype) for name, shape in shapes.items())


def _vector(layout: ModelLayout, seed: int) -> npt.NDArray[Any]:
    return np.random.default_rng(seed).standard_normal(layout.numel).astype(layout.flat_dtype)


def _meta(layout: ModelLayout, client: str, *, r: int = 0, examples: int = 10, chunk: int = CHUNK) -> UpdateMeta:
    return UpdateMeta(client=client, round=r, examples=examples, layout_digest=layout.digest(), chunk_elems=chunk)


def _write(store: Store, layout: ModelLayout, client: str, seed: int, *, key_client: str | None = None,
           r: int = 0, examples: int = 10, chunk: int = CHUNK) -> npt.NDArray[Any]:
    vec = _vector(layout, seed)
    write_update(store, update_key(r, key_client or client), layout, vec,
                 _meta(layout, client, r=r, examples=examples, chunk=chunk))
    return vec


def _plain_bytes(layout: ModelLayout, vec: npt.NDArray[Any], metadata: dict[str, str]) -> bytes:
    """An update as the plain safetensors library writes it."""
    tensors = {k: np.ascontiguousarray(v) for k, v in layout.unflatten(vec).items()}
    return bytes(safetensors.numpy.save(tensors, metadata=metadata))


def _open(store: Store, layout: ModelLayout, *, cohort: list[str] | None = None) -> RoundSpec:
    spec = RoundSpec.create(0, layout, chunk_elems=CHUNK, cohort=cohort)
    open_round(store, spec)
    return spec


def _bits(x: npt.NDArray[Any]) -> npt.NDArray[Any]:
    return x.view(f"u{x.dtype.itemsize}")


# --- round trips -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("chunk", [1, 4, 7, 23, 64])
def test_write_update_then_read_flat_round_trips_exactly(dtype: str, chunk: int) -> None:
    # Prepare: random values plus the awkward ones (signed zero, subnormal, inf, nan)
    store = MemoryStore()
    layout = _layout(dtype)
    vec = _vector(layout, 1)
    finfo = np.finfo(dtype)
    vec[:5] = [-0.0, finfo.smallest_subnormal, np.inf, -np.inf, np.nan]
    key = update_key(0, "c1")

    # Execute
    meta = write_update(store, key, layout, vec, _meta(layout, "c1", chunk=chunk))
    back = read_flat(store, key, layout, "c1")

    # Assert
    assert back.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(_bits(back), _bits(vec))
    grid = checksum.ChunkGrid(layout.numel, chunk)
    assert meta.checksums == checksum.pack([checksum.checksum(vec[a:b]) for a, b in map(grid.bounds,
                                                                                         range(grid.count))])


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_update_opens_with_the_plain_safetensors_library(tmp_path: Path, dtype: str) -> None:
    # Prepare
    store = LocalStore(tmp_path)
    layout = _layout(dtype)
    vec = _vector(layout, 2)
    key = update_key(3, "client-7")

    # Execute
    write_update(store, key, layout, vec, _meta(layout, "client-7", r=3, examples=42))
    tensors = safetensors.numpy.load_file(tmp_path / key)
    with safe_open(tmp_path / key, "np") as f:
        metadata = f.metadata()
    blob = (tmp_path / key).read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    parsed = json.loads(blob[8 : 8 + n])
    del parsed["__metadata__"]["gradshard.header_digest"]

    # Assert
    expected = layout.unflatten(vec)
    assert sorted(tensors) == sorted(expected)
    for name, arr in expected.items():
        assert tensors[name].dtype == np.dtype(dtype)
        assert tensors[name].shape == arr.shape
        np.testing.assert_array_equal(_bits(tensors[name]), _bits(arr))
    grid = checksum.ChunkGrid(layout.numel, CHUNK)
    assert metadata == {
        "gradshard.format": "2", "gradshard.kind": "update", "gradshard.client": "client-7",
        "gradshard.round": "3", "gradshard.examples": "42", "gradshard.base_model": "",
        "gradshard.layout": layout.digest(), "gradshard.checksum": "xxh3_64", "gradshard.chunk_elems": str(CHUNK),
        "gradshard.checksums": checksum.pack([checksum.checksum(vec[a:b]) for a, b in map(grid.bounds,
                                                                                          range(grid.count))]),
        "gradshard.header_digest": hashlib.sha256(json.dumps(parsed, sort_keys=True, separators=(",", ":"))
                                                  .encode()).hexdigest(),
    }


def test_data_section_of_a_written_update_is_the_flat_vector() -> None:
    # Prepare
    store = MemoryStore()
    layout = _layout()
    vec = _vector(layout, 3)

    # Execute
    write_update(store, "u", layout, vec, _meta(layout, "c1"))
    blob = store.get("u")
    (n,) = struct.unpack("<Q", blob[:8])

    # Assert: 8-byte aligned header, then exactly the vector's bytes
    assert (8 + n) % 8 == 0
    assert blob[8 + n :] == vec.tobytes()
    with open_update(store, "u", "c1", layout) as upd:
        assert upd.contiguous


def test_update_metadata_matches_what_write_update_stores() -> None:
    # Prepare
    store = MemoryStore()
    layout = _layout()
    vec = _vector(layout, 4)

    # Execute
    written = write_update(store, "u", layout, vec, _meta(layout, "c1", examples=5)).to_metadata()
    computed = update_metadata(layout, vec, client="c1", round=0, examples=5, chunk_elems=CHUNK)

    # Assert: the same fields, plus the digest of the header the plain library will write
    assert computed.pop("gradshard.header_digest") != ""
    assert computed == written


def test_update_metadata_refuses_a_vector_of_the_wrong_length() -> None:
    # Execute / Assert
    with pytest.raises(GradshardError, match=r"flat vector has shape \(3,\), layout needs \(23,\)"):
        update_metadata(_layout(), np.zeros(3, np.float32), client="c1", round=0, examples=1)


def test_plain_safetensors_update_is_accepted_and_aggregates_to_the_same_bytes(tmp_path: Path) -> None:
    # Prepare: store A gets c2 from the plain library (tensors reordered), store B gets it from write_update
    layout = _layout()
    a, b = LocalStore(tmp_path / "a"), LocalStore(tmp_path / "b")
    vecs = {c: _vector(layout, i) for i, c in enumerate(["c1", "c2", "c3"])}
    examples = {"c1": 3, "c2": 11, "c3": 7}
    for store in (a, b):
        _open(store, layout)
        for c in ("c1", "c3"):
            write_update(store, update_key(0, c), layout, vecs[c], _meta(layout, c, examples=examples[c]))
    write_update(b, update_key(0, "c2"), layout, vecs["c2"], _meta(layout, "c2", examples=examples["c2"]))
    plain_path = a.root / update_key(0, "c2")
    plain_path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in layout.unflatten(vecs["c2"]).items()},
                                plain_path, metadata=update_metadata(layout, vecs["c2"], client="c2", round=0,
                                                                     examples=examples["c2"], chunk_elems=CHUNK))

    # Execute
    manifest = prepare_round(a, 0)
    with open_update(a, update_key(0, "c2"), "c2", layout) as upd:
        plain_is_contiguous = upd.contiguous
    plain_flat = read_flat(a, update_key(0, "c2"), layout, "c2")
    outputs = {}
    for name, store in (("a", a), ("b", b)):
        for topology, shards in (("flat", 1), ("sharded", 3), ("sharded", 6)):
            aggregate_round(store, 0, InlineExecutor(), AggregateConfig(topology=topology, shards=shards,
                                                                        window_bytes=12))
            outputs[name, topology, shards] = store.get(aggregate_key(0))

    # Assert: the plain file really is in another order, yet reads and aggregates identically
    assert a.get(update_key(0, "c2")) != b.get(update_key(0, "c2"))
    assert not plain_is_contiguous
    assert [c.client for c in manifest.clients] == ["c1", "c2", "c3"]
    assert manifest.rejected == {}
    np.testing.assert_array_equal(_bits(plain_flat), _bits(vecs["c2"]))
    assert len(set(outputs.values())) == 1


# --- validation --------------------------------------------------------------------------------------------------
def _rejected(store: Store) -> dict[str, str]:
    return prepare_round(store, 0).rejected


def _put_plain(store: Store, layout: ModelLayout, client: str, seed: int, changes: dict[str, str | None]) -> None:
    """Write ``client``'s update with the plain library, its metadata fields changed (None deletes a field)."""
    vec = _vector(layout, seed)
    md = update_metadata(layout, vec, client=client, round=0, examples=10, chunk_elems=CHUNK)
    for name, value in changes.items():
        if value is None:
            del md[f"gradshard.{name}"]
        else:
            md[f"gradshard.{name}"] = value
    store.put(update_key(0, client), _plain_bytes(layout, vec, with_header_digest(layout, md)))


@pytest.fixture
def round0() -> tuple[MemoryStore, ModelLayout]:
    """A round with one good client (c0), so every test below can reject one bad one."""
    store = MemoryStore()
    layout = _layout()
    _open(store, layout)
    _write(store, layout, "c0", 0)
    return store, layout


def _rewrite(store: Store, key: str, edit: Callable[[bytes], bytes]) -> None:
    store.put(key, edit(store.get(key)))


@pytest.mark.parametrize(
    ("bad_layout", "reason"),
    [
        (_layout("float64"), r"wrong dtype: tensor 'z' is float64, the round expects float32"),
        (_layout(shapes={"z": (4, 3), "a": (5,), "m": (2, 3)}),
         r"wrong layout: tensor 'z' has shape \(4, 3\), the round expects \(3, 4\)"),
        (_layout(shapes={"z": (3, 4), "a": (5,)}), r"wrong layout: missing tensors \['m'\], unexpected tensors \[\]"),
        (_layout(shapes={"z": (3, 4), "a": (5,), "m": (2, 3), "extra": (1,)}),
         r"wrong layout: missing tensors \[\], unexpected tensors \['extra'\]"),
    ],
    ids=["dtype", "shape", "missing-tensor", "extra-tensor"],
)
def test_update_of_the_wrong_layout_is_rejected(round0: tuple[MemoryStore, ModelLayout], bad_layout: ModelLayout,
                                                reason: str) -> None:
    # Prepare
    store, layout = round0
    _write(store, bad_layout, "c1", 1)

    # Execute
    rejected = _rejected(store)

    # Assert
    assert list(rejected) == ["c1"]
    with pytest.raises(UpdateError, match=reason) as info:
        open_update(store, update_key(0, "c1"), "c1", layout)
    assert info.value.client == "c1"
    assert rejected["c1"] == info.value.reason


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda b: b[:-5], r"is truncated: \d+ bytes, header promises \d+"),
        (lambda b: b[:5], r"is truncated: 5 bytes, too short for a header"),
        (lambda b: b[:40], r"is truncated or not safetensors: header length \d+ but the object has 40 bytes"),
        (lambda b: b + b"\0\0\0", r"has 3 unexpected trailing bytes"),
        (lambda b: struct.pack("<Q", 16) + b"\xff not json {{{{" + b[24:], r"header that is not valid JSON"),
        (lambda b: struct.pack("<Q", 8) + b"[1, 2]  ", r"header that is not a JSON object"),
        (lambda b: struct.pack("<Q", 1 << 40) + b[8:], r"has a header length of 1099511627776 bytes, over the max"),
    ],
    ids=["truncated-data", "truncated-prefix", "truncated-header", "trailing", "not-json", "not-object",
         "huge-length"],
)
def test_structurally_broken_object_is_rejected(round0: tuple[MemoryStore, ModelLayout],
                                                edit: Callable[[bytes], bytes], reason: str) -> None:
    # Prepare
    store, layout = round0
    _write(store, layout, "c1", 1)
    _rewrite(store, update_key(0, "c1"), edit)

    # Execute
    rejected = _rejected(store)

    # Assert
    assert list(rejected) == ["c1"]
    with pytest.raises(UpdateError, match=rf"update of client 'c1' rejected: object '{update_key(0, 'c1')}' "
                                          rf"(is|has) .*") as info:
        open_update(store, update_key(0, "c1"), "c1", layout)
    assert rejected["c1"] == info.value.reason
    with pytest.raises(UpdateError, match=reason):
        open_update(store, update_key(0, "c1"), "c1", layout)


def test_header_with_overlapping_tensors_is_rejected(round0: tuple[MemoryStore, ModelLayout]) -> None:
    # Prepare: point tensor 'a' at the bytes of 'z'
    store, layout = round0
    _write(store, layout, "c1", 1)
    blob = store.get(update_key(0, "c1"))
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    header["a"]["data_offsets"] = [0, 20]
    header["__metadata__"]["gradshard.header_digest"] = header_digest(header)  # a consistent, broken header
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    store.put(update_key(0, "c1"), struct.pack("<Q", len(raw)) + raw + blob[8 + n :])

    # Execute
    rejected = _rejected(store)

    # Assert
    assert rejected == {"c1": "header data offsets leave a gap or overlap at byte 20"}


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"examples": None}, "metadata field 'gradshard.examples' is missing"),
        ({"checksums": None}, "metadata field 'gradshard.checksums' is missing"),
        ({"client": None}, "metadata field 'gradshard.client' is missing"),
        ({"examples": "ten"}, "metadata field 'gradshard.examples' is not an integer: 'ten'"),
        ({"examples": "2.5"}, "metadata field 'gradshard.examples' is not an integer: '2.5'"),
        ({"examples": "0"}, "metadata field 'gradshard.examples' must be >= 1, got 0"),
        ({"round": "-1"}, "metadata field 'gradshard.round' must be >= 0, got -1"),
        ({"round": "5"}, "update is for round 5, this is round 0"),
        ({"chunk_elems": "0"}, "metadata field 'gradshard.chunk_elems' must be >= 1, got 0"),
        ({"format": "3"}, "unsupported update format '3' (expected 1 or 2)"),
        ({"checksum": "crc32"}, "unsupported checksum 'crc32' for format 2 (expected one of xxh3_64, blake3, sha256)"),
        ({"kind": "aggregate"}, "object is a 'aggregate', not an update"),
        ({"layout": "0" * 64}, "metadata layout digest differs from the round's layout"),
        ({"checksums": "abc"}, "checksums do not match the layout: 6 chunks need 96 hex digits, got 3"),
    ],
    ids=lambda v: "-".join(f"{k}={str(x)[:8]}" for k, x in v.items()) if isinstance(v, dict) else "",
)
def test_bad_metadata_is_rejected_with_a_reason(round0: tuple[MemoryStore, ModelLayout], changes: dict[str, Any],
                                                reason: str) -> None:
    # Prepare
    store, layout = round0
    _put_plain(store, layout, "c1", 1, changes)

    # Execute
    manifest = prepare_round(store, 0)

    # Assert
    assert manifest.rejected == {"c1": reason}
    assert [c.client for c in manifest.clients] == ["c0"]


def test_update_with_another_chunk_size_is_rejected(round0: tuple[MemoryStore, ModelLayout]) -> None:
    # Prepare
    store, layout = round0
    _write(store, layout, "c1", 1, chunk=8)

    # Execute / Assert
    assert _rejected(store) == {"c1": "chunk size 8 differs from the round's 4"}


def test_update_with_another_base_model_is_rejected() -> None:
    # Prepare
    store = MemoryStore()
    layout = _layout()
    open_round(store, RoundSpec.create(0, layout, chunk_elems=CHUNK, base_model="b" * 64))
    vec = _vector(layout, 1)
    write_update(store, update_key(0, "c0"), layout, vec, UpdateMeta(
        client="c0", round=0, examples=1, layout_digest=layout.digest(), chunk_elems=CHUNK, base_model="b" * 64))
    write_update(store, update_key(0, "c1"), layout, vec, UpdateMeta(
        client="c1", round=0, examples=1, layout_digest=layout.digest(), chunk_elems=CHUNK, base_model="a" * 64))

    # Execute / Assert
    assert _rejected(store) == {
        "c1": "update was trained from base model aaaaaaaaaaaa, the round's base model is bbbbbbbbbbbb"}


def test_misfiled_update_is_rejected(round0: tuple[MemoryStore, ModelLayout]) -> None:
    # Prepare: c2's object says it is c1's
    store, layout = round0
    _write(store, layout, "c1", 1, key_client="c2")

    # Execute / Assert
    assert _rejected(store) == {"c2": "object is filed as client 'c2' but its metadata names 'c1'"}


def test_a_second_claim_rejects_only_the_impostor(round0: tuple[MemoryStore, ModelLayout]) -> None:
    # Prepare: c1 files its own update, and c2's object also claims to be c1
    store, layout = round0
    _write(store, layout, "c1", 1)
    _write(store, layout, "c1", 2, key_client="c2")

    # Execute
    manifest = prepare_round(store, 0)

    # Assert: the key decides identity, so c1 keeps its own update
    assert manifest.rejected == {"c2": "object is filed as client 'c2' but its metadata names 'c1'"}
    assert [c.client for c in manifest.clients] == ["c0", "c1"]


def test_client_outside_the_cohort_is_rejected() -> None:
    # Prepare
    store = MemoryStore()
    layout = _layout()
    _open(store, layout, cohort=["c0", "c1"])
    for i, c in enumerate(["c0", "c1", "intruder"]):
        _write(store, layout, c, i)

    # Execute
    manifest = prepare_round(store, 0)

    # Assert
    assert manifest.rejected == {"intruder": "unknown client: not in this round's cohort"}
    assert [c.client for c in manifest.clients] == ["c0", "c1"]


def test_policy_fail_raises_naming_the_client(round0: tuple[MemoryStore, ModelLayout]) -> None:
    # Prepare
    store, layout = round0
    _put_plain(store, layout, "c1", 1, {"examples": "0"})

    # Execute / Assert
    with pytest.raises(RoundError, match=r"update of client 'c1' rejected: metadata field 'gradshard.examples' "
                                         r"must be >= 1, got 0"):
        prepare_round(store, 0, policy="fail")


def test_policy_fail_raises_on_a_second_claim(round0: tuple[MemoryStore, ModelLayout]) -> None:
    # Prepare: a copy of c1's update filed under another name (listed before c1's own)
    store, layout = round0
    _write(store, layout, "c1", 1, key_client="a-c1-copy")
    _write(store, layout, "c1", 2)

    # Execute / Assert
    with pytest.raises(RoundError, match=r"update of client 'a-c1-copy' rejected: object is filed as client "
                                         r"'a-c1-copy' but its metadata names 'c1'"):
        prepare_round(store, 0, policy="fail")


def test_round_with_no_valid_update_fails_listing_the_rejected() -> None:
    # Prepare
    store = MemoryStore()
    layout = _layout()
    _open(store, layout)
    _put_plain(store, layout, "c1", 1, {"examples": "0"})

    # Execute / Assert
    with pytest.raises(RoundError, match=r"round 0 has 0 valid updates, needs at least 1; rejected: \{'c1': "):
        prepare_round(store, 0)


def test_objects_that_are_not_updates_are_ignored(round0: tuple[MemoryStore, ModelLayout]) -> None:
    # Prepare
    store, _ = round0
    store.put("rounds/000000/updates/notes.txt", b"hello")
    store.put("rounds/000000/updates/sub/c9.safetensors", b"nested")

    # Execute
    manifest = prepare_round(store, 0)

    # Assert
    assert manifest.rejected == {}
    assert [c.client for c in manifest.clients] == ["c0"]


# --- data-level faults -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("element", [0, 5, 13, 22])
def test_flipped_data_byte_fails_read_flat_naming_the_chunk(element: int) -> None:
    # Prepare
    store = MemoryStore()
    layout = _layout()
    _write(store, layout, "c1", 1)
    key = update_key(0, "c1")
    blob = bytearray(store.get(key))
    (n,) = struct.unpack("<Q", blob[:8])
    blob[8 + n + element * 4 + 1] ^= 0x01
    store.put(key, bytes(blob))
    chunk = element // CHUNK
    lo, hi = chunk * CHUNK, min(chunk * CHUNK + CHUNK, layout.numel)

    # Execute / Assert
    with pytest.raises(UpdateError, match=rf"update of client 'c1' rejected: checksum mismatch in chunk {chunk} "
                                          rf"\(elements \[{lo}, {hi}\)\): the object is corrupted") as info:
        read_flat(store, key, layout, "c1")
    assert info.value.client == "c1"


@pytest.mark.parametrize("topology", ["sharded", "flat"])
def test_corrupted_update_is_skipped_by_the_aggregation(topology: str) -> None:
    # Prepare: prepare_round only reads headers, the functions find the corruption
    store = MemoryStore()
    layout = _layout()
    _open(store, layout)
    vecs = [_write(store, layout, c, i) for i, c in enumerate(["c0", "c1", "c2"])]
    key = update_key(0, "c1")
    blob = bytearray(store.get(key))
    blob[-1] ^= 0x80
    store.put(key, bytes(blob))

    # Execute
    res = aggregate_round(store, 0, InlineExecutor(), AggregateConfig(topology=topology, shards=3))
    agg = read_flat(store, aggregate_key(0), layout)

    # Assert
    assert list(res.manifest.rejected) == ["c1"]
    assert res.manifest.rejected["c1"].startswith("checksum mismatch in chunk 5 (elements [20, 23))")
    assert res.runs == 2
    assert [c.client for c in res.manifest.clients] == ["c0", "c2"]
    np.testing.assert_array_equal(_bits(agg), _bits((0.5 * vecs[0] + 0.5 * vecs[2]).astype(np.float32)))


# --- the writer --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["local", "memory"])
def test_writer_aborted_by_an_exception_leaves_no_object(tmp_path: Path, backend: str) -> None:
    # Prepare
    store: Store = LocalStore(tmp_path) if backend == "local" else MemoryStore()
    layout = _layout()
    vec = _vector(layout, 1)

    # Execute
    with pytest.raises(RuntimeError, match="client crashed"), \
            UpdateWriter(store, update_key(0, "c1"), layout, _meta(layout, "c1")) as writer:
        writer.write(vec[:10])
        raise RuntimeError("client crashed")

    # Assert
    assert store.list() == []
    assert not store.exists(update_key(0, "c1"))
    if backend == "local":
        assert list((tmp_path / ".uploads").iterdir()) == []
    with pytest.raises(GradshardError, match="does not exist"):
        store.write_at(update_key(0, "c1"), writer.upload_id, 0, b"x")


def test_writer_left_without_commit_publishes_nothing() -> None:
    # Prepare
    store = MemoryStore()
    layout = _layout()

    # Execute
    with UpdateWriter(store, "u", layout, _meta(layout, "c1")) as writer:
        writer.write(_vector(layout, 1))

    # Assert
    assert store.list() == []


def test_writer_streams_pieces_into_the_same_bytes_as_one_write() -> None:
    # Prepare
    store = MemoryStore()
    layout = _layout()
    vec = _vector(layout, 9)
    write_update(store, "whole", layout, vec, _meta(layout, "c1"))

    # Execute
    with UpdateWriter(store, "pieces", layout, _meta(layout, "c1")) as writer:
        for a, b in [(0, 3), (3, 3), (3, 9), (9, 22), (22, 23)]:
            writer.write(vec[a:b])
        writer.commit()

    # Assert
    assert store.get("pieces") == store.get("whole")


def test_writer_refuses_bad_input() -> None:
    # Prepare
    store = MemoryStore()
    layout = _layout()
    vec = _vector(layout, 1)

    # Execute / Assert
    with UpdateWriter(store, "u", layout, _meta(layout, "c1")) as writer:
        with pytest.raises(GradshardError, match="expected a 1-D float32 array, got 1-D float64"):
            writer.write(vec.astype(np.float64))
        with pytest.raises(GradshardError, match="expected a 1-D float32 array, got 2-D float32"):
            writer.write(vec.reshape(1, -1))
        writer.write(vec[:20])
        with pytest.raises(GradshardError, match="writing 4 more elements overflows the layout's 23"):
            writer.write(vec[:4])
        with pytest.raises(GradshardError, match="update 'u' got 20 of 23 elements"):
            writer.commit()
    assert store.list() == []


def test_write_update_refuses_a_vector_of_the_wrong_shape() -> None:
    # Execute / Assert
    layout = _layout()
    with pytest.raises(GradshardError, match=r"flat vector has shape \(22,\), layout needs \(23,\)"):
        write_update(MemoryStore(), "u", layout, np.zeros(22, np.float32), _meta(layout, "c1"))


def test_read_header_reports_the_object_layout() -> None:
    # Prepare
    store = MemoryStore()
    layout = _layout()
    _write(store, layout, "c1", 1)

    # Execute
    with store.open_reader(update_key(0, "c1")) as reader:
        header = read_header(reader, update_key(0, "c1"), "c1")

    # Assert
    assert list(header.tensors) == ["z", "a", "m"]
    assert [(e.begin, e.end) for e in header.tensors.values()] == [(0, 48), (48, 68), (68, 92)]
    assert header.object_size == header.data_start + 92
    assert header.metadata["gradshard.client"] == "c1"
