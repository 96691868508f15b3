"""Presigned ranged GETs on S3 (the Range header is signed) and ``Store.put_new`` (exclusive create) on every
store, against moto's threaded server on 127.0.0.1 for S3."""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlsplit

import numpy as np
import pytest
from conftest import new_s3_store
from hypothesis import given, settings
from hypothesis import strategies as st

from gradshard.errors import StoreError
from gradshard.store import LocalStore, MemoryStore, S3Store, Store
from gradshard.store.s3 import PresignedRangeReader, range_header, signed_headers

BLOB = np.random.default_rng(7).integers(0, 256, 3 * 1024 * 1024 + 11, dtype=np.uint8).tobytes()


@pytest.fixture(scope="module")
def bucket(s3_endpoint: str) -> S3Store:
    store = new_s3_store(s3_endpoint)
    store.put("rounds/000001/updates/alice.safetensors", BLOB)
    return store


def sigv4_signature(url: str, headers: dict[str, str], secret: str) -> str:
    """The SigV4 query signature of ``GET url`` with ``headers``, recomputed from the URL's own parameters (what S3
    does when it checks a presigned URL)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "X-Amz-Signature"]
    canonical_query = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(query))
    params = dict(query)
    names = params["X-Amz-SignedHeaders"].split(";")
    values = {"host": parts.netloc, **{k.lower(): v for k, v in headers.items()}}
    canonical_headers = "".join(f"{name}:{values[name].strip()}\n" for name in names)
    request = "\n".join(["GET", parts.path, canonical_query, canonical_headers, params["X-Amz-SignedHeaders"],
                         "UNSIGNED-PAYLOAD"])
    _, date, region, service, terminal = params["X-Amz-Credential"].split("/")
    to_sign = "\n".join(["AWS4-HMAC-SHA256", params["X-Amz-Date"], f"{date}/{region}/{service}/{terminal}",
                         hashlib.sha256(request.encode()).hexdigest()])
    key = f"AWS4{secret}".encode()
    for part in (date, region, service, terminal):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


# --- presigned ranged GETs ---------------------------------------------------------------------------------------
def test_presigned_url_signs_the_range_header(bucket: S3Store) -> None:
    # Execute
    url = bucket.presign_range("rounds/000001/updates/alice.safetensors", 1000, 5000, expires_s=120)

    # Assert
    assert "range" in signed_headers(url)
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in url


def test_the_signature_binds_exactly_that_range(bucket: S3Store) -> None:
    # Prepare
    url = bucket.presign_range("rounds/000001/updates/alice.safetensors", 1000, 5000)
    signature = dict(parse_qsl(urlsplit(url).query))["X-Amz-Signature"]
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]

    # Execute
    right = sigv4_signature(url, {"Range": range_header(1000, 5000)}, secret)
    wider = sigv4_signature(url, {"Range": range_header(0, 5000)}, secret)
    other = sigv4_signature(url, {"Range": range_header(1000, 5001)}, secret)

    # Assert: S3 recomputes the signature with the Range the request carries; only the signed one matches
    assert right == signature
    assert wider != signature and other != signature


@settings(max_examples=15, deadline=None)
@given(st.integers(0, len(BLOB) - 1).flatmap(lambda lo: st.tuples(st.just(lo), st.integers(lo + 1, len(BLOB)))))
def test_reading_through_the_url_returns_exactly_the_range(bucket: S3Store, span: tuple[int, int]) -> None:
    # Prepare
    start, stop = span
    url = bucket.presign_range("rounds/000001/updates/alice.safetensors", start, stop)

    # Execute
    got = PresignedRangeReader(url, start, stop).read()

    # Assert
    assert got == BLOB[start:stop]


def test_a_reader_refuses_a_url_that_signs_no_range(bucket: S3Store) -> None:
    # Prepare: a plain presigned GET (any range, or the whole object)
    url = bucket._presigner().generate_presigned_url(
        "get_object", Params={"Bucket": bucket.bucket, "Key": "run/rounds/000001/updates/alice.safetensors"})

    # Execute / Assert
    with pytest.raises(StoreError, match="does not sign a Range"):
        PresignedRangeReader(url, 0, 10)


def test_a_reader_refuses_an_answer_that_is_not_the_range(bucket: S3Store) -> None:
    # Prepare: a presigned GET of a missing object answers 404
    url = bucket.presign_range("rounds/000001/updates/nobody.safetensors", 0, 10)

    # Execute / Assert
    with pytest.raises(StoreError, match="not 206"):
        PresignedRangeReader(url, 0, 10).read()


# --- put_new: exclusive create on every store ------------------------------------------------------------------
@pytest.fixture(params=["local", "memory", "s3"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    if request.param == "memory":
        return MemoryStore()
    return new_s3_store(request.getfixturevalue("s3_endpoint"))


def test_put_new_creates_once_and_never_overwrites(any_store: Store) -> None:
    # Execute
    first = any_store.put_new("security/jti/2025010100/a", b"first")
    second = any_store.put_new("security/jti/2025010100/a", b"second")

    # Assert
    assert (first, second) == (True, False)
    assert any_store.get("security/jti/2025010100/a") == b"first"
    assert any_store.list("security/") == ["security/jti/2025010100/a"]


def test_put_new_of_concurrent_racers_lets_exactly_one_win(any_store: Store) -> None:
    # Prepare
    racers = 8
    barrier = threading.Barrier(racers)
    wins: list[int] = []
    lock = threading.Lock()

    def race(i: int) -> None:
        barrier.wait()
        if any_store.put_new("race/key", f"racer {i}".encode()):
            with lock:
                wins.append(i)

    # Execute
    threads = [threading.Thread(target=race, args=(i,)) for i in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # Assert
    assert len(wins) == 1
    assert any_store.get("race/key") == f"racer {wins[0]}".encode()


def test_local_put_new_treats_a_symlink_as_existing_and_never_follows_it(tmp_path: Path) -> None:
    # Prepare: the key is a symlink to a file outside the store
    store = LocalStore(tmp_path / "store")
    outside = tmp_path / "outside"
    outside.write_bytes(b"untouched")
    (store.root / "k").symlink_to(outside)

    # Execute
    created = store.put_new("k", b"new")

    # Assert: refused as existing; the target is untouched; no temporary is left
    assert created is False
    assert outside.read_bytes() == b"untouched"
    assert store.stale_uploads(0) == []
