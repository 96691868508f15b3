"""Hardening of the store and the runtime (issue 11): nothing in a store directory, in the working directory or in
the process limits can break a round.

- The local store refuses what is not a regular file inside its root (symlinks, symlinked parents, FIFOs, sockets,
  devices) without opening or reading it; a round rejects such an update by name and averages the others.
- Function processes never import from the working directory.
- A round of more clients than the process may open files aggregates.
- Listing walks the prefix's directory only.
- Stale uploads are collected (``gradshard gc``), never a live one.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from click.testing import CliRunner
from conftest import new_s3_store

from gradshard.aggregation.driver import AggregateConfig, AggregateResult, aggregate_round
from gradshard.cli.main import main
from gradshard.core.layout import ModelLayout
from gradshard.core.reduce import fedavg, fedavg_weights
from gradshard.core.zoo import synthetic
from gradshard.errors import StoreError, UnsafeObjectError
from gradshard.format.keys import aggregate_key, manifest_key, update_key, updates_prefix
from gradshard.format.round import RoundSpec, open_round
from gradshard.format.update import UpdateMeta, read_flat
from gradshard.format.writer import write_update
from gradshard.runtime import InlineExecutor, LocalExecutor
from gradshard.store import LocalStore, MemoryStore
from gradshard.units import MIB

R = 2
NUMEL = 3000
CHUNK = 1000
CONFIG = AggregateConfig(shards=2, window_bytes=2000)


def _vector(seed: int) -> npt.NDArray[np.float32]:
    return np.random.default_rng(seed).standard_normal(NUMEL, dtype=np.float32)


def _write(store: LocalStore, layout: ModelLayout, client: str, vector: npt.NDArray[np.float32],
           examples: int = 10) -> None:
    write_update(store, update_key(R, client), layout, vector,
                 UpdateMeta(client=client, round=R, examples=examples, layout_digest=layout.digest(),
                            chunk_elems=CHUNK))


@pytest.fixture
def layout() -> ModelLayout:
    return synthetic(NUMEL, tensor_elems=1000)


@pytest.fixture
def honest(tmp_path: Path, layout: ModelLayout) -> LocalStore:
    """A round with two honest clients, alice (seed 1) and bob (seed 2)."""
    store = LocalStore(tmp_path / "store", fsync=False)
    open_round(store, RoundSpec.create(R, layout, chunk_elems=CHUNK))
    _write(store, layout, "alice", _vector(1))
    _write(store, layout, "bob", _vector(2))
    return store


def _honest_mean() -> bytes:
    return fedavg([_vector(1), _vector(2)], fedavg_weights([10, 10]), "float32").tobytes()


def _slot(store: LocalStore, client: str) -> Path:
    path = store.root / update_key(R, client)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# --- items 4 and 5: symlinks, FIFOs, sockets, devices ----------------------------------------------------------
def test_a_symlink_to_a_valid_update_outside_the_store_is_rejected_not_averaged(
        honest: LocalStore, layout: ModelLayout, tmp_path: Path) -> None:
    # Prepare: a valid update of mallory in another directory, linked into the round
    outside = LocalStore(tmp_path / "outside", fsync=False)
    _write(outside, layout, "mallory", _vector(3))
    _slot(honest, "mallory").symlink_to(outside.root / update_key(R, "mallory"))

    # Execute
    result = aggregate_round(honest, R, InlineExecutor(), CONFIG)

    # Assert
    assert [c.client for c in result.manifest.clients] == ["alice", "bob"]
    assert "symbolic link" in result.manifest.rejected["mallory"]
    assert update_key(R, "mallory") in result.manifest.rejected["mallory"]
    assert read_flat(honest, aggregate_key(R), layout).tobytes() == _honest_mean()


def test_a_symlink_to_a_system_file_leaks_neither_its_size_nor_its_bytes(honest: LocalStore, tmp_path: Path) -> None:
    # Prepare: a "system file" whose first bytes and size would show in a header error
    secret = tmp_path / "shadow"
    secret.write_bytes(b"root:SECRET-HASH-0123456789:19000:0:99999:7:::\n" * 7)
    _slot(honest, "eve").symlink_to(secret)

    # Execute
    result = aggregate_round(honest, R, InlineExecutor(), CONFIG)

    # Assert
    reason = result.manifest.rejected["eve"]
    assert "symbolic link" in reason
    manifest = honest.get(manifest_key(R))
    for leak in (b"SECRET", b"root:", str(secret.stat().st_size).encode(), str(secret).encode()):
        assert leak not in manifest
        assert leak.decode() not in reason


def test_a_fifo_in_updates_is_rejected_without_blocking_the_round(honest: LocalStore, layout: ModelLayout) -> None:
    # Prepare
    fifo = _slot(honest, "eve")
    os.mkfifo(fifo)
    outcome: list[AggregateResult | BaseException] = []

    def run() -> None:
        try:
            outcome.append(aggregate_round(honest, R, InlineExecutor(), CONFIG))
        except BaseException as exc:  # reported below
            outcome.append(exc)

    # Execute
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(10)
    hung = thread.is_alive()
    if hung:  # release the blocked open() before failing
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)

    # Assert
    assert not hung, "the round blocked on a FIFO in updates/"
    result = outcome[0]
    assert isinstance(result, AggregateResult)
    assert "FIFO" in result.manifest.rejected["eve"]
    assert read_flat(honest, aggregate_key(R), layout).tobytes() == _honest_mean()


def _make_special(kind: str, path: Path, target: Path) -> None:
    if kind == "symlink":
        target.write_bytes(b"outside")
        path.symlink_to(target)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        cwd = os.getcwd()
        os.chdir(path.parent)  # a relative name keeps the socket address short
        try:
            sock.bind(path.name)
        finally:
            os.chdir(cwd)
            sock.close()
    elif kind == "device":
        try:
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # a /dev/null
        except PermissionError:
            pytest.skip("creating a device node needs CAP_MKNOD")
    elif kind == "symlinked-parent":
        target.mkdir()
        (target / "x").write_bytes(b"outside")
        path.parent.rmdir()
        path.parent.symlink_to(target)  # d -> target: d/x is a regular file, but outside the root


_KINDS = {"symlink": "symbolic link", "fifo": "FIFO", "socket": "socket", "device": "device",
          "symlinked-parent": "symbolic link"}


@pytest.mark.parametrize("kind", list(_KINDS))
@pytest.mark.parametrize("op", ["open_reader", "size", "get", "exists"])
def test_the_local_store_refuses_what_is_not_a_regular_file_inside_its_root(tmp_path: Path, kind: str,
                                                                            op: str) -> None:
    # Prepare
    store = LocalStore(tmp_path / "store")
    (store.root / "d").mkdir()
    path = store.root / "d" / "x"
    _make_special(kind, path, tmp_path / "target")

    # Execute / Assert: refused with the key and the kind, never blocking on a FIFO
    with pytest.raises(UnsafeObjectError) as info:
        getattr(store, op)("d/x")
    message = str(info.value)
    assert "'d/x'" in message and _KINDS[kind] in message
    assert "outside" not in message and str(tmp_path / "target") not in message


def test_the_local_store_writes_and_deletes_nothing_through_a_symlinked_directory(tmp_path: Path) -> None:
    # Prepare
    store = LocalStore(tmp_path / "store")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"keep me")
    (store.root / "d").symlink_to(outside)

    # Execute / Assert
    with pytest.raises(UnsafeObjectError, match="symbolic link"):
        store.put("d/new", b"x")
    with pytest.raises(UnsafeObjectError, match="symbolic link"):
        store.delete("d/victim")
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]
    assert (outside / "victim").read_bytes() == b"keep me"


def test_listing_names_special_files_but_never_descends_a_symlinked_directory(tmp_path: Path) -> None:
    # Prepare
    store = LocalStore(tmp_path / "store")
    store.put("a/ok", b"1")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "foreign").write_bytes(b"x")
    (store.root / "a" / "linked").symlink_to(outside)
    os.mkfifo(store.root / "a" / "pipe")

    # Execute / Assert: the round sees them (and rejects them by name); nothing outside the root is listed
    assert store.list("a/") == ["a/linked", "a/ok", "a/pipe"]
    assert store.list() == ["a/linked", "a/ok", "a/pipe"]


def test_listing_a_symlinked_prefix_directory_is_refused(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    outside = tmp_path / "outside"
    (outside / "updates").mkdir(parents=True)
    (outside / "updates" / "u").write_bytes(b"x")
    (store.root / "rounds").symlink_to(outside)

    with pytest.raises(UnsafeObjectError, match=r"'rounds' is a symbolic link"):
        store.list(updates_prefix(R))


def test_a_truncated_local_object_raises_instead_of_spinning(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("k", b"0123456789")
    with store.open_reader("k") as reader:
        os.truncate(store.root / "k", 4)
        with pytest.raises(StoreError, match="ended early"):
            reader.read_into(0, memoryview(bytearray(10)))


# --- item 14: listing walks the prefix's directory only --------------------------------------------------------
def _listing_store(root: Path) -> LocalStore:
    store = LocalStore(root, fsync=False)
    for i in range(40):
        store.put(f"elsewhere/{i:03d}/x", b"")
    for key in ("rounds/000001/updates/a", "rounds/000001/updates/b", "rounds/000010/x", "rounds/000001.txt"):
        store.put(key, b"")
    return store


def test_listing_a_prefix_visits_only_the_directories_under_it(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    store = _listing_store(tmp_path)
    visited: list[object] = []
    real_scandir = os.scandir

    def counting_scandir(path: int) -> object:
        visited.append(path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", counting_scandir)

    # Execute
    keys = store.list("rounds/000001/")

    # Assert: rounds/000001 and its updates/ only, not the 40 directories elsewhere
    assert keys == ["rounds/000001/updates/a", "rounds/000001/updates/b"]
    assert len(visited) == 2


@pytest.mark.parametrize(("prefix", "expected"), [
    ("rounds/0000", ["rounds/000001.txt", "rounds/000001/updates/a", "rounds/000001/updates/b", "rounds/000010/x"]),
    ("rounds/000001", ["rounds/000001.txt", "rounds/000001/updates/a", "rounds/000001/updates/b"]),
    ("rounds/00001", ["rounds/000010/x"]),
    ("rounds/000001/updates/a", ["rounds/000001/updates/a"]),
    ("rounds/000001/updates/a/", []),
    ("rounds/000001/upd", ["rounds/000001/updates/a", "rounds/000001/updates/b"]),
    ("missing/", []),
    ("missing/deeper/x", []),
    (".uploads/", []),
    ("r", ["rounds/000001.txt", "rounds/000001/updates/a", "rounds/000001/updates/b", "rounds/000010/x"]),
])
def test_listing_matches_prefixes_that_end_mid_name(tmp_path: Path, prefix: str, expected: list[str]) -> None:
    store = _listing_store(tmp_path)
    assert store.list(prefix) == expected


def test_listing_everything_finds_every_object(tmp_path: Path) -> None:
    store = _listing_store(tmp_path)
    keys = store.list()
    assert len(keys) == 44 and keys == sorted(keys) and "elsewhere/039/x" in keys


# --- item 8: function processes never import from the working directory ----------------------------------------
def test_a_module_in_the_working_directory_never_runs_inside_a_function(
        honest: LocalStore, layout: ModelLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a json.py (imported by every function process) in the directory the driver runs from
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    marker = tmp_path / "imported-from-cwd"
    (cwd / "json.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    monkeypatch.chdir(cwd)
    executor = LocalExecutor(workers=1)

    # Execute
    try:
        aggregate_round(honest, R, executor, CONFIG)
    finally:
        executor.close()

    # Assert
    assert not marker.exists()
    assert read_flat(honest, aggregate_key(R), layout).tobytes() == _honest_mean()


# --- item 13: more clients than open files -------------------------------------------------------------------
@pytest.fixture
def low_fd_limit() -> Iterator[int]:
    """Lower this process's soft RLIMIT_NOFILE to 128 while the test starts its executor (the zygote and every
    function process inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard))
    try:
        yield 128
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_round_of_more_clients_than_open_files_aggregates(tmp_path: Path, low_fd_limit: int) -> None:
    # Prepare: 300 clients, functions limited to 128 open files
    layout = synthetic(200, tensor_elems=100)
    store = LocalStore(tmp_path / "store", fsync=False)
    open_round(store, RoundSpec.create(R, layout, chunk_elems=100))
    vectors = [np.full(200, i, dtype=np.float32) for i in range(300)]
    for i, vector in enumerate(vectors):
        write_update(store, update_key(R, f"c{i:03d}"), layout, vector,
                     UpdateMeta(client=f"c{i:03d}", round=R, examples=1, layout_digest=layout.digest(),
                                chunk_elems=100))
    executor = LocalExecutor(workers=1, retries=0)

    # Execute
    try:
        result = aggregate_round(store, R, executor, AggregateConfig(shards=1, window_bytes=400, parallel_reads=4))
    finally:
        executor.close()

    # Assert: every client, in canonical order, the exact mean
    assert len(result.manifest.clients) == 300 and not result.manifest.rejected
    expected = fedavg(vectors, fedavg_weights([1] * 300), "float32")
    np.testing.assert_equal(read_flat(store, aggregate_key(R), layout), expected)


def test_a_reader_whose_descriptor_was_released_notices_a_replaced_object(tmp_path: Path) -> None:
    # Prepare: a store that may keep no descriptor between reads
    store = LocalStore(tmp_path, max_open_files=0)
    store.put("k", b"0123456789")
    reader = store.open_reader("k")
    buf = bytearray(4)
    reader.read_into(2, memoryview(buf))
    store.put("k", b"9876543210")  # a new file (os.replace): another inode

    # Execute / Assert
    with pytest.raises(StoreError, match=r"'k' in .* was replaced"):
        reader.read_into(0, memoryview(buf))
    reader.close()
    assert bytes(buf) == b"2345"


# --- item 11: stale uploads are collected, live ones never -----------------------------------------------------
HOUR = 3600.0


def _age(store: LocalStore, upload_id: str, seconds: float) -> None:
    """Make a local upload look idle for ``seconds``."""
    path = store.root / ".uploads" / upload_id
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_gc_collects_local_uploads_idle_past_the_threshold_and_keeps_live_ones(tmp_path: Path) -> None:
    # Prepare: an upload abandoned two hours ago, one written a minute ago
    store = LocalStore(tmp_path)
    abandoned = store.begin_upload("rounds/000001/aggregate.safetensors", 1 << 20)
    live = store.begin_upload("rounds/000002/aggregate.safetensors", 100)
    _age(store, abandoned, 2 * HOUR)
    _age(store, live, 60)

    # Execute
    listed = store.collect_stale_uploads(HOUR, dry_run=True)
    collected = store.collect_stale_uploads(HOUR)

    # Assert
    assert [u.upload_id for u in listed] == [abandoned] == [u.upload_id for u in collected]
    assert collected[0].size == 1 << 20 and collected[0].idle_s >= 2 * HOUR - 5
    assert sorted(p.name for p in (store.root / ".uploads").iterdir()) == [live]
    store.write_at("rounds/000002/aggregate.safetensors", live, 0, b"x" * 100)  # still usable


def test_an_upload_written_after_it_was_listed_is_not_removed(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    upload = store.begin_upload("k", 10)
    _age(store, upload, 2 * HOUR)
    (stale,) = store.stale_uploads(HOUR)

    store.write_at("k", upload, 0, b"0123456789")  # the round was alive after all

    assert store.remove_stale(stale) is False
    store.complete_upload("k", upload)
    assert store.get("k") == b"0123456789"


def test_memory_store_collects_stale_uploads_by_key() -> None:
    store = MemoryStore()
    first = store.begin_upload("a", 4)
    store.begin_upload("b", 4)

    found = store.stale_uploads(0, key="a")
    collected = store.collect_stale_uploads(0, key="a")

    assert [(u.upload_id, u.key) for u in found] == [(first, "a")] == [(u.upload_id, u.key) for u in collected]
    assert [u.key for u in store.stale_uploads(0)] == ["b"]
    with pytest.raises(StoreError, match="does not exist"):
        store.write_at("a", first, 0, b"x")


def test_a_round_collects_its_own_abandoned_aggregate_upload_only(honest: LocalStore) -> None:
    # Prepare: a crashed earlier run of this round (2 h ago), another round's old upload, and a live one
    own = honest.begin_upload(aggregate_key(R), 1000)
    other = honest.begin_upload(aggregate_key(R + 1), 1000)
    live = honest.begin_upload(aggregate_key(R), 1000)
    _age(honest, own, 2 * HOUR)
    _age(honest, other, 2 * HOUR)

    # Execute
    aggregate_round(honest, R, InlineExecutor(), CONFIG)

    # Assert
    assert sorted(p.name for p in (honest.root / ".uploads").iterdir()) == sorted([other, live])


def test_gc_command_lists_then_collects(tmp_path: Path) -> None:
    # Prepare
    store = LocalStore(tmp_path)
    abandoned = store.begin_upload("x", 10)
    _age(store, abandoned, 3 * HOUR)
    runner = CliRunner()

    # Execute
    dry = runner.invoke(main, ["gc", "--store", str(tmp_path), "--older-than", "2h", "--dry-run"])
    kept = (store.root / ".uploads" / abandoned).exists()
    real = runner.invoke(main, ["gc", "--store", str(tmp_path)])
    bad = runner.invoke(main, ["gc", "--store", str(tmp_path), "--older-than", "soon"])

    # Assert
    assert dry.exit_code == 0 and "would collect 1 stale upload(s), 10 bytes" in dry.output and kept
    assert real.exit_code == 0 and "collected 1 stale upload(s)" in real.output
    assert not (store.root / ".uploads" / abandoned).exists()
    assert bad.exit_code != 0 and "not an age" in bad.output


def test_s3_gc_aborts_multipart_uploads_and_deletes_fragments(s3_endpoint: str) -> None:
    # Prepare: an abandoned multipart upload with a fragment, an orphan multipart upload, a single-cell upload
    store = new_s3_store(s3_endpoint)
    big = store.begin_upload("rounds/000001/aggregate.safetensors", 11 * MIB)
    store.write_at("rounds/000001/aggregate.safetensors", big, 0, b"header")
    small = store.begin_upload("rounds/000001/manifest.json", 10)
    store.write_at("rounds/000001/manifest.json", small, 0, b"0123")
    live = store.collect_stale_uploads(HOUR)
    # moto reports a fixed start date (2010) for every multipart upload: the orphan is created after that check
    store.client.create_multipart_upload(Bucket=store.bucket, Key=store.prefix + "orphan")
    time.sleep(1.1)  # S3 times are whole seconds

    # Execute
    listed = store.stale_uploads(1)
    only_big = store.stale_uploads(1, key="rounds/000001/aggregate.safetensors")
    collected = store.collect_stale_uploads(1)

    # Assert
    assert live == []
    assert {u.key for u in listed} == {"rounds/000001/aggregate.safetensors", "rounds/000001/manifest.json",
                                       "orphan"}
    assert [u.upload_id for u in only_big] == [big]
    assert {u.upload_id for u in collected} == {u.upload_id for u in listed}
    assert store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []) == []
    assert store.client.list_objects_v2(Bucket=store.bucket).get("KeyCount", 0) == 0
    with pytest.raises(StoreError, match="does not exist"):
        store.write_at("rounds/000001/manifest.json", small, 4, b"x")
