"""S3-specific behaviour of S3Store against a local moto server over HTTP: multipart uploads on the cell grid,
concurrent ranged reads, retries (through a fault-injecting proxy), clear errors, and whole aggregation and
training rounds through S3 giving the same bytes as the local store."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import new_s3_store
from hypothesis import given
from hypothesis import strategies as st
from s3_server import BAD_ACCESS_KEY, FaultProxy

from gradshard.aggregation.driver import AggregateConfig, aggregate_round
from gradshard.core.zoo import synthetic
from gradshard.demo.synthetic import make_round
from gradshard.errors import ObjectNotFoundError, StoreError
from gradshard.fl.config import TrainConfig
from gradshard.fl.driver import Trainer
from gradshard.format.keys import model_key
from gradshard.runtime import LocalExecutor
from gradshard.store import LocalStore, S3Store, Store, open_store
from gradshard.store.s3 import MAX_PARTS, MIB, MIN_PART_BYTES, cell_bytes


def random_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def raw_keys(store: S3Store) -> list[str]:
    """Every object in the bucket, hidden ones included."""
    listed = store.client.list_objects_v2(Bucket=store.bucket)
    return sorted(item["Key"] for item in listed.get("Contents", []))


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    fault_proxy = FaultProxy(s3_endpoint)
    yield fault_proxy
    fault_proxy.close()


def via(proxy: FaultProxy, store: S3Store, **options: object) -> S3Store:
    """The same bucket reached through the fault proxy."""
    return S3Store(store.bucket, store.prefix, endpoint_url=proxy.endpoint, **options)  # type: ignore[arg-type]


# --- the upload grid ---------------------------------------------------------------------------------------------
@given(st.integers(min_value=0, max_value=5 * 1024**4))
def test_cell_grid_fits_s3_part_rules_for_any_object_size(size: int) -> None:
    # Execute
    cell = cell_bytes(size)

    # Assert: parts of at least 5 MiB, whole MiB, at most 10,000 of them
    assert cell >= MIN_PART_BYTES
    assert cell % MIB == 0
    assert -(-size // cell) <= MAX_PARTS


def test_writer_uploads_whole_cells_as_parts_and_completion_composes_the_edges(s3_store: S3Store) -> None:
    # Prepare: a 3-cell object written like a function does: a range window by window, the header last
    blob = random_bytes(2 * MIN_PART_BYTES + 3 * MIB + 17)
    upload_id = s3_store.begin_upload("out/model", len(blob))
    s3_id = s3_store.parse_upload("out/model", upload_id).s3_id
    header = 4096

    # Execute
    writer = s3_store.writer("out/model", upload_id, header)
    for lo in range(header, len(blob), 512 * 1024):
        writer.write(blob[lo : min(lo + 512 * 1024, len(blob))])
    writer.close()
    s3_store.write_at("out/model", upload_id, 0, blob[:header])
    parts = s3_store.client.list_parts(Bucket=s3_store.bucket, Key="run/out/model", UploadId=s3_id)
    during = s3_store.list()
    s3_store.complete_upload("out/model", upload_id)

    # Assert: cells 2 and 3 went up directly as parts 2 and 3; cell 1 (header + range start) was composed
    assert [p["PartNumber"] for p in parts["Parts"]] == [2, 3]
    assert during == []
    assert s3_store.get("out/model") == blob
    assert raw_keys(s3_store) == ["run/out/model"]  # no fragments or markers left


def test_unwritten_cells_of_a_multipart_upload_are_zero(s3_store: S3Store) -> None:
    # Prepare
    size = 2 * MIN_PART_BYTES + 10
    upload_id = s3_store.begin_upload("z", size)

    # Execute: only bytes in the last cell
    s3_store.write_at("z", upload_id, size - 4, b"tail")
    s3_store.complete_upload("z", upload_id)

    # Assert
    assert s3_store.get("z") == bytes(size - 4) + b"tail"


def test_large_put_goes_through_a_multipart_upload(s3_store: S3Store, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.setattr("gradshard.store.s3.SINGLE_PUT_BYTES", MIB)
    blob = random_bytes(MIN_PART_BYTES + 5)

    # Execute
    s3_store.put("big", blob)

    # Assert: ETags of multipart objects end in -<parts>
    assert s3_store.get("big") == blob
    assert s3_store.head("big")["ETag"].strip('"').endswith("-2")


def test_abort_of_a_multipart_upload_leaves_nothing(s3_endpoint: str) -> None:
    # Prepare: one attempt per request (moto answers a part of an aborted upload with a 500, which is retried)
    s3_store = new_s3_store(s3_endpoint, max_attempts=1)
    blob = random_bytes(MIN_PART_BYTES + 100)
    upload_id = s3_store.begin_upload("k", len(blob))
    s3_store.write_at("k", upload_id, 0, blob)

    # Execute
    s3_store.abort_upload("k", upload_id)

    # Assert
    assert raw_keys(s3_store) == []
    with pytest.raises(StoreError, match=r"upload .* of 'k' does not exist \(aborted or completed\?\)"):
        s3_store.write_at("k", upload_id, 0, blob[:MIN_PART_BYTES])


def test_upload_id_of_another_key_is_refused(s3_store: S3Store) -> None:
    # Prepare
    upload_id = s3_store.begin_upload("a", 10)

    # Execute / Assert
    with pytest.raises(StoreError, match="is not an upload of 'b'"):
        s3_store.write_at("b", upload_id, 0, b"x")
    s3_store.abort_upload("a", upload_id)


# --- reads -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("concurrency", "expected_gets"), [(1, 1), (4, 4), (8, 6)])
def test_large_read_is_split_into_concurrent_ranged_gets(s3_endpoint: str, concurrency: int,
                                                         expected_gets: int) -> None:
    # Prepare: 6 MiB + 5 bytes, ranges of at least 1 MiB
    store = new_s3_store(s3_endpoint, read_concurrency=concurrency, min_range_bytes=MIB)
    blob = random_bytes(6 * MIB + 5)
    store.put("x", blob)
    buf = bytearray(len(blob) - 3)
    gets_before = store.io.gets

    # Execute
    with store.open_reader("x") as reader:
        reader.read_into(3, memoryview(buf))

    # Assert
    assert bytes(buf) == blob[3:]
    assert store.io.gets - gets_before == expected_gets


def read_windows(store: S3Store, key: str, start: int, stop: int, window: int, expect: bool = True) -> bytes:
    """Read ``[start, stop)`` of ``key`` window by window, as a shard function reads one client."""
    out = bytearray(stop - start)
    with store.open_reader(key) as reader:
        if expect:
            reader.expect(start, stop)
        for lo in range(start, stop, window):
            hi = min(lo + window, stop)
            reader.read_into(lo, memoryview(out)[lo - start : hi - start])
    return bytes(out)


def test_announced_range_read_window_by_window_is_one_streamed_get(s3_store: S3Store) -> None:
    # Prepare: 3 MiB + 7 bytes read in 64 KiB windows from byte 5 (49 windows)
    blob = random_bytes(3 * MIB + 12)
    s3_store.put("x", blob)
    gets_before = s3_store.io.gets

    # Execute
    data = read_windows(s3_store, "x", 5, len(blob), 64 * 1024)

    # Assert
    assert data == blob[5:]
    assert s3_store.io.gets - gets_before == 1
    assert s3_store._open_streams == 0  # the stream gave its slot back when it reached the end


def test_unannounced_window_reads_are_one_get_each(s3_store: S3Store) -> None:
    # Prepare
    blob = random_bytes(MIB)
    s3_store.put("x", blob)
    gets_before = s3_store.io.gets

    # Execute: 16 windows of 64 KiB, no announcement
    data = read_windows(s3_store, "x", 0, len(blob), 64 * 1024, expect=False)

    # Assert
    assert data == blob
    assert s3_store.io.gets - gets_before == 16


def test_readers_past_the_stream_budget_read_per_window(s3_endpoint: str) -> None:
    # Prepare: one stream allowed; two clients read in turns, window by window, as a shard function does
    store = new_s3_store(s3_endpoint, max_streams=1)
    blobs = [random_bytes(MIB, seed=i) for i in range(2)]
    for i, blob in enumerate(blobs):
        store.put(f"c{i}", blob)
    readers = [store.open_reader(f"c{i}") for i in range(2)]
    outs = [bytearray(MIB) for _ in blobs]
    for reader in readers:
        reader.expect(0, MIB)
    gets_before = store.io.gets

    # Execute: 8 windows of 128 KiB each
    for lo in range(0, MIB, 128 * 1024):
        for reader, out in zip(readers, outs, strict=True):
            reader.read_into(lo, memoryview(out)[lo : lo + 128 * 1024])
    for reader in readers:
        reader.close()

    # Assert: the first client streamed (1 GET), the second read each of its 8 windows with its own GET
    assert [bytes(o) for o in outs] == blobs
    assert store.io.gets - gets_before == 1 + 8
    assert store._open_streams == 0


def test_a_stream_left_unfinished_gives_its_slot_back_on_close(s3_endpoint: str) -> None:
    # Prepare
    store = new_s3_store(s3_endpoint, max_streams=1)
    store.put("x", random_bytes(MIB))

    # Execute: read half of an announced range, then close (a function that failed mid-round)
    with store.open_reader("x") as reader:
        reader.expect(0, MIB)
        reader.read_into(0, memoryview(bytearray(1000)))
        held = store._open_streams

    # Assert
    assert held == 1
    assert store._open_streams == 0
    assert read_windows(store, "x", 0, MIB, 256 * 1024) == store.get("x")


def test_a_read_that_is_not_the_next_piece_of_the_stream_is_served_apart(s3_store: S3Store) -> None:
    # Prepare
    blob = random_bytes(MIB)
    s3_store.put("x", blob)
    part = bytearray(100)

    # Execute: stream from 0, then jump back (a read out of order), then carry on where the stream was
    with s3_store.open_reader("x") as reader:
        reader.expect(0, MIB)
        first = bytearray(1000)
        reader.read_into(0, memoryview(first))
        reader.read_into(10, memoryview(part))
        rest = bytearray(MIB - 1000)
        reader.read_into(1000, memoryview(rest))

    # Assert: every read got its own bytes
    assert bytes(first) == blob[:1000] and bytes(part) == blob[10:110] and bytes(rest) == blob[1000:]


def test_a_stream_cut_mid_body_resumes_from_the_next_byte(s3_store: S3Store, proxy: FaultProxy) -> None:
    # Prepare: the first response body is cut half-way
    blob = random_bytes(2 * MIB)
    s3_store.put("x", blob)
    store = via(proxy, s3_store)
    proxy.inject("GET", "cut", 1)
    gets_before = store.io.gets

    # Execute
    data = read_windows(store, "x", 0, len(blob), 256 * 1024)

    # Assert: the cut stream was reopened once from where it broke
    assert data == blob
    assert proxy.faults == {"cut": 1}
    assert store.io.gets - gets_before == 2


def test_reader_of_a_versioned_bucket_keeps_reading_the_version_it_opened(s3_store: S3Store) -> None:
    # Prepare
    s3_store.client.put_bucket_versioning(Bucket=s3_store.bucket, VersioningConfiguration={"Status": "Enabled"})
    s3_store.put("obj", b"A" * 1000)
    reader = s3_store.open_reader("obj")

    # Execute
    s3_store.put("obj", b"B" * 500)
    buf = bytearray(1000)
    reader.read_into(0, memoryview(buf))

    # Assert
    assert bytes(buf) == b"A" * 1000
    assert s3_store.get("obj") == b"B" * 500


# --- retries -----------------------------------------------------------------------------------------------------
def test_reads_retry_server_errors_and_resume_cut_bodies(s3_store: S3Store, proxy: FaultProxy) -> None:
    # Prepare
    blob = random_bytes(3 * MIB)
    s3_store.put("x", blob)
    store = via(proxy, s3_store, read_concurrency=1)
    proxy.inject("GET", "503", 2)
    proxy.inject("GET", "cut", 2)

    # Execute
    data = store.get("x")

    # Assert: two 503s retried by botocore, two bodies cut half-way and resumed
    assert data == blob
    assert proxy.faults == {"503": 2, "cut": 2}
    assert proxy.seen["GET"] == 5


def test_writes_retry_server_errors(s3_store: S3Store, proxy: FaultProxy) -> None:
    # Prepare
    blob = random_bytes(MIN_PART_BYTES + 10)
    store = via(proxy, s3_store)
    proxy.inject("PUT", "503", 3)

    # Execute
    upload_id = store.begin_upload("k", len(blob))
    store.write_at("k", upload_id, 0, blob)
    store.complete_upload("k", upload_id)

    # Assert
    assert proxy.faults["503"] == 3
    assert s3_store.get("k") == blob


def test_read_that_keeps_breaking_fails_naming_the_object(s3_store: S3Store, proxy: FaultProxy) -> None:
    # Prepare
    s3_store.put("x", random_bytes(MIB))
    store = via(proxy, s3_store, max_attempts=3, read_concurrency=1)
    proxy.inject("GET", "cut", 100)

    # Execute / Assert
    with pytest.raises(StoreError, match=r"reading bytes \[0, 1048576\) of 'x' in s3://.* failed 3 times"):
        store.get("x")


# --- clear errors ------------------------------------------------------------------------------------------------
def test_missing_bucket_is_named(s3_endpoint: str) -> None:
    # Prepare
    store = S3Store("no-such-bucket-here", endpoint_url=s3_endpoint)

    # Execute / Assert
    for op in (lambda: store.get("k"), lambda: store.put("k", b"x"), lambda: store.list(),
               lambda: store.begin_upload("k", 10 * MIB)):
        with pytest.raises(StoreError, match=r"bucket 'no-such-bucket-here' does not exist at http://127\.0\.0\.1"):
            op()


def test_missing_object_is_named(s3_store: S3Store) -> None:
    # Execute / Assert
    with pytest.raises(ObjectNotFoundError, match=r"object 'rounds/000001/x' does not exist in s3://test-.*/run/"):
        s3_store.size("rounds/000001/x")


def test_refused_credentials_are_named(s3_store: S3Store, proxy: FaultProxy,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", BAD_ACCESS_KEY)
    store = via(proxy, s3_store)

    # Execute / Assert: with S3's error code where the response has a body (HEAD responses have none)
    with pytest.raises(StoreError, match=r"S3 refused access to s3://.* \(InvalidAccessKeyId: The AWS Access Key Id"):
        store.list()
    with pytest.raises(StoreError, match=r"reading object 'anything': S3 refused access to s3://.* \(403: "):
        store.get("anything")


def test_missing_credentials_are_named(s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: nothing in the environment, no config files
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    store = S3Store("some-bucket", endpoint_url=s3_endpoint)

    # Execute / Assert
    with pytest.raises(StoreError, match=r"no usable AWS credentials for s3://some-bucket/ .* set AWS_ACCESS_KEY_ID"):
        store.get("k")


def test_unreachable_endpoint_is_named() -> None:
    # Prepare: a port nobody listens on
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = S3Store("some-bucket", endpoint_url=f"http://127.0.0.1:{port}", max_attempts=1)

    # Execute / Assert
    with pytest.raises(StoreError, match=f"cannot reach the S3 endpoint for s3://some-bucket/ at http://127.0.0.1:{port}"):
        store.get("k")


def test_store_reopens_from_its_spec_and_from_an_s3_url(s3_store: S3Store, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    s3_store.put("k", b"v")
    assert s3_store.endpoint_url is not None
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_store.endpoint_url)

    # Execute
    from_spec = open_store(s3_store.spec())
    from_url = open_store(f"s3://{s3_store.bucket}/run")

    # Assert
    assert from_spec.get("k") == b"v"
    assert from_url.get("k") == b"v"
    assert from_spec.spec() == s3_store.spec()


# --- whole rounds through S3 -------------------------------------------------------------------------------------
def aggregate_output(store: Store, config: AggregateConfig) -> bytes:
    make_round(store, 1, synthetic(4_000_000, tensor_elems=600_000), 4, seed=3)
    with LocalExecutor(workers=2) as executor:
        result = aggregate_round(store, 1, executor, config)
    assert all(r.ok for r in result.reports) and not result.manifest.rejected
    return store.get(result.output_key)


@pytest.mark.integration
def test_sharded_round_through_s3_is_bit_identical_to_the_local_store(s3_store: S3Store, tmp_path: Path) -> None:
    # Prepare: a 16 MB model, so every shard function uploads whole parts and the edges are composed
    config = AggregateConfig(topology="sharded", shards=3, window_bytes=256 * 1024)

    # Execute
    on_s3 = aggregate_output(s3_store, config)
    local = aggregate_output(LocalStore(tmp_path, fsync=False), config)

    # Assert
    assert len(on_s3) > 3 * MIN_PART_BYTES
    assert on_s3 == local
    assert not [k for k in raw_keys(s3_store) if "/.uploads/" in k]


@pytest.mark.integration
@pytest.mark.parametrize("max_streams", [256, 0])
def test_shard_functions_make_one_data_get_per_client_as_the_cost_model_counts(s3_endpoint: str,
                                                                               max_streams: int) -> None:
    # Prepare: 4 clients of 4,000,000 float32 (16 MB), 3 shards, 256 KiB windows (~21 per client per shard)
    store = new_s3_store(s3_endpoint, max_streams=max_streams)
    config = AggregateConfig(topology="sharded", shards=3, window_bytes=256 * 1024)
    make_round(store, 1, synthetic(4_000_000, tensor_elems=600_000), 4, seed=3)

    # Execute
    with LocalExecutor(workers=2) as executor:
        result = aggregate_round(store, 1, executor, config)

    # Assert: a function GETs the manifest, and per client its header (length prefix, then header: 2) and its data.
    # The data is one streamed GET per client, or with streaming off one GET per window.
    assert all(r.ok for r in result.reports)
    for report, inv in zip(result.reports, result.plan.invocations, strict=True):
        windows = -(-(inv.args.stop - inv.args.start) * 4 // (256 * 1024))
        data_gets = 4 * (1 if max_streams else windows)
        assert report.gets == 1 + 4 * 2 + data_gets, (report.invocation, report.gets, windows)


@pytest.mark.integration
def test_training_round_through_s3_gives_the_same_models_as_the_local_store(s3_store: S3Store,
                                                                            tmp_path: Path) -> None:
    # Prepare
    config = TrainConfig(clients=4, rounds=2, epochs=1, batch_size=16, lr=0.1, seed=1)
    models = {}

    # Execute
    for name, store in (("s3", s3_store), ("local", LocalStore(tmp_path, fsync=False))):
        with LocalExecutor(workers=2) as aggregation, LocalExecutor(workers=2, timeout_s=120.0) as clients:
            metrics = Trainer(store, config, aggregation, clients).run()
        assert [m["round"] for m in metrics] == [0, 1]
        models[name] = [store.get(model_key(r)) for r in range(3)]

    # Assert
    assert models["s3"] == models["local"]
