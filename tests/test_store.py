"""Tests of the object-store contract, run against every backend: LocalStore (with and without fsync), MemoryStore
and S3Store (against the session's local moto server, over HTTP)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import new_s3_store

from gradshard.errors import ObjectNotFoundError, StoreError
from gradshard.store import LocalStore, MemoryStore, S3Store, Store, open_store

BACKENDS = ["local", "local-nofsync", "memory", "s3"]


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    kind = request.param
    if kind == "memory":
        yield MemoryStore()
    elif kind == "s3":
        yield new_s3_store(request.getfixturevalue("s3_endpoint"))
    else:
        yield LocalStore(tmp_path / "store", fsync=kind == "local")


# --- whole objects -----------------------------------------------------------------------------------------------
def test_put_then_get_returns_the_same_bytes(store: Store) -> None:
    # Prepare
    blob = bytes(range(256)) * 3

    # Execute
    store.put("rounds/000000/x.bin", blob)

    # Assert
    assert store.get("rounds/000000/x.bin") == blob
    assert store.size("rounds/000000/x.bin") == len(blob)
    assert store.exists("rounds/000000/x.bin")


def test_get_range_returns_the_byte_range(store: Store) -> None:
    # Prepare
    blob = bytes(range(200))
    store.put("a", blob)

    # Execute
    parts = [store.get_range("a", 0, 10), store.get_range("a", 55, 56), store.get_range("a", 190, 200),
             store.get_range("a", 7, 7)]

    # Assert
    assert parts == [blob[:10], blob[55:56], blob[190:], b""]


def test_reading_past_the_end_is_refused(store: Store) -> None:
    # Prepare
    store.put("a", b"0123456789")

    # Execute / Assert
    with pytest.raises(StoreError, match=r"read of bytes \[5, 11\) is outside object 'a' of 10 bytes"):
        store.get_range("a", 5, 11)


def test_empty_object_round_trips(store: Store) -> None:
    # Execute
    store.put("empty", b"")

    # Assert
    assert store.get("empty") == b""
    assert store.size("empty") == 0
    assert store.list() == ["empty"]


def test_put_accepts_numpy_arrays_and_memoryviews(store: Store) -> None:
    # Prepare
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    view = memoryview(np.arange(4, dtype=np.int64))

    # Execute
    store.put("arr", arr)
    store.put("view", view)

    # Assert: every byte, not one per element
    assert store.get("arr") == arr.tobytes()
    assert store.get("view") == view.tobytes()
    assert store.size("arr") == 24


def test_put_replaces_atomically(store: Store) -> None:
    # Prepare: a reader opened on the old version
    store.put("obj", b"A" * 1000)
    old_reader = store.open_reader("obj")

    # Execute
    store.put("obj", b"B" * 500)

    # Assert: the old reader still sees the whole old object (S3 without versioning: refuses, never mixes),
    # new reads see the whole new one
    buf = bytearray(1000)
    if isinstance(store, S3Store):
        with pytest.raises(StoreError, match=r"'obj' .* changed while it was being read"):
            old_reader.read_into(0, memoryview(buf))
    else:
        old_reader.read_into(0, memoryview(buf))
        assert bytes(buf) == b"A" * 1000
    old_reader.close()
    assert store.get("obj") == b"B" * 500
    assert store.list() == ["obj"]


def test_list_is_sorted_and_filtered_by_prefix(store: Store) -> None:
    # Prepare
    keys = ["rounds/000001/b", "rounds/000000/updates/z.safetensors", "rounds/000000/updates/a.safetensors",
            "other", "rounds/000000/round.json"]
    for k in keys:
        store.put(k, k.encode())

    # Execute
    everything = store.list()
    updates = store.list("rounds/000000/updates/")
    round0 = store.list("rounds/000000")
    none = store.list("nothing/")

    # Assert
    assert everything == sorted(keys)
    assert updates == ["rounds/000000/updates/a.safetensors", "rounds/000000/updates/z.safetensors"]
    assert round0 == ["rounds/000000/round.json", "rounds/000000/updates/a.safetensors",
                      "rounds/000000/updates/z.safetensors"]
    assert none == []


def test_delete_removes_and_missing_delete_is_fine(store: Store) -> None:
    # Prepare
    store.put("a/b", b"x")

    # Execute
    store.delete("a/b")
    store.delete("a/b")
    store.delete("never/there")

    # Assert
    assert not store.exists("a/b")
    assert store.list() == []


@pytest.mark.parametrize("op", ["get", "size", "open_reader", "get_range"])
def test_missing_object_raises_not_found_naming_the_key(store: Store, op: str) -> None:
    # Prepare
    key = "rounds/000003/missing.bin"
    call = {"get": lambda: store.get(key), "size": lambda: store.size(key),
            "open_reader": lambda: store.open_reader(key), "get_range": lambda: store.get_range(key, 0, 1)}[op]

    # Execute / Assert
    with pytest.raises(ObjectNotFoundError, match=r"object 'rounds/000003/missing.bin' does not exist") as info:
        call()
    assert isinstance(info.value, KeyError)  # callers may catch KeyError
    assert not store.exists(key)


@pytest.mark.parametrize("key", ["../x", ".hidden", "a//b", "", "a/../b", "a/./b", "a/.tmp", "/abs", "a/", "sp ace"])
def test_invalid_keys_are_rejected(store: Store, key: str) -> None:
    # Execute / Assert
    with pytest.raises(StoreError, match="invalid object key"):
        store.put(key, b"x")
    with pytest.raises(StoreError, match="invalid object key"):
        store.begin_upload(key, 1)
    with pytest.raises(StoreError, match="invalid object key"):
        store.get(key)
    with pytest.raises(StoreError, match="invalid object key"):
        store.delete(key)
    assert store.list() == []


# --- uploads -----------------------------------------------------------------------------------------------------
def test_upload_written_by_several_writers_is_byte_exact(store: Store) -> None:
    # Prepare: 64 disjoint pieces written concurrently, out of order
    rng = np.random.default_rng(7)
    blob = rng.integers(0, 256, 64 * 1000 + 13, dtype=np.uint8).tobytes()
    cuts = [0, *sorted(rng.choice(np.arange(1, len(blob)), 63, replace=False).tolist()), len(blob)]
    pieces = [(a, blob[a:b]) for a, b in itertools.pairwise(cuts)]
    order = rng.permutation(len(pieces))
    upload_id = store.begin_upload("out/agg.bin", len(blob))

    # Execute
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda i: store.write_at("out/agg.bin", upload_id, *pieces[i]), order))
    visible_before = store.exists("out/agg.bin")
    store.complete_upload("out/agg.bin", upload_id)

    # Assert
    assert not visible_before
    assert store.get("out/agg.bin") == blob


def test_upload_in_progress_is_neither_listed_nor_visible(store: Store) -> None:
    # Prepare
    store.put("rounds/000000/done", b"ok")

    # Execute
    upload_id = store.begin_upload("rounds/000000/pending", 10)
    store.write_at("rounds/000000/pending", upload_id, 0, b"0123456789")

    # Assert
    assert store.list() == ["rounds/000000/done"]
    assert store.list("rounds/000000/") == ["rounds/000000/done"]
    assert not store.exists("rounds/000000/pending")
    with pytest.raises(ObjectNotFoundError, match="rounds/000000/pending"):
        store.get("rounds/000000/pending")


def test_unwritten_bytes_of_an_upload_are_zero(store: Store) -> None:
    # Prepare
    upload_id = store.begin_upload("z", 8)

    # Execute
    store.write_at("z", upload_id, 2, b"ab")
    store.complete_upload("z", upload_id)

    # Assert
    assert store.get("z") == b"\0\0ab\0\0\0\0"


def test_aborted_upload_is_invisible_and_closed(store: Store) -> None:
    # Prepare
    upload_id = store.begin_upload("k", 4)
    store.write_at("k", upload_id, 0, b"abcd")

    # Execute
    store.abort_upload("k", upload_id)
    store.abort_upload("k", upload_id)  # aborting twice is harmless

    # Assert
    assert not store.exists("k")
    assert store.list() == []
    with pytest.raises(StoreError, match=rf"upload {upload_id} of 'k' does not exist"):
        store.write_at("k", upload_id, 0, b"x")
    with pytest.raises(StoreError, match=rf"upload {upload_id} of 'k' does not exist"):
        store.complete_upload("k", upload_id)


def test_completed_upload_cannot_be_written_again(store: Store) -> None:
    # Prepare
    upload_id = store.begin_upload("k", 2)
    store.write_at("k", upload_id, 0, b"ok")
    store.complete_upload("k", upload_id)

    # Execute / Assert
    with pytest.raises(StoreError, match="does not exist"):
        store.write_at("k", upload_id, 0, b"no")
    assert store.get("k") == b"ok"


@pytest.mark.parametrize(("offset", "data"), [(8, b"xyz"), (10, b"x"), (-1, b"x"), (0, b"x" * 11)])
def test_write_outside_the_upload_is_refused(store: Store, offset: int, data: bytes) -> None:
    # Prepare
    upload_id = store.begin_upload("k", 10)

    # Execute / Assert
    with pytest.raises(StoreError, match=rf"write of bytes \[{offset}, {offset + len(data)}\) is outside upload"):
        store.write_at("k", upload_id, offset, data)
    store.abort_upload("k", upload_id)


def test_upload_of_negative_size_is_refused(store: Store) -> None:
    # Execute / Assert
    with pytest.raises(StoreError, match="needs a non-negative size, got -1"):
        store.begin_upload("k", -1)


def test_sequential_upload_publishes_on_success_and_leaves_nothing_on_failure(store: Store) -> None:
    # Prepare
    blob = bytes(range(256)) * 40

    # Execute
    with store.upload("done", len(blob)) as writer:
        for lo in range(0, len(blob), 1000):
            writer.write(blob[lo : lo + 1000])
    with pytest.raises(RuntimeError, match="client went away"), store.upload("failed", 10) as writer:
        writer.write(b"12345")
        raise RuntimeError("client went away")

    # Assert
    assert store.get("done") == blob
    assert store.list() == ["done"]


def test_upload_replaces_an_existing_object_on_completion(store: Store) -> None:
    # Prepare
    store.put("k", b"old")
    upload_id = store.begin_upload("k", 3)
    store.write_at("k", upload_id, 0, b"new")

    # Execute
    before = store.get("k")
    store.complete_upload("k", upload_id)

    # Assert
    assert before == b"old"
    assert store.get("k") == b"new"


# --- I/O counters ------------------------------------------------------------------------------------------------
def test_io_counters_count_requests_and_bytes(store: Store) -> None:
    # Prepare
    start = store.io.as_dict()

    # Execute
    store.put("a", b"x" * 10)
    after_put = store.io.as_dict()
    store.get("a")
    store.get_range("a", 2, 5)
    after_get = store.io.as_dict()
    upload_id = store.begin_upload("b", 6)
    store.write_at("b", upload_id, 0, b"abc")
    store.write_at("b", upload_id, 3, b"def")
    store.complete_upload("b", upload_id)
    store.size("b")
    store.list()
    after_upload = store.io.as_dict()

    # Assert
    assert start == {"gets": 0, "puts": 0, "bytes_read": 0, "bytes_written": 0}
    assert after_put == {"gets": 0, "puts": 1, "bytes_read": 0, "bytes_written": 10}
    assert after_get == {"gets": 2, "puts": 1, "bytes_read": 13, "bytes_written": 10}
    assert after_upload == {"gets": 2, "puts": 4, "bytes_read": 13, "bytes_written": 16}


# --- backend specifics -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fsync", [True, False])
def test_local_store_keeps_uploads_under_the_hidden_uploads_dir(tmp_path: Path, fsync: bool) -> None:
    # Prepare
    store = LocalStore(tmp_path, fsync=fsync)

    # Execute
    upload_id = store.begin_upload("x/y", 3)
    pending = list((tmp_path / ".uploads").iterdir())
    store.write_at("x/y", upload_id, 0, b"abc")
    store.complete_upload("x/y", upload_id)

    # Assert
    assert [p.name for p in pending] == [upload_id]
    assert list((tmp_path / ".uploads").iterdir()) == []
    assert (tmp_path / "x" / "y").read_bytes() == b"abc"
    assert store.list() == ["x/y"]


@pytest.mark.parametrize("fsync", [True, False])
def test_local_store_reopens_from_its_spec(tmp_path: Path, fsync: bool) -> None:
    # Prepare
    store = LocalStore(tmp_path / "s", fsync=fsync)
    store.put("k", b"data")

    # Execute
    reopened = open_store(store.spec())

    # Assert
    assert isinstance(reopened, LocalStore)
    assert reopened.fsync is fsync
    assert reopened.get("k") == b"data"
    assert store.spec() == {"kind": "local", "root": str((tmp_path / "s").resolve()), "fsync": fsync,
                            "sync_ranges": True}


def test_local_store_ignores_hidden_files_in_listing(tmp_path: Path) -> None:
    # Prepare
    store = LocalStore(tmp_path)
    store.put("a/b", b"1")
    (tmp_path / "a" / ".partial").write_bytes(b"junk")

    # Execute / Assert
    assert store.list() == ["a/b"]


def test_a_directory_is_not_an_object(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("rounds/000000/x", b"1")

    assert not store.exists("rounds/000000")
    with pytest.raises(ObjectNotFoundError, match="does not exist"):
        store.size("rounds")


def test_memory_store_cannot_be_shared_across_processes() -> None:
    # Execute / Assert
    with pytest.raises(StoreError, match="lives in one process"):
        MemoryStore().spec()


def test_upload_ids_are_checked(tmp_path: Path) -> None:
    # Prepare
    store = LocalStore(tmp_path)

    # Execute / Assert
    with pytest.raises(StoreError, match="is not an upload of 'k'"):
        store.write_at("k", "../../etc", 0, b"x")
    other = store.begin_upload("other", 4)
    with pytest.raises(StoreError, match="is not an upload of 'k'"):
        store.write_at("k", other, 0, b"x")
    with pytest.raises(StoreError, match="is not an upload of 'k'"):
        store.complete_upload("k", other)


def test_a_durable_local_writer_writes_its_own_range_back_when_it_closes(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: record the ranges written back (the real call is Linux's sync_file_range)
    from gradshard.store import local

    synced: list[tuple[int, int]] = []
    real = local._SYNC_FILE_RANGE
    monkeypatch.setattr(local, "_SYNC_FILE_RANGE", lambda fd, offset, n: synced.append((offset, n)) or (
        real(fd, offset, n) if real is not None else None))
    durable, scratch = LocalStore(tmp_path / "durable"), LocalStore(tmp_path / "scratch", fsync=False)
    at_commit = LocalStore(tmp_path / "at-commit", sync_ranges=False)  # durable, everything flushed at the commit

    # Execute: two writers fill two ranges of one upload, as two shard functions do
    for store in (durable, scratch, at_commit):
        upload = store.begin_upload("obj", 10_000)
        for start in (0, 4_000):
            writer = store.writer("obj", upload, start)
            writer.write(bytes([start // 4_000 + 1]) * (4_000 if start == 0 else 6_000))
            writer.close()
        store.complete_upload("obj", upload)

    # Assert: each range synced once by the durable store, none by the others; same bytes every way
    assert synced == [(0, 4_000), (4_000, 6_000)]
    assert durable.get("obj") == scratch.get("obj") == at_commit.get("obj") == b"\x01" * 4_000 + b"\x02" * 6_000
    assert open_store(at_commit.spec()).spec() == at_commit.spec()
