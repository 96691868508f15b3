"""Tests of update format v2: header digest, cryptographic chunk digests, the one writer, and reading format 1."""

from __future__ import annotations

import hashlib
import itertools
import json
import struct
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import numpy.typing as npt
import pytest
import safetensors.numpy
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from gradshard.aggregation.driver import AggregateConfig, aggregate_round
from gradshard.core import checksum
from gradshard.core.digests import DigestName
from gradshard.core.layout import ModelLayout, TensorSpec
from gradshard.errors import GradshardError, InvocationError, UpdateError
from gradshard.format.keys import aggregate_key, update_key
from gradshard.format.round import RoundSpec, open_round, prepare_round
from gradshard.format.update import UpdateMeta, inspect_update, open_update, read_flat
from gradshard.format.writer import (
    ObjectUpload,
    RangeWriter,
    UpdateWriter,
    merge_digests,
    update_metadata,
    with_header_digest,
    write_update,
)
from gradshard.runtime import InlineExecutor
from gradshard.store import LocalStore, MemoryStore, Store

ALGORITHMS: list[DigestName] = ["xxh3_64", "blake3", "sha256"]
WIDTH = {"xxh3_64": 16, "blake3": 64, "sha256": 64}
CHUNK = 4


def _layout() -> ModelLayout:
    """Tensor names out of sorted order, so the plain library stores them in another order than ours."""
    return ModelLayout([TensorSpec("z", (3, 4), "float32"), TensorSpec("a", (5,), "float32"),
                        TensorSpec("m", (2, 3), "float32")])


def _vector(layout: ModelLayout, seed: int) -> npt.NDArray[np.float32]:
    return np.random.default_rng(seed).standard_normal(layout.numel).astype(np.float32)


def _meta(layout: ModelLayout, client: str, digest: str = "xxh3_64", **kw: Any) -> UpdateMeta:
    return UpdateMeta(client=client, round=0, examples=kw.pop("examples", 10), layout_digest=layout.digest(),
                      chunk_elems=CHUNK, digest=digest, **kw)


def _independent_digest(name: str, data: bytes) -> str:
    """Each algorithm straight from its library, not through gradshard."""
    if name == "xxh3_64":
        return str(xxhash.xxh3_64_hexdigest(data))
    if name == "blake3":
        return blake3.blake3(data).hexdigest()
    return hashlib.sha256(data).hexdigest()


def _chunk_digests(name: str, vec: npt.NDArray[Any], chunk: int) -> list[str]:
    raw = vec.tobytes()
    step = chunk * vec.dtype.itemsize
    return [_independent_digest(name, raw[i : i + step]) for i in range(0, len(raw), step)]


def _header_of(blob: bytes) -> tuple[int, dict[str, Any]]:
    (n,) = struct.unpack("<Q", blob[:8])
    return n, json.loads(blob[8 : 8 + n])


def _canonical_sha256(header: dict[str, Any]) -> str:
    """The header digest as the format defines it, computed here by hand."""
    body = json.loads(json.dumps(header))
    del body["__metadata__"]["gradshard.header_digest"]
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _v1_metadata(layout: ModelLayout, vec: npt.NDArray[np.float32], client: str, examples: int) -> dict[str, str]:
    """Format-1 metadata written out by hand (what the format-1 writer stored)."""
    return {"gradshard.format": "1", "gradshard.kind": "update", "gradshard.client": client,
            "gradshard.round": "0", "gradshard.examples": str(examples), "gradshard.base_model": "",
            "gradshard.layout": layout.digest(), "gradshard.checksum": "xxh3_64",
            "gradshard.chunk_elems": str(CHUNK), "gradshard.checksums": "".join(_chunk_digests("xxh3_64", vec, CHUNK))}


def _plain(layout: ModelLayout, vec: npt.NDArray[np.float32], metadata: dict[str, str]) -> bytes:
    tensors = {k: np.ascontiguousarray(v) for k, v in layout.unflatten(vec).items()}
    return bytes(safetensors.numpy.save(tensors, metadata=metadata))


# --- round trips and the default ---------------------------------------------------------------------------------
@pytest.mark.parametrize("digest", ALGORITHMS)
def test_every_algorithm_round_trips_and_stores_independently_computed_digests(digest: str) -> None:
    # Prepare
    store = MemoryStore()
    layout = _layout()
    vec = _vector(layout, 1)

    # Execute
    meta = write_update(store, "u", layout, vec, _meta(layout, "c1", digest))
    back = read_flat(store, "u", layout, "c1")
    _, header = _header_of(store.get("u"))
    with open_update(store, "u", "c1", layout) as upd:
        verified, reader_digest = upd.header_verified, upd.meta.digest

    # Assert
    np.testing.assert_array_equal(back.view(np.uint32), vec.view(np.uint32))
    expected = _chunk_digests(digest, vec, CHUNK)
    assert all(len(h) == WIDTH[digest] for h in expected)
    assert meta.checksums == "".join(expected)
    md = header["__metadata__"]
    assert (md["gradshard.format"], md["gradshard.checksum"], md["gradshard.checksums"]) == ("2", digest,
                                                                                              "".join(expected))
    assert md["gradshard.header_digest"] == _canonical_sha256(header)
    assert (verified, reader_digest) == (True, digest)


def test_v2_with_xxh3_is_the_default() -> None:
    # Prepare
    store = MemoryStore()
    layout = _layout()
    meta = UpdateMeta(client="c1", round=0, examples=1, layout_digest=layout.digest(), chunk_elems=CHUNK)

    # Execute
    write_update(store, "u", layout, _vector(layout, 2), meta)
    info = inspect_update(store, "u", layout)

    # Assert
    assert (meta.digest, RoundSpec.create(0, layout).digest) == ("xxh3_64", "xxh3_64")
    assert (info["format"], info["header_verified"], info["digest"]) == ("2", True, "xxh3_64")


# --- the header digest -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("digest", ALGORITHMS)
def test_flipping_any_bit_of_the_header_is_detected_naming_the_client(digest: str) -> None:
    # Prepare: a small update whose header holds every kind of field (coverage and extras included)
    store = MemoryStore()
    layout = _layout()
    write_update(store, "u", layout, _vector(layout, 3), _meta(layout, "c1", digest, coverage={"z": (2, 4)},
                                                                extra={"loss": "0.5"}))
    blob = store.get("u")
    n, _ = _header_of(blob)
    reasons: dict[str, int] = {}

    # Execute: every bit of every byte of the length prefix and the JSON header
    for position, bit in itertools.product(range(8 + n), range(8)):
        bad = bytearray(blob)
        bad[position] ^= 1 << bit
        store.put("u", bytes(bad))
        with pytest.raises(UpdateError) as info:
            open_update(store, "u", "c1", layout).close()

        # Assert
        assert info.value.client == "c1"
        assert str(info.value).startswith("update of client 'c1' rejected: ")
        key = info.value.reason.split(":")[0]
        reasons[key] = reasons.get(key, 0) + 1
    assert reasons.get("header digest mismatch", 0) > 8 * (8 + n) // 3  # most flips leave valid JSON


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_flipping_a_bit_of_the_payload_is_found_in_its_chunk(data: st.DataObject) -> None:
    # Prepare
    digest = data.draw(st.sampled_from(ALGORITHMS))
    store = MemoryStore()
    layout = _layout()
    write_update(store, "u", layout, _vector(layout, 4), _meta(layout, "c1", digest))
    blob = bytearray(store.get("u"))
    n, _ = _header_of(bytes(blob))
    offset = data.draw(st.integers(0, layout.nbytes - 1))
    blob[8 + n + offset] ^= 1 << data.draw(st.integers(0, 7))
    store.put("u", bytes(blob))
    chunk = offset // 4 // CHUNK
    lo, hi = chunk * CHUNK, min(layout.numel, (chunk + 1) * CHUNK)

    # Execute / Assert: the header is intact, the chunk is named
    with open_update(store, "u", "c1", layout) as upd:
        assert upd.header_verified
    with pytest.raises(UpdateError, match=rf"checksum mismatch in chunk {chunk} \(elements \[{lo}, {hi}\)\)") as info:
        read_flat(store, "u", layout, "c1")
    assert info.value.client == "c1"


def test_header_digest_ignores_padding_and_key_order() -> None:
    # Prepare: the same header re-encoded with keys reversed, spaces between tokens and more padding
    store = MemoryStore()
    layout = _layout()
    vec = _vector(layout, 5)
    write_update(store, "u", layout, vec, _meta(layout, "c1"))
    blob = store.get("u")
    n, header = _header_of(blob)
    reordered = {k: header[k] for k in reversed(list(header))}
    reordered["__metadata__"] = {k: v for k, v in reversed(list(header["__metadata__"].items()))}
    raw = json.dumps(reordered, indent=2).encode()
    raw += b" " * (-len(raw) % 8 + 16)
    store.put("u", struct.pack("<Q", len(raw)) + raw + blob[8 + n :])

    # Execute
    with open_update(store, "u", "c1", layout) as upd:
        verified = upd.header_verified
    back = read_flat(store, "u", layout, "c1")

    # Assert
    assert verified
    np.testing.assert_array_equal(back, vec)


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda md: md.pop("gradshard.header_digest"), "header digest missing: object 'u' says format '2'"),
        (lambda md: md.update({"gradshard.examples": "11"}), "header digest mismatch: object 'u' records"),
        (lambda md: md.update({"gradshard.header_digest": "0" * 64}), "header digest mismatch"),
    ],
    ids=["removed", "field-changed", "digest-replaced"],
)
def test_header_digest_removed_or_stale_is_refused(edit: Any, reason: str) -> None:
    # Prepare
    store = MemoryStore()
    layout = _layout()
    vec = _vector(layout, 6)
    md = update_metadata(layout, vec, client="c1", round=0, examples=10, chunk_elems=CHUNK)
    edit(md)
    store.put("u", _plain(layout, vec, md))

    # Execute / Assert
    with pytest.raises(UpdateError, match=reason) as info:
        open_update(store, "u", "c1", layout)
    assert info.value.client == "c1"


@pytest.mark.parametrize(
    ("old", "new", "reason"),
    [
        (b'"gradshard.examples":"10"', b'"gradshard.examples":"10","gradshard.examples":"99"',
         r"not valid JSON: duplicate key 'gradshard\.examples'"),  # JSON parsers disagree on which one wins
        (b'"shape":[5]', b'"shape":[5],"x":1e999', r"not valid JSON: number 1e999 overflows"),
        (b'"shape":[5]', b'"shape":[5],"x":NaN', r"not valid JSON: NaN is not JSON"),
    ],
    ids=["duplicate-key", "overflowing-number", "nan"],
)
def test_header_that_has_no_canonical_form_is_refused(old: bytes, new: bytes, reason: str) -> None:
    # Prepare
    store = MemoryStore()
    layout = _layout()
    write_update(store, "u", layout, _vector(layout, 7), _meta(layout, "c1"))
    blob = store.get("u")
    n, _ = _header_of(blob)
    assert old in blob[8 : 8 + n]
    raw = blob[8 : 8 + n].replace(old, new, 1).rstrip()
    raw += b" " * (-len(raw) % 8)
    store.put("u", struct.pack("<Q", len(raw)) + raw + blob[8 + n :])

    # Execute / Assert
    with pytest.raises(UpdateError, match=reason) as info:
        open_update(store, "u", "c1", layout)
    assert info.value.client == "c1"


# --- plain safetensors writers and format 1 ------------------------------------------------------------------------
@pytest.mark.parametrize("digest", ALGORITHMS)
def test_plain_safetensors_file_with_update_metadata_verifies(tmp_path: Path, digest: DigestName) -> None:
    # Prepare
    store = LocalStore(tmp_path)
    layout = _layout()
    vec = _vector(layout, 8)
    open_round(store, RoundSpec.create(0, layout, chunk_elems=CHUNK, digest=digest))
    path = tmp_path / update_key(0, "c1")
    path.parent.mkdir(parents=True)
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in layout.unflatten(vec).items()}, path,
                                metadata=update_metadata(layout, vec, client="c1", round=0, examples=3,
                                                         chunk_elems=CHUNK, digest=digest))

    # Execute
    manifest = prepare_round(store, 0)
    info = inspect_update(store, update_key(0, "c1"), layout)

    # Assert
    assert [c.client for c in manifest.clients] == ["c1"]
    assert (info["format"], info["header_verified"], info["digest"]) == ("2", True, digest)
    assert info["chunks_verified"] == -(-layout.numel // CHUNK)


def test_format_1_object_still_opens_aggregates_and_is_reported_unverified() -> None:
    # Prepare: c1 as the format-1 writer stored it (built by hand with the plain library), c2 in format 2
    store = MemoryStore()
    layout = _layout()
    vecs = {"c1": _vector(layout, 9), "c2": _vector(layout, 10)}
    open_round(store, RoundSpec.create(0, layout, chunk_elems=CHUNK))
    store.put(update_key(0, "c1"), _plain(layout, vecs["c1"], _v1_metadata(layout, vecs["c1"], "c1", 30)))
    write_update(store, update_key(0, "c2"), layout, vecs["c2"], _meta(layout, "c2", examples=10))
    reference = MemoryStore()  # the same round with both in format 2
    open_round(reference, RoundSpec.create(0, layout, chunk_elems=CHUNK))
    for c, examples in (("c1", 30), ("c2", 10)):
        write_update(reference, update_key(0, c), layout, vecs[c], _meta(layout, c, examples=examples))

    # Execute
    with open_update(store, update_key(0, "c1"), "c1", layout) as upd:
        v1_verified = upd.header_verified
    info = inspect_update(store, update_key(0, "c1"), layout)
    result = aggregate_round(store, 0, InlineExecutor(), AggregateConfig(shards=3))
    aggregate_round(reference, 0, InlineExecutor(), AggregateConfig(shards=3))
    aggregate = inspect_update(store, aggregate_key(0), layout)

    # Assert
    assert v1_verified is False
    assert (info["format"], info["header_verified"], info["digest"]) == ("1", False, "xxh3_64")
    assert result.manifest.rejected == {}
    mean = read_flat(store, aggregate_key(0), layout)
    np.testing.assert_allclose(mean, 0.75 * vecs["c1"] + 0.25 * vecs["c2"], rtol=1e-6, atol=1e-7)
    assert mean.tobytes() == read_flat(reference, aggregate_key(0), layout).tobytes()
    assert (aggregate["format"], aggregate["header_verified"]) == ("2", True)


def test_format_1_object_with_another_algorithm_is_refused() -> None:
    # Prepare
    store = MemoryStore()
    layout = _layout()
    vec = _vector(layout, 11)
    md = _v1_metadata(layout, vec, "c1", 1) | {"gradshard.checksum": "sha256"}
    store.put("u", _plain(layout, vec, md))

    # Execute / Assert
    with pytest.raises(UpdateError, match=r"unsupported checksum 'sha256' for format 1 \(expected xxh3_64\)"):
        open_update(store, "u", "c1", layout)


# --- the round's algorithm ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [AggregateConfig(topology="sharded", shards=3), AggregateConfig(topology="flat"),
                                    AggregateConfig(topology="lambda-fl", group_size=2)],
                         ids=["sharded", "flat", "lambda-fl"])
def test_round_rejects_an_update_of_another_algorithm_and_writes_its_own(config: AggregateConfig) -> None:
    # Prepare: a blake3 round, one client writing xxh3
    store = MemoryStore()
    layout = _layout()
    open_round(store, RoundSpec.create(0, layout, chunk_elems=CHUNK, digest="blake3"))
    vecs = {c: _vector(layout, 20 + i) for i, c in enumerate(["c1", "c2", "c3", "odd"])}
    for c, vec in vecs.items():
        write_update(store, update_key(0, c), layout, vec, _meta(layout, c, "xxh3_64" if c == "odd" else "blake3"))

    # Execute
    result = aggregate_round(store, 0, InlineExecutor(), config)
    info = inspect_update(store, aggregate_key(0), layout)

    # Assert
    assert result.manifest.rejected == {
        "odd": "chunk digest algorithm xxh3_64 differs from the round's blake3; write the update with "
               "digest='blake3'"}
    assert (info["digest"], info["format"], info["header_verified"]) == ("blake3", "2", True)
    expected = (vecs["c1"] + vecs["c2"] + vecs["c3"]) / 3
    np.testing.assert_allclose(read_flat(store, aggregate_key(0), layout), expected, rtol=1e-5, atol=1e-6)


# --- the writer ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("digest", ALGORITHMS)
def test_range_writers_in_any_order_and_pieces_write_the_bytes_of_write_update(digest: str) -> None:
    # Prepare: float64 values cast by writers whose buffer (capacity 3) is smaller than what each write gets
    store = MemoryStore()
    layout = _layout()
    vec64 = np.random.default_rng(12).standard_normal(layout.numel)
    meta = _meta(layout, "c1", digest)
    write_update(store, "whole", layout, vec64.astype(np.float32), meta)
    upload = ObjectUpload.begin(store, "ranges", layout, meta)
    target = upload.target()
    results = []

    # Execute: three "functions" built from plain values, as another process would, written last range first
    for start, stop in [(16, 23), (0, 8), (8, 16)]:
        writer = RangeWriter(store, target.output_key, target.upload_id, target.data_start, start, layout,
                             CHUNK, target.digest, 3, "float64")
        for a in range(start, stop, 5):
            writer.write(vec64[a : min(a + 5, stop)])
        results.append(writer.finish())
    committed = upload.commit(merge_digests(results))

    # Assert
    assert store.get("ranges") == store.get("whole")
    assert committed.checksums == "".join(_chunk_digests(digest, vec64.astype(np.float32), CHUNK))


def test_commit_with_a_missing_chunk_is_refused_and_publishes_nothing() -> None:
    # Prepare: the range [20, 23) (chunk 5) is never written
    store = MemoryStore()
    layout = _layout()
    vec = _vector(layout, 13)
    upload = ObjectUpload.begin(store, "u", layout, _meta(layout, "c1"))
    writer = upload.range_writer(0)
    writer.write(vec[:20])
    written = {int(i): h for i, h in writer.finish().items()}

    # Execute / Assert
    with pytest.raises(InvocationError, match=r"cannot commit 'u': the range writers returned digests for 5 of 6 "
                                              r"chunks \(missing \[5\]\)"):
        upload.commit(written)
    with pytest.raises(InvocationError, match=r"chunk 5's digest 'abc' is not 16 hex digits of xxh3_64"):
        upload.commit(written | {5: "abc"})
    upload.abort()
    assert store.list() == []


def test_commit_refuses_digests_of_another_algorithm() -> None:
    # Prepare: an xxh3 upload given blake3 digests
    store = MemoryStore()
    layout = _layout()
    upload = ObjectUpload.begin(store, "u", layout, _meta(layout, "c1"))
    digests = dict(enumerate(_chunk_digests("blake3", _vector(layout, 14), CHUNK)))

    # Execute / Assert
    with pytest.raises(InvocationError, match=r"chunk 0's digest '[0-9a-f]{64}' is not 16 hex digits of xxh3_64"):
        upload.commit(digests)


@pytest.mark.parametrize("backend", ["local", "memory"])
def test_upload_left_by_an_exception_leaves_no_object(tmp_path: Path, backend: str) -> None:
    # Prepare
    store: Store = LocalStore(tmp_path) if backend == "local" else MemoryStore()
    layout = _layout()

    # Execute
    with pytest.raises(RuntimeError, match="function died"), \
            ObjectUpload.begin(store, "u", layout, _meta(layout, "c1", "sha256")) as upload:
        upload.range_writer(0).write(_vector(layout, 15)[:8])
        raise RuntimeError("function died")

    # Assert
    assert upload.state == "aborted"
    assert store.list() == []
    if backend == "local":
        assert list((tmp_path / ".uploads").iterdir()) == []


def test_update_writer_aborts_and_a_committed_upload_cannot_be_committed_again() -> None:
    # Prepare
    store = MemoryStore()
    layout = _layout()
    vec = _vector(layout, 16)

    # Execute
    with pytest.raises(ValueError, match="boom"), UpdateWriter(store, "u", layout, _meta(layout, "c1")) as writer:
        writer.write(vec)
        raise ValueError("boom")
    upload = ObjectUpload.begin(store, "v", layout, _meta(layout, "c1"))
    rw = upload.range_writer(0)
    rw.write(vec)
    upload.commit(merge_digests([rw.finish()]))

    # Assert
    assert store.list() == ["v"]
    with pytest.raises(GradshardError, match="upload of 'v' is committed; begin a new one"):
        upload.commit({})
    upload.abort()  # a no-op once committed
    assert store.list() == ["v"]


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_streamed_digests_do_not_depend_on_how_the_input_is_cut(data: st.DataObject) -> None:
    # Prepare: a chunk-aligned range of a vector, cut into random pieces
    digest = data.draw(st.sampled_from(ALGORITHMS))
    dtype = data.draw(st.sampled_from(["float16", "float32", "float64"]))
    numel = data.draw(st.integers(1, 300))
    chunk = data.draw(st.integers(1, 40))
    grid = checksum.ChunkGrid(numel, chunk)
    first = data.draw(st.integers(0, grid.count - 1))
    start = grid.bounds(first)[0]
    vec = np.random.default_rng(numel).standard_normal(numel).astype(dtype)
    cuts = sorted(data.draw(st.lists(st.integers(start, numel), max_size=12)))
    pieces = [vec[a:b] for a, b in zip([start, *cuts], [*cuts, numel], strict=True)]

    # Execute
    stream = checksum.ChunkStream(grid, start, digest)
    streamed = [item for piece in pieces for item in stream.feed(piece)]

    # Assert
    expected = [(i, _independent_digest(digest, vec[a:b].tobytes()))
                for i, (a, b) in ((i, grid.bounds(i)) for i in range(first, grid.count))]
    assert streamed == expected


# --- coverage ------------------------------------------------------------------------------------------------------
def test_coverage_round_trips_in_the_header() -> None:
    # Prepare
    store = MemoryStore()
    layout = _layout()
    coverage = {"z": (2, 4), "a": (5,)}

    # Execute
    write_update(store, "u", layout, _vector(layout, 17), _meta(layout, "c1", coverage=coverage))
    _, header = _header_of(store.get("u"))
    with open_update(store, "u", "c1", layout) as upd:
        back = upd.meta.coverage

    # Assert
    assert header["__metadata__"]["gradshard.coverage"] == '{"z":[2,4],"a":[5]}'
    assert back == coverage


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[1, 2]", "must be a JSON object of tensor name -> list of extents, got list"),
        ('{"z": [2, -1]}', "tensor 'z': expected a list of integers >= 0"),
        ('{"z": [2.0, 4]}', "tensor 'z': expected a list of integers >= 0"),
        ('{"z": [true]}', "tensor 'z': expected a list of integers >= 0"),
        ('{"z": 3}', "tensor 'z': expected a list of integers >= 0"),
        ('{"z": [1], "z": [2]}', "is not valid JSON: duplicate key 'z'"),
        ("{", "is not valid JSON"),
        ('{"z": [NaN]}', "is not valid JSON: NaN is not JSON"),
        ('{"' + "t" * 70_000 + '": [1]}', "is 70009 bytes, at most 65536"),
    ],
    ids=["list", "negative", "float", "bool", "scalar", "duplicate", "broken", "nan", "too-large"],
)
def test_malformed_coverage_is_rejected_with_a_reason(text: str, reason: str) -> None:
    # Prepare: a correctly sealed header (the digest verifies) whose coverage is malformed
    store = MemoryStore()
    layout = _layout()
    vec = _vector(layout, 18)
    md = update_metadata(layout, vec, client="c1", round=0, examples=10, chunk_elems=CHUNK)
    md["gradshard.coverage"] = text
    store.put("u", _plain(layout, vec, with_header_digest(layout, md)))

    # Execute / Assert
    with pytest.raises(UpdateError, match=r"metadata field 'gradshard\.coverage'") as info:
        open_update(store, "u", "c1", layout)
    assert reason in info.value.reason
    assert info.value.client == "c1"


def test_writer_refuses_malformed_coverage_and_unknown_algorithms() -> None:
    # Execute / Assert
    layout = _layout()
    with pytest.raises(GradshardError, match="invalid coverage: tensor 'z': expected a list of integers >= 0"):
        _meta(layout, "c1", coverage={"z": (-1,)})
    with pytest.raises(GradshardError, match="unknown digest algorithm 'md5'; use one of xxh3_64, blake3, sha256"):
        _meta(layout, "c1", "md5")
