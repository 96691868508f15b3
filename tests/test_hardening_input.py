"""Hostile update files never crash, hang or skew a round (issue 11, the input path).

Deeply nested or oversized headers, absurd example counts, dominant clients, transient store errors while reading
data, and objects that impersonate another client.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradshard.aggregation.driver import AggregateConfig, aggregate_round
from gradshard.core.layout import ModelLayout, TensorSpec
from gradshard.core.reduce import MAX_EXAMPLES, fedavg_weights
from gradshard.core.reducers import normalised_weights
from gradshard.errors import GradshardError, RoundError, StoreError, UpdateError
from gradshard.format.keys import aggregate_key, update_key
from gradshard.format.round import DOMINANT_SHARE, RoundSpec, open_round, prepare_round
from gradshard.format.update import (
    MAX_HEADER_BYTES,
    MAX_JSON_DEPTH,
    UpdateMeta,
    _json_depth_scan,
    inspect_update,
    json_depth,
    open_update,
    read_header,
)
from gradshard.format.writer import update_metadata, with_header_digest, write_update
from gradshard.runtime import InlineExecutor
from gradshard.store import MemoryStore, ObjectReader, Store

CHUNK = 4


def _layout() -> ModelLayout:
    return ModelLayout([TensorSpec("z", (3, 4), "float32"), TensorSpec("a", (5,), "float32")])


def _vector(layout: ModelLayout, seed: int) -> npt.NDArray[np.float32]:
    return np.random.default_rng(seed).standard_normal(layout.numel).astype(np.float32)


def _round(store: Store, layout: ModelLayout) -> None:
    open_round(store, RoundSpec.create(0, layout, chunk_elems=CHUNK))


def _write(store: Store, layout: ModelLayout, client: str, seed: int, *, examples: int = 10,
           key_client: str | None = None) -> None:
    meta = UpdateMeta(client=client, round=0, examples=examples, layout_digest=layout.digest(), chunk_elems=CHUNK)
    write_update(store, update_key(0, key_client or client), layout, _vector(layout, seed), meta)


def _with_header(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def _plain(layout: ModelLayout, vec: npt.NDArray[np.float32], metadata: dict[str, str]) -> bytes:
    tensors = {k: np.ascontiguousarray(v) for k, v in layout.unflatten(vec).items()}
    return bytes(safetensors.numpy.save(tensors, metadata=metadata))


# --- item 1: header size and nesting depth are bounded before parsing ---------------------------------------------
@pytest.mark.parametrize("opener, closer", [(b'{"x":', b"}"), (b"[", b"]")], ids=["objects", "arrays"])
def test_a_deeply_nested_header_is_rejected_naming_the_client(opener: bytes, closer: bytes) -> None:
    # Prepare: 100,000 levels of nesting (json.loads would raise RecursionError)
    store = MemoryStore()
    store.put("u", _with_header(opener * 100_000 + b"1" + closer * 100_000))

    # Execute / Assert
    with store.open_reader("u") as reader, pytest.raises(UpdateError, match=(
            rf"update of client 'c1' rejected: object 'u' has a header nested deeper than {MAX_JSON_DEPTH} levels")):
        read_header(reader, "u", "c1")


def test_nesting_inside_strings_is_not_counted() -> None:
    # Prepare: a valid update whose metadata value holds many brackets (inside a JSON string they are text)
    store = MemoryStore()
    layout = _layout()
    vec = _vector(layout, 1)
    metadata = update_metadata(layout, vec, client="c1", round=0, examples=3, chunk_elems=CHUNK)
    del metadata["gradshard.header_digest"]
    metadata["gradshard.x.note"] = '[{"\\' * 500
    store.put("u", _plain(layout, vec, with_header_digest(layout, metadata)))

    # Execute
    with store.open_reader("u") as reader:
        header = read_header(reader, "u", "c1")

    # Assert
    assert header.metadata["gradshard.x.note"] == '[{"\\' * 500
    assert header.header_verified


def test_a_deeply_nested_header_is_skipped_by_the_round_and_refused_by_inspect() -> None:
    # Prepare
    store = MemoryStore()
    layout = _layout()
    _round(store, layout)
    for i in range(2):
        _write(store, layout, f"c{i}", i)
    key = update_key(0, "c2")
    store.put(key, _with_header(b"[" * 100_000 + b"]" * 100_000))

    # Execute
    result = aggregate_round(store, 0, InlineExecutor(), AggregateConfig(shards=2))

    # Assert
    assert [c.client for c in result.manifest.clients] == ["c0", "c1"]
    assert result.manifest.rejected["c2"].startswith("object 'rounds/000000/updates/c2.safetensors' has a header "
                                                     "nested deeper than")
    with pytest.raises(UpdateError, match="nested deeper than"):
        inspect_update(store, key)


def test_deep_nesting_in_the_coverage_field_is_rejected() -> None:
    # Prepare: a format-1 object (no header digest) whose coverage JSON nests 30,000 levels (64 KiB fits that)
    store = MemoryStore()
    layout = _layout()
    vec = _vector(layout, 1)
    metadata = update_metadata(layout, vec, client="c1", round=0, examples=3, chunk_elems=CHUNK)
    del metadata["gradshard.header_digest"]
    metadata |= {"gradshard.format": "1", "gradshard.coverage": "[" * 30_000 + "]" * 30_000}
    store.put("u", _plain(layout, vec, metadata))

    # Execute / Assert
    with pytest.raises(UpdateError, match=r"'gradshard.coverage' is not valid JSON: nested deeper than"):
        open_update(store, "u", "c1", layout)


def test_a_header_over_the_documented_maximum_is_rejected_before_it_is_read() -> None:
    # Prepare: a length field just over the maximum, on an object that is long enough to hold it
    class SizedReader(ObjectReader):
        size = 8 + MAX_HEADER_BYTES + 1

        def read_into(self, offset: int, buf: memoryview) -> None:
            if offset != 0:
                raise AssertionError("the header itself must not be read")
            buf[:] = struct.pack("<Q", MAX_HEADER_BYTES + 1)

    # Execute / Assert
    with pytest.raises(UpdateError, match=rf"has a header length of {MAX_HEADER_BYTES + 1} bytes, over the maximum "
                                          rf"of {MAX_HEADER_BYTES}"):
        read_header(SizedReader(), "u", "c1")


def test_the_maximum_header_holds_4096_sha256_chunks_and_100k_tensors() -> None:
    # 100,000 tensors with 64-character names and 4-d shapes, 4096 chunk digests of 64 hex digits
    entry = json.dumps({"x" * 64: {"dtype": "F32", "shape": [1024, 1024, 1024, 1024],
                                   "data_offsets": [10**12, 10**12 + 4]}})
    assert 100_000 * len(entry) + 4096 * 64 + 64 * 1024 < MAX_HEADER_BYTES < 100 * 1024 * 1024


# --- item 2: example counts are bounded, weights never overflow, a dominant client is reported -------------------
@pytest.mark.parametrize("examples", [10**400, 10**30, MAX_EXAMPLES + 1], ids=["1e400", "1e30", "max+1"])
def test_an_example_count_over_the_maximum_rejects_the_client(examples: int) -> None:
    # Prepare: c2 claims an absurd number of examples
    store = MemoryStore()
    layout = _layout()
    _round(store, layout)
    _write(store, layout, "c0", 0)
    _write(store, layout, "c1", 1)
    vec = _vector(layout, 2)
    md = update_metadata(layout, vec, client="c2", round=0, examples=1, chunk_elems=CHUNK)
    del md["gradshard.header_digest"]
    md["gradshard.examples"] = str(examples)
    store.put(update_key(0, "c2"), _plain(layout, vec, with_header_digest(layout, md)))

    # Execute
    result = aggregate_round(store, 0, InlineExecutor(), AggregateConfig(shards=2))

    # Assert
    assert [c.client for c in result.manifest.clients] == ["c0", "c1"]
    assert result.manifest.rejected["c2"].startswith(f"metadata field 'gradshard.examples' must be <= {MAX_EXAMPLES}")


def test_the_writer_refuses_an_example_count_over_the_maximum() -> None:
    layout = _layout()
    with pytest.raises(GradshardError, match=rf"examples must be between 1 and {MAX_EXAMPLES}"):
        UpdateMeta(client="c1", round=0, examples=MAX_EXAMPLES + 1, layout_digest=layout.digest(),
                   chunk_elems=CHUNK)


def test_weights_never_overflow() -> None:
    # Example counts beyond float range are refused by name, server weights near the float maximum are fine
    with pytest.raises(GradshardError, match=rf"at most {MAX_EXAMPLES} examples"):
        fedavg_weights([10**400, 100])
    with pytest.raises(GradshardError, match="client weights must be finite and > 0"):
        normalised_weights([10**400, 100])
    assert normalised_weights([1e308, 1e308, 1e308]) == [1 / 3, 1 / 3, 1 / 3]
    assert normalised_weights([1.7e308, 1.7e308]) == [0.5, 0.5]
    # the same bits as the plain formula wherever that one does not overflow
    counts = [3, 10**12, 7, 123_456_789]
    assert normalised_weights([float(n) for n in counts]) == [n / sum(counts) for n in counts]
    assert fedavg_weights(counts) == [n / sum(counts) for n in counts]


def test_a_dominant_client_is_named_in_the_manifest_and_the_log(caplog: pytest.LogCaptureFixture) -> None:
    # Prepare: c1 claims 10^12 examples next to two clients with 100
    store = MemoryStore()
    layout = _layout()
    _round(store, layout)
    for i, n in enumerate([100, 10**12, 100]):
        _write(store, layout, f"c{i}", i, examples=n)

    # Execute
    with caplog.at_level(logging.WARNING, logger="gradshard.format.round"):
        manifest = prepare_round(store, 0)

    # Assert
    assert [c.client for c in manifest.clients] == ["c0", "c1", "c2"]
    assert set(manifest.warnings) == {"c1"}
    assert manifest.warnings["c1"].startswith(f"holds 100.0000% of the round's weight (more than "
                                              f"{DOMINANT_SHARE:.0%}): 1000000000000 of 1000000000200 examples")
    assert "client 'c1' holds 100.0000% of the round's weight" in caplog.text


def test_balanced_clients_and_uniform_weighting_give_no_warning() -> None:
    # Prepare
    store = MemoryStore()
    layout = _layout()
    _round(store, layout)
    for i, n in enumerate([100, 10**12, 100]):
        _write(store, layout, f"c{i}", i, examples=n)

    # Execute / Assert
    assert prepare_round(store, 0, weighting="uniform").warnings == {}
    _write(store, layout, "c1", 1, examples=150)
    assert prepare_round(store, 0).warnings == {}


# --- item 7: a transient store error while reading data is retried, never a rejection -----------------------------
class FlakyStore(MemoryStore):
    """A memory store whose reads of one object's data section fail ``failures`` times (then succeed)."""

    def __init__(self, key: str, failures: int = 1) -> None:
        super().__init__()
        self.flaky_key, self.failures = key, failures

    def open_reader(self, key: str) -> ObjectReader:
        inner = super().open_reader(key)
        if key != self.flaky_key:
            return inner
        store = self
        prefix = bytearray(8)
        inner.read_into(0, memoryview(prefix))
        (header_len,) = struct.unpack("<Q", prefix)

        class Reader(ObjectReader):
            size = inner.size

            def read_into(self, offset: int, buf: memoryview) -> None:
                if offset >= 8 + header_len and store.failures > 0:
                    store.failures -= 1
                    raise StoreError(f"connection reset while reading {key!r} (simulated)")
                inner.read_into(offset, buf)

        return Reader()


def _flaky_round(store: MemoryStore, layout: ModelLayout) -> None:
    _round(store, layout)
    for i in range(3):
        _write(store, layout, f"c{i}", i, examples=10 + i)


def test_a_transient_read_error_is_retried_and_the_round_keeps_every_client() -> None:
    # Prepare: the same round in a healthy store and in one where reading c1's data fails once
    layout = _layout()
    healthy, flaky = MemoryStore(), FlakyStore(update_key(0, "c1"))
    _flaky_round(healthy, layout)
    _flaky_round(flaky, layout)
    config = AggregateConfig(shards=2)

    # Execute
    expected = aggregate_round(healthy, 0, InlineExecutor(retries=2), config)
    result = aggregate_round(flaky, 0, InlineExecutor(retries=2), config)

    # Assert
    assert flaky.failures == 0
    assert result.manifest.rejected == {} and [c.client for c in result.manifest.clients] == ["c0", "c1", "c2"]
    assert max(r.attempts for r in result.reports) == 2
    assert flaky.get(aggregate_key(0)) == healthy.get(aggregate_key(0))
    assert expected.manifest.rejected == {}


def test_a_persistent_read_error_fails_the_round_instead_of_dropping_the_client() -> None:
    # Prepare
    layout = _layout()
    store = FlakyStore(update_key(0, "c1"), failures=100)
    _flaky_round(store, layout)

    # Execute / Assert: never published without c1
    with pytest.raises(GradshardError, match="connection reset while reading"):
        aggregate_round(store, 0, InlineExecutor(retries=1), AggregateConfig(shards=2))
    assert not store.exists(aggregate_key(0))


# --- item 9: an impostor is rejected alone ------------------------------------------------------------------------
def test_an_impostor_is_rejected_and_the_client_it_names_is_kept() -> None:
    # Prepare: honest c1, and an object filed as c9 whose metadata claims to be c1
    store = MemoryStore()
    layout = _layout()
    _round(store, layout)
    for i in range(3):
        _write(store, layout, f"c{i}", i)
    _write(store, layout, "c1", 9, key_client="c9")

    # Execute
    manifest = prepare_round(store, 0)

    # Assert
    assert manifest.rejected == {"c9": "object is filed as client 'c9' but its metadata names 'c1'"}
    assert [c.client for c in manifest.clients] == ["c0", "c1", "c2"]
    with pytest.raises(RoundError, match=r"client 'c9' rejected: object is filed as client 'c9' but its metadata "
                                         r"names 'c1'"):
        prepare_round(store, 0, policy="fail")


# --- item 6: format v2 header digest --------------------------------------------------------------------------------
def test_changing_the_example_count_in_a_v2_header_is_rejected() -> None:
    # Prepare: 55 -> 45 in place (same length, so the object stays well-formed)
    store = MemoryStore()
    layout = _layout()
    _write(store, layout, "c1", 1, examples=55)
    blob = store.get(update_key(0, "c1"))
    assert blob.count(b'"gradshard.examples":"55"') == 1
    store.put("tampered", blob.replace(b'"gradshard.examples":"55"', b'"gradshard.examples":"45"'))

    # Execute / Assert
    with pytest.raises(UpdateError, match=r"client 'c1' rejected: header digest mismatch: object 'tampered'"):
        open_update(store, "tampered", "c1", layout)


def test_inspect_reports_a_v1_object_as_unverified_and_a_v2_object_as_verified() -> None:
    # Prepare
    store = MemoryStore()
    layout = _layout()
    vec = _vector(layout, 1)
    md: dict[str, Any] = update_metadata(layout, vec, client="c1", round=0, examples=3, chunk_elems=CHUNK)
    del md["gradshard.header_digest"]
    md["gradshard.format"] = "1"
    store.put("v1", _plain(layout, vec, md))
    _write(store, layout, "c2", 2)

    # Execute
    v1 = inspect_update(store, "v1", layout)
    v2 = inspect_update(store, update_key(0, "c2"), layout)

    # Assert
    assert (v1["format"], v1["header_verified"]) == ("1", False)
    assert (v2["format"], v2["header_verified"]) == ("2", True)


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab\u00e9', max_size=6),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text('[{"\\', max_size=3), inner,
                                                                                 max_size=3), max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(value=_JSON)
def test_the_depth_scan_agrees_with_the_parsed_json(value: Any) -> None:
    text = json.dumps(value, ensure_ascii=False).encode()
    assert json_depth(text, 100) == _depth(value)


@settings(max_examples=300, deadline=None)
@given(text=st.binary(max_size=80).map(lambda b: bytes(b'[]{}" a'[x % 7] for x in b))
       | st.text(alphabet='[]{}"\\a', max_size=40).map(str.encode), limit=st.integers(0, 12))
def test_the_quick_depth_count_agrees_with_the_block_scan(text: bytes, limit: int) -> None:
    # Texts without escapes and with balanced quotes take the quick count; any text, valid JSON or not, must get
    # the block scan's answer (unbalanced quotes and backslashes included: those take the scan itself)
    assert json_depth(text, limit) == _json_depth_scan(text, limit)


def _reader(blob: bytes) -> ObjectReader:
    store = MemoryStore()
    store.put("u", blob)
    return store.open_reader("u")


def test_a_header_in_layout_order_reads_the_same_with_and_without_the_layout() -> None:
    # Prepare: our writer's file (layout order) and the safetensors library's (its own order)
    layout, store = _layout(), MemoryStore()
    _round(store, layout)
    _write(store, layout, "c1", 0)
    ours = store.get(update_key(0, "c1"))
    theirs = _plain(layout, _vector(layout, 0), {})

    for blob in (ours, theirs):
        # Execute
        with_layout = read_header(_reader(blob), "u", "c1", layout=layout)
        without = read_header(_reader(blob), "u", "c1")

        # Assert: the same entries, whichever path read them
        assert with_layout == without
    assert read_header(_reader(ours), "u", "c1", layout=layout).tensors["a"].begin == 12 * 4


@pytest.mark.parametrize("change", ["shape", "dtype", "offsets", "extra key", "missing tensor"])
def test_a_header_that_differs_from_the_layout_is_parsed_in_full(change: str) -> None:
    # Prepare: a header that is the layout's table but for one change
    layout = _layout()
    header: dict[str, dict[str, Any]] = {"z": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]},
              "a": {"dtype": "F32", "shape": [5], "data_offsets": [48, 68]}}
    if change == "shape":
        header["a"]["shape"] = [4]
    elif change == "dtype":
        header["a"]["dtype"] = "F16"
    elif change == "offsets":
        header["z"]["data_offsets"], header["a"]["data_offsets"] = [20, 68], [0, 20]
    elif change == "extra key":
        header["a"]["extra"] = 1
    else:
        del header["a"]
    data_len = max(int(e["data_offsets"][1]) for e in header.values())
    blob = _with_header(json.dumps(header).encode(), bytes(data_len))

    # Execute: read with the layout, and entry by entry
    def outcome(**kwargs: Any) -> Any:
        try:
            return read_header(_reader(blob), "u", "c1", **kwargs).tensors
        except UpdateError as exc:
            return str(exc)

    # Assert: the layout never makes a different table pass, or change what is read
    assert outcome(layout=layout) == outcome()
    if change == "offsets":
        assert outcome()["a"].begin == 0


class HeaderFlakyStore(MemoryStore):
    """A memory store whose first ``failures`` opens of one object fail with a store error."""

    def __init__(self, key: str, failures: int) -> None:
        super().__init__()
        self.flaky_key, self.failures = key, failures

    def open_reader(self, key: str) -> ObjectReader:
        if key == self.flaky_key and self.failures > 0:
            self.failures -= 1
            raise StoreError(f"connection reset while opening {key}")
        return super().open_reader(key)


def _two_client_round(store: MemoryStore) -> ModelLayout:
    layout = ModelLayout([TensorSpec("w", (8,), "float32")])
    open_round(store, RoundSpec.create(0, layout, chunk_elems=4))
    for client in ("c0", "c1"):
        write_update(store, update_key(0, client), layout, np.ones(8, dtype=np.float32),
                     UpdateMeta(client=client, round=0, examples=1, layout_digest=layout.digest(), chunk_elems=4))
    return layout


def test_a_transient_error_while_validating_headers_is_retried_and_keeps_the_client() -> None:
    store = HeaderFlakyStore(update_key(0, "c1"), failures=2)
    _two_client_round(store)
    manifest = prepare_round(store, 0)
    assert [c.client for c in manifest.clients] == ["c0", "c1"] and store.failures == 0


def test_a_persistent_error_while_validating_headers_fails_the_round_naming_the_client() -> None:
    store = HeaderFlakyStore(update_key(0, "c1"), failures=100)
    _two_client_round(store)
    with pytest.raises(RoundError, match=r"reading the header of client 'c1' .* failed 3 times; last: connection"):
        prepare_round(store, 0)


def test_the_writer_refuses_a_header_no_reader_would_accept(monkeypatch: pytest.MonkeyPatch) -> None:
    from gradshard.format import writer

    layout = ModelLayout([TensorSpec(f"t{i:05d}", (1,), "float32") for i in range(200)])
    monkeypatch.setattr(writer, "MAX_HEADER_BYTES", 4096)
    with pytest.raises(GradshardError, match="over the 4,096 readers accept"):
        write_update(MemoryStore(), "u", layout, np.zeros(200, dtype=np.float32),
                     UpdateMeta(client="c", round=0, examples=1, layout_digest=layout.digest(), chunk_elems=8))


@settings(max_examples=60, deadline=None)
@given(names=st.lists(st.text(alphabet="AZaz_09.é\\\"", min_size=1, max_size=6), min_size=1, max_size=6,
                      unique=True),
       extra=st.dictionaries(st.text(alphabet="abc_.Z", min_size=1, max_size=5), st.text(max_size=8), max_size=4))
def test_the_layout_header_digest_is_the_canonical_one(names: list[str], extra: dict[str, str]) -> None:
    # Prepare: a layout with names that sort before and after "__metadata__", metadata with unsigned fields too
    from gradshard.format.update import canonical_header, layout_header_digest, tensor_table

    layout = ModelLayout([TensorSpec(n, (i + 1, 2), "float32") for i, n in enumerate(names)])
    metadata = {**extra, "gradshard.header_digest": "x" * 64, "gradshard.signature": "y" * 128}
    header = {"__metadata__": metadata, **tensor_table(layout)}

    # Assert: the same sha256 as the canonical encoding of the whole parsed header
    expected = hashlib.sha256(canonical_header(header)).hexdigest()
    assert layout_header_digest(metadata, layout) == expected


def test_a_table_equal_to_the_layouts_but_encoded_otherwise_takes_the_full_path() -> None:
    # 1.0 and true equal 1 in Python; the header's own bytes (and so its digest) differ: never the shortcut
    from gradshard.format.update import _is_layout_table, tensor_table

    layout = _layout()
    header: dict[str, Any] = {"__metadata__": {}, **tensor_table(layout)}
    assert _is_layout_table(header, layout)
    header["a"] = {**header["a"], "shape": [5.0]}
    assert not _is_layout_table(header, layout)


def _written_header(layout: ModelLayout) -> bytes:
    store = MemoryStore()
    _round(store, layout)
    _write(store, layout, "c1", 0)
    blob = store.get(update_key(0, "c1"))
    (n,) = struct.unpack("<Q", blob[:8])
    return blob[8 : 8 + n]


def test_our_writers_header_is_read_by_parsing_its_metadata_only() -> None:
    # Prepare: the header gradshard's writer made for the layout
    from gradshard.format.update import _layout_shaped

    layout = _layout()
    raw = _written_header(layout)

    # Execute
    metadata_text = _layout_shaped(raw, layout)

    # Assert: the bytes cut out are the metadata's, alone; another layout's table is not matched
    assert metadata_text is not None
    assert json.loads(metadata_text) == json.loads(raw)["__metadata__"]
    assert _layout_shaped(raw, ModelLayout([TensorSpec("z", (3, 4), "float32"), TensorSpec("a", (6,), "float32")])) \
        is None
    assert _layout_shaped(raw.replace(b'"__metadata__"', b'"__metadata__" ', 1), layout) is None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_mutated_header_reads_the_same_with_and_without_the_layout(data: st.DataObject) -> None:
    # Prepare: our writer's header with bytes replaced, inserted or removed anywhere (the data is sized to fit)
    layout = _layout()
    raw = bytearray(_written_header(layout))
    at = data.draw(st.integers(0, len(raw)))
    cut = data.draw(st.integers(0, 3))
    new = data.draw(st.binary(max_size=3) | st.sampled_from([b'"', b"}", b",", b'\\"', b'{"x":"1"}', b" "]))
    raw[at : at + cut] = new
    blob = _with_header(bytes(raw), bytes(layout.numel * 4))

    def outcome(**kwargs: Any) -> Any:
        try:
            header = read_header(_reader(blob), "u", "c1", **kwargs)
        except UpdateError as exc:
            return "error", str(exc)
        return header

    # Assert: the layout's shortcut accepts exactly what the full parse accepts, with the same result or message
    assert outcome(layout=layout) == outcome()


def test_a_trailing_comma_after_the_metadata_is_invalid_whatever_the_layout() -> None:
    # an empty layout's table is nothing: '{"__metadata__":{...},}' must not pass as metadata plus that table
    from gradshard.format.update import _layout_shaped

    raw = b'{"__metadata__":{"a":"b"},}'
    assert _layout_shaped(raw, ModelLayout([])) is None
    with pytest.raises(UpdateError, match="not valid JSON"):
        read_header(_reader(_with_header(raw)), "u", "c1", layout=ModelLayout([]))
