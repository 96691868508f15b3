"""S3-compatible object store (AWS S3, MinIO, Ceph RGW, moto, ...) through boto3.

Objects live under ``s3://<bucket>/<prefix><key>``. Credentials and, unless given, the endpoint come from the
usual AWS chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL``, an
instance role), so no secret ever travels in a store spec or a plan.

**Reads.** ``open_reader`` pins the object's version: in a versioned bucket every ranged GET asks for the version
it opened (a reader keeps seeing the object it opened, as on a local disk); otherwise every GET is conditional on
the ETag, so an object replaced mid-read fails loudly instead of mixing two versions. A shard function reads each
client's range window by window: the range is announced (``ObjectReader.expect``) and served by **one streamed
GET**, whose body is consumed one window at a time into the buffer the function already holds, so requests are one
per client per function (as the cost model counts them) at the memory of one window; at most ``max_streams`` such
streams are open per store (a socket each), readers past that make one ranged GET per window. Any other read of at
least two ``min_range_bytes`` is split into up to ``read_concurrency`` ranged GETs that run at once and land
directly in the caller's buffer, so the round trips overlap. A
connection that breaks mid-body (S3 may also close one that a stream left idle) resumes from the last byte
received, with exponential back-off; request-level
failures (5xx, throttling, timeouts) are retried by botocore's ``standard`` retry mode. No read can hang: botocore
bounds connecting (``connect_timeout_s``, 10 s) and every socket read (``read_timeout_s``, 60 s without a byte),
a request is tried at most ``max_attempts`` times, and a body that breaks resumes at most ``max_attempts`` times.

**Uploads.** S3 has no write-at-offset; an upload is a multipart upload whose parts must be at least 5 MiB (all
but the last) and numbered in byte order. The object is cut into a fixed grid of *cells* of ``cell_bytes(size)``
(5 MiB, more for objects over ~50 GB so there are at most 10,000): cell *k* is part *k + 1*. A write that covers
a whole cell uploads it as that part directly — a shard function writing its range uploads its own parts, in
parallel with the others. Bytes of cells nobody wrote whole (the header, written last at offset 0, and the
edges of each function's range) are kept as small *fragment* objects under ``<prefix>.uploads/``; completing the
upload composes each such cell from its fragments (at most one cell in memory at a time, unwritten bytes zero),
uploads it as its part, then completes the multipart upload — the object appears whole or not at all — and
deletes the fragments. Objects of one cell never start a multipart upload: they are composed and PUT.
Abandoned uploads (a crashed driver's) are found by :meth:`S3Store.stale_uploads`: marker and fragments under
``.uploads/<tag>/`` and multipart uploads under the prefix (with or without a marker) that nobody wrote for a given
time — their newest object, part or start is older; ``gradshard gc`` aborts them.
:meth:`S3Store.writer` buffers a function's consecutive writes up to cell boundaries so that only its edges
become fragments.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from gradshard.errors import ObjectNotFoundError, StoreError
from gradshard.extras import require_extra
from gradshard.store.base import (
    STALE_UPLOAD_S,
    BytesLike,
    ObjectReader,
    SequentialWriter,
    StaleUpload,
    Store,
    as_bytes,
    check_key,
)
from gradshard.units import MIB

log = logging.getLogger(__name__)

MIN_PART_BYTES = 5 * MIB  # S3's smallest part (all but the last)
MAX_PARTS = 10_000  # S3's most parts in one upload
SINGLE_PUT_BYTES = 64 * MIB  # ``put`` above this goes through a multipart upload
_READ_PIECE = 1 * MIB  # bytes taken from a response body at a time
DEFAULT_MAX_STREAMS = 256  # open streamed GETs per store (a socket each; Lambda allows 1,024 descriptors)
_MAX_EXPECTED = 4096  # announced ranges a reader remembers (runs of one client in one function)
_UPLOADS = ".uploads"
_ACCESS_CODES = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                           "InvalidToken", "AuthorizationHeaderMalformed", "AllAccessDisabled", "403", "Forbidden"})

_loader_lock = threading.Lock()
_loader: Any = None


def _boto_session() -> Any:
    """A new boto3 session (credentials are resolved per store) sharing one loader of service models per process."""
    global _loader
    import boto3
    import botocore.session

    core = botocore.session.Session()
    with _loader_lock:
        if _loader is None:
            _loader = core.get_component("data_loader")
        core.register_component("data_loader", _loader)
    return boto3.session.Session(botocore_session=core)


def warm_up() -> None:
    """Load boto3 and the S3 service model once (run by a runtime's zygote, so forked functions skip it)."""
    _boto_session().client("s3", region_name="us-east-1", aws_access_key_id="warm-up", aws_secret_access_key="x")


def cell_bytes(size: int) -> int:
    """The upload grid for an object of ``size`` bytes: 5 MiB cells, larger (whole MiB) beyond 10,000 cells."""
    cell = max(MIN_PART_BYTES, -(-size // MAX_PARTS))
    return -(-cell // MIB) * MIB


@dataclass(frozen=True)
class _Upload:
    """What an upload id carries: ``<tag>~<size>~<S3 upload id or ->``; the tag ends with a digest of the key."""

    tag: str
    size: int
    s3_id: str | None

    @property
    def cell(self) -> int:
        return cell_bytes(self.size)

    @property
    def cells(self) -> int:
        return max(1, -(-self.size // self.cell))

    def cell_range(self, k: int) -> tuple[int, int]:
        return k * self.cell, min((k + 1) * self.cell, self.size)

    def encode(self) -> str:
        return f"{self.tag}~{self.size}~{self.s3_id or '-'}"


class _ViewBody(io.RawIOBase):
    """A seekable read-only file over a memoryview: botocore takes bytes, bytearray or a file, and ``bytes(view)``
    would copy every 5 MiB part once more."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._view, self._pos = view, 0

    def __len__(self) -> int:
        return len(self._view)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), len(self._view) - self._pos))
        memoryview(buffer).cast("B")[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


def _key_tag(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class _RangeStream:
    """One streamed GET of bytes ``[pos, stop)`` of a pinned object version, consumed front to back.

    A body that breaks (a reset connection, or S3 closing a connection the reader left idle while it read other
    clients' windows) resumes from the first byte not received with a new ranged GET, after a back-off; a stream
    that breaks ``max_attempts`` times in a row without delivering a byte fails. ``requests`` counts its GETs."""

    def __init__(self, store: S3Store, key: str, pos: int, stop: int, pin: dict[str, str] | None) -> None:
        self.store, self.key, self.pos, self.stop, self.pin = store, key, pos, stop, pin
        self.start = pos
        self.requests = 0
        self._body: Any = None
        self._failures = 0

    def read_into(self, view: memoryview) -> None:
        """Fill ``view`` with the next ``len(view)`` bytes of the stream."""
        from botocore.exceptions import BotoCoreError
        from urllib3.exceptions import HTTPError

        if self.pos + len(view) > self.stop:
            raise StoreError(f"read past the end of a stream of {self.key!r} at byte {self.stop}")
        done = 0
        while done < len(view):
            try:
                if self._body is None:
                    self._open()
                piece = self._body.read(min(_READ_PIECE, len(view) - done))
                if not piece:
                    raise OSError(f"the response ended at byte {self.pos} of [{self.start}, {self.stop})")
            except (BotoCoreError, HTTPError, OSError) as exc:  # the body broke (request errors are StoreErrors)
                self.close()
                self._failures += 1
                if self._failures >= self.store.max_attempts:
                    raise StoreError(f"reading bytes [{self.start}, {self.stop}) of {self.key!r} in "
                                     f"{self.store.url} failed {self._failures} times in a row at byte "
                                     f"{self.pos}; last: {exc}") from None
                log.warning("reading %r broke at byte %d (%s); resuming", self.key, self.pos, exc)
                _backoff(self._failures)
                continue
            view[done : done + len(piece)] = piece
            done += len(piece)
            self.pos += len(piece)
            self._failures = 0

    def _open(self) -> None:
        with self.store._errors(f"reading object {self.key!r}", self.key):
            response = self.store.client.get_object(Bucket=self.store.bucket, Key=self.store._name(self.key),
                                                    Range=f"bytes={self.pos}-{self.stop - 1}", **(self.pin or {}))
        self.requests += 1
        self._body = response["Body"]

    def close(self) -> None:
        """Drop the response (its connection is closed, not reused, if the body was not read to the end)."""
        body, self._body = self._body, None
        if body is not None:
            body.close()


class S3ObjectReader(ObjectReader):
    """An object opened for ranged reads, pinned to the ETag (or version) it had when opened.

    A range announced with :meth:`expect` and then read in consecutive pieces (a shard function's windows over
    one client) is served by **one streamed GET** for the whole range, while the store has a stream to spare
    (``S3Store.max_streams`` open at once); any other read is one ranged GET, split into concurrent GETs when large.
    """

    def __init__(self, store: S3Store, key: str) -> None:
        self._store = store
        self._key = key
        head = store.head(key)
        self.size = int(head["ContentLength"])
        version = head.get("VersionId")
        self._pin = {"VersionId": version} if version and version != "null" else {"IfMatch": str(head["ETag"])}
        self._expected: list[tuple[int, int]] = []
        self._stream: _RangeStream | None = None

    def expect(self, offset: int, stop: int) -> None:
        if 0 <= offset < stop <= self.size and len(self._expected) < _MAX_EXPECTED:
            self._expected.append((offset, stop))

    def read_into(self, offset: int, buf: memoryview) -> None:
        want = len(buf)
        if offset < 0 or offset + want > self.size:
            raise StoreError(f"read of bytes [{offset}, {offset + want}) is outside object {self._key!r} "
                             f"of {self.size} bytes")
        if want == 0:
            return
        stream = self._stream
        if stream is None or stream.pos != offset or offset + want > stream.stop:
            stream = self._open_stream(offset, want)
        if stream is not None:
            self._read_stream(stream, buf)
        else:
            self._store.io.gets += self._store.read_ranges(self._key, offset, buf, self._pin)
        self._store.io.bytes_read += want

    def _open_stream(self, offset: int, want: int) -> _RangeStream | None:
        """A stream from ``offset`` to the end of the announced range it starts in, if the read leaves some of
        that range for later and a stream slot is free; the announcement is consumed either way."""
        self._drop_stream()
        for i, (lo, hi) in enumerate(self._expected):
            if lo <= offset < hi:
                del self._expected[i]
                if offset + want < hi and self._store.take_stream():
                    self._stream = _RangeStream(self._store, self._key, offset, hi, self._pin)
                    return self._stream
                return None
        return None

    def _read_stream(self, stream: _RangeStream, buf: memoryview) -> None:
        before = stream.requests
        try:
            stream.read_into(buf)
        except BaseException:
            self._drop_stream()
            raise
        finally:
            self._store.io.gets += stream.requests - before
        if stream.pos == stream.stop:
            self._drop_stream()

    def _drop_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()
            self._store.release_stream()

    def close(self) -> None:
        self._drop_stream()
        self._expected.clear()


class S3SequentialWriter(SequentialWriter):
    """Buffers consecutive writes up to cell boundaries, so whole cells go up as parts and only edges as fragments."""

    def __init__(self, store: S3Store, key: str, upload_id: str, offset: int) -> None:
        super().__init__(store, key, upload_id, offset)
        self._cell = store.parse_upload(key, upload_id).cell
        self._buf: bytearray | None = None
        self._filled = 0
        self._start = offset  # where the buffered bytes begin

    def write(self, data: BytesLike) -> None:
        view = as_bytes(data)
        while len(view):
            boundary = (self.offset // self._cell + 1) * self._cell
            if self._filled == 0 and self.offset % self._cell == 0 and len(view) >= self._cell:
                n = self._cell  # a whole cell straight from the caller's buffer, no copy
                self.store.write_at(self.key, self.upload_id, self.offset, view[:n])
            else:
                if self._buf is None:
                    self._buf = bytearray(self._cell)
                if self._filled == 0:
                    self._start = self.offset
                n = min(len(view), boundary - self.offset)
                self._buf[self._filled : self._filled + n] = view[:n]
                self._filled += n
                if self.offset + n == boundary:
                    self._flush()
            self.offset += n
            view = view[n:]

    def _flush(self) -> None:
        if self._filled and self._buf is not None:
            self.store.write_at(self.key, self.upload_id, self._start, memoryview(self._buf)[: self._filled])
        self._filled = 0

    def close(self) -> None:
        self._flush()
        self._buf = None


class S3Store(Store):
    """Objects in an S3 bucket under ``prefix``. See the module docstring for reads, retries and uploads.

    ``endpoint_url`` selects any S3-compatible service (path-style addressing is used with one); ``None`` takes
    ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` from the environment, else AWS itself. ``read_concurrency``
    ranged GETs of at least ``min_range_bytes`` each serve one large read; ``max_attempts`` bounds every request's
    tries. ``max_streams`` streamed GETs stay open at once (one per client a shard function reads, see
    :class:`S3ObjectReader`); readers beyond it make one ranged GET per read. 0 turns streaming off.
    """

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, region: str | None = None,
                 read_concurrency: int = 4, min_range_bytes: int = 1 * MIB, max_attempts: int = 5,
                 connect_timeout_s: float = 10.0, read_timeout_s: float = 60.0,
                 max_streams: int = DEFAULT_MAX_STREAMS) -> None:
        super().__init__()
        if not bucket or "/" in bucket:
            raise StoreError(f"invalid bucket name {bucket!r}")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        if prefix:
            check_key(prefix.rstrip("/"))
        if read_concurrency < 1 or min_range_bytes < 1 or max_attempts < 1:
            raise StoreError("read_concurrency, min_range_bytes and max_attempts must be at least 1")
        if max_streams < 0:
            raise StoreError(f"max_streams must be non-negative, got {max_streams}")
        require_extra("s3", f"the S3 store s3://{bucket}/{prefix}")
        self.bucket, self.prefix = bucket, prefix
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self.region = region
        self.read_concurrency, self.min_range_bytes, self.max_attempts = read_concurrency, min_range_bytes, max_attempts
        self.connect_timeout_s, self.read_timeout_s = connect_timeout_s, read_timeout_s
        self.max_streams = max_streams
        self._open_streams = 0
        self._client: Any = None
        self._presign_client: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    # --- plumbing --------------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                from botocore.config import Config

                config = Config(retries={"max_attempts": self.max_attempts, "mode": "standard"},
                                max_pool_connections=max(10, 2 * self.read_concurrency) + self.max_streams,
                                connect_timeout=self.connect_timeout_s, read_timeout=self.read_timeout_s,
                                request_checksum_calculation="when_required",
                                response_checksum_validation="when_required",
                                s3={"addressing_style": "path"} if self.endpoint_url else None)
                self._client = _boto_session().client("s3", endpoint_url=self.endpoint_url,
                                                      region_name=self.region or "us-east-1", config=config)
            return self._client

    def read_pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.read_concurrency, thread_name_prefix="s3-read")
            return self._pool

    def _name(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _where(self) -> str:
        return f"{self.url} at {self.endpoint_url or 'AWS'}"

    @contextmanager
    def _errors(self, what: str, key: str | None = None, upload_id: str | None = None) -> Iterator[None]:
        """Turn boto3's exceptions into StoreErrors that say what failed, on which object, and why."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "")) or str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
            message = error.get("Message") or str(exc)
            raise self._client_error(what, code, message, key, upload_id) from None
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise StoreError(f"{what}: no usable AWS credentials for {self._where()} ({exc}); set AWS_ACCESS_KEY_ID "
                             "and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or use an instance role") from None
        except EndpointConnectionError as exc:
            raise StoreError(f"{what}: cannot reach the S3 endpoint for {self._where()}: {exc}") from None
        except BotoCoreError as exc:
            raise StoreError(f"{what} on {self._where()} failed: {exc}") from None

    def _client_error(self, what: str, code: str, message: str, key: str | None,
                      upload_id: str | None) -> StoreError:
        if code == "NoSuchBucket":
            return StoreError(f"{what}: bucket {self.bucket!r} does not exist at {self.endpoint_url or 'AWS'}")
        if code == "NoSuchUpload" and key is not None:
            return StoreError(f"upload {upload_id} of {key!r} does not exist (aborted or completed?)")
        if code in ("NoSuchKey", "404", "NotFound") and key is not None:
            if not self.bucket_exists():
                return StoreError(f"{what}: bucket {self.bucket!r} does not exist at {self.endpoint_url or 'AWS'}")
            return ObjectNotFoundError(f"object {key!r} does not exist in {self.url}")
        if code in _ACCESS_CODES:
            return StoreError(f"{what}: S3 refused access to {self._where()} ({code}: {message}); check the "
                              "credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and the bucket "
                              "policy")
        if code in ("PreconditionFailed", "412"):
            return StoreError(f"object {key!r} in {self.url} changed while it was being read")
        return StoreError(f"{what} on {self._where()} failed: {code}: {message}")

    def bucket_exists(self, *, quick: bool = False) -> bool:
        """Whether the bucket exists; any other failure (credentials, access, endpoint) is a clear StoreError.

        ``quick`` probes with one try and a 2 s connect timeout (a first check of a store given by a user): an
        unreachable endpoint fails in seconds instead of after every retry of every connect timeout."""
        from botocore.exceptions import ClientError

        with self._errors(f"checking bucket {self.bucket!r}"):
            try:
                (self._quick_client() if quick else self.client).head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchBucket", "NotFound"):
                    return False
                raise
        return True

    def _quick_client(self) -> Any:
        from botocore.config import Config

        config = Config(retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=2, read_timeout=10,
                        s3={"addressing_style": "path"} if self.endpoint_url else None)
        return _boto_session().client("s3", endpoint_url=self.endpoint_url, region_name=self.region or "us-east-1",
                                      config=config)

    def create_bucket(self) -> None:
        """Create the bucket if it does not exist (for tests and local S3 servers)."""
        with self._errors(f"creating bucket {self.bucket!r}"):
            if not self.bucket_exists():
                self.client.create_bucket(Bucket=self.bucket)

    # --- reads -----------------------------------------------------------------------------------------------------
    def head(self, key: str) -> dict[str, Any]:
        with self._errors(f"reading object {key!r}", key):
            head: dict[str, Any] = self.client.head_object(Bucket=self.bucket, Key=self._name(key))
        return head

    def split_range(self, size: int) -> list[tuple[int, int]]:
        """How a read of ``size`` bytes is cut into concurrent ranged GETs: ``[(lo, hi), ...]``."""
        n = max(1, min(self.read_concurrency, size // self.min_range_bytes))
        step = -(-size // n)
        return [(lo, min(lo + step, size)) for lo in range(0, size, step)]

    def read_ranges(self, key: str, offset: int, view: memoryview, pin: dict[str, str] | None = None) -> int:
        """Fill ``view`` from bytes ``[offset, offset + len(view))`` with ranged GETs (concurrent if large, see
        :meth:`split_range`), each resuming where a broken body stopped; returns the number of GETs made."""
        pieces = self.split_range(len(view))
        streams = [_RangeStream(self, key, offset + lo, offset + hi, pin) for lo, hi in pieces]
        try:
            if len(streams) == 1:
                streams[0].read_into(view)
            else:
                pool = self.read_pool()
                futures = [pool.submit(stream.read_into, view[lo:hi])
                           for stream, (lo, hi) in zip(streams, pieces, strict=True)]
                for future in futures:
                    future.result()
        finally:
            for stream in streams:
                stream.close()
        return sum(stream.requests for stream in streams)

    def take_stream(self) -> bool:
        """Reserve one of the ``max_streams`` streamed GETs a store keeps open at once; False if none is free."""
        with self._lock:
            if self._open_streams >= self.max_streams:
                return False
            self._open_streams += 1
            return True

    def release_stream(self) -> None:
        with self._lock:
            self._open_streams = max(0, self._open_streams - 1)

    def size(self, key: str) -> int:
        return int(self.head(key)["ContentLength"])

    def open_reader(self, key: str) -> ObjectReader:
        return S3ObjectReader(self, key)

    def list(self, prefix: str = "") -> list[str]:
        keys: list[str] = []
        with self._errors(f"listing {prefix!r}"):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                          Prefix=self.prefix + prefix)
            for page in pages:
                for item in page.get("Contents", []):
                    key = item["Key"][len(self.prefix):]
                    if not any(part.startswith(".") for part in key.split("/")):
                        keys.append(key)
        return sorted(keys)

    # --- whole objects ---------------------------------------------------------------------------------------------
    def put(self, key: str, data: BytesLike) -> None:
        view = as_bytes(data)
        if len(view) <= SINGLE_PUT_BYTES:
            with self._errors(f"writing object {key!r}", key):
                self.client.put_object(Bucket=self.bucket, Key=self._name(key), Body=_ViewBody(view))
            self.io.puts += 1
            self.io.bytes_written += len(view)
            return
        with self.upload(key, len(view)) as writer:
            writer.write(view)

    def put_new(self, key: str, data: BytesLike, *, conflict_retries: int = 3) -> bool:
        """A conditional PUT (``If-None-Match: *``): S3 answers 412 PreconditionFailed if the object exists (False).
        A 409 ConditionalRequestConflict (another write of the key raced this one) is retried, as AWS advises.
        Objects up to ``SINGLE_PUT_BYTES`` only (one request is what makes the create exclusive)."""
        from botocore.exceptions import ClientError

        view = as_bytes(data)
        if len(view) > SINGLE_PUT_BYTES:
            raise StoreError(f"put_new of {key!r}: {len(view)} bytes is over the {SINGLE_PUT_BYTES} of one PUT")
        for attempt in range(conflict_retries + 1):
            try:
                with self._errors(f"creating object {key!r}", key):
                    try:
                        self.client.put_object(Bucket=self.bucket, Key=self._name(key), Body=_ViewBody(view),
                                               IfNoneMatch="*")
                    except ClientError as exc:
                        code = str(exc.response.get("Error", {}).get("Code", ""))
                        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                        if code == "PreconditionFailed" or status == 412:
                            return False
                        if (code == "ConditionalRequestConflict" or status == 409) and attempt < conflict_retries:
                            _backoff(attempt)
                            continue
                        raise
            finally:
                self.io.puts += 1
            self.io.bytes_written += len(view)
            return True
        raise AssertionError("unreachable")

    def _presigner(self) -> Any:
        """A client that presigns with SigV4 (botocore presigns with the legacy SigV2 query scheme otherwise,
        which signs no header)."""
        with self._lock:
            if self._presign_client is None:
                from botocore.config import Config

                config = Config(signature_version="s3v4",
                                s3={"addressing_style": "path"} if self.endpoint_url else None)
                self._presign_client = _boto_session().client("s3", endpoint_url=self.endpoint_url,
                                                              region_name=self.region or "us-east-1", config=config)
            return self._presign_client

    def presign_range(self, key: str, start: int, stop: int, expires_s: int = 300) -> str:
        """A presigned GET of bytes ``[start, stop)`` of ``key``: SigV4 query authentication with the ``Range``
        header among the signed headers, so the URL reads that range and no other. Read it with
        :class:`PresignedRangeReader` (which sends the same ``Range``)."""
        if not 0 <= start < stop:
            raise StoreError(f"a presigned range needs 0 <= start < stop, got [{start}, {stop})")
        if not 1 <= expires_s <= 7 * 86400:
            raise StoreError(f"a presigned URL expires in 1 s to 7 days, got {expires_s} s")
        with self._errors(f"presigning bytes [{start}, {stop}) of {key!r}", key):
            url: str = self._presigner().generate_presigned_url(
                "get_object", ExpiresIn=expires_s,
                Params={"Bucket": self.bucket, "Key": self._name(key), "Range": range_header(start, stop)})
        if "range" not in signed_headers(url):
            raise StoreError(f"botocore did not sign the Range header of a presigned GET of {key!r} (signed: "
                             f"{signed_headers(url)}); refusing a URL that would read any range")
        return url

    def presign_put(self, key: str, expires_s: int = 300) -> str:
        """A presigned PUT of the whole object ``key`` (SigV4 query authentication): whoever holds the URL may write
        that one key, once or more until it expires, and nothing else. Write through it with
        :class:`gradshard.store.presigned.PresignedStore`."""
        if not 1 <= expires_s <= 7 * 86400:
            raise StoreError(f"a presigned URL expires in 1 s to 7 days, got {expires_s} s")
        with self._errors(f"presigning a PUT of {key!r}", key):
            url: str = self._presigner().generate_presigned_url(
                "put_object", ExpiresIn=expires_s, Params={"Bucket": self.bucket, "Key": self._name(key)})
        return url

    def delete(self, key: str) -> None:
        with self._errors(f"deleting object {key!r}", key):
            self.client.delete_object(Bucket=self.bucket, Key=self._name(key))

    # --- uploads ---------------------------------------------------------------------------------------------------
    def parse_upload(self, key: str, upload_id: str) -> _Upload:
        tag, _, rest = upload_id.partition("~")
        size_text, _, s3_id = rest.partition("~")
        if not (tag.isalnum() and tag.endswith(_key_tag(key)) and size_text.isdigit() and s3_id):
            raise StoreError(f"upload id {upload_id!r} is not an upload of {key!r}")
        return _Upload(tag, int(size_text), None if s3_id == "-" else s3_id)

    def _upload_dir(self, upload: _Upload) -> str:
        return f"{self.prefix}{_UPLOADS}/{upload.tag}/"

    def begin_upload(self, key: str, size: int) -> str:
        check_key(key)
        if size < 0:
            raise StoreError(f"upload of {key!r} needs a non-negative size, got {size}")
        upload = _Upload(uuid.uuid4().hex + _key_tag(key), size, None)
        if upload.cells > 1:
            with self._errors(f"starting an upload of {key!r}", key):
                started = self.client.create_multipart_upload(Bucket=self.bucket, Key=self._name(key))
            upload = _Upload(upload.tag, size, str(started["UploadId"]))
        marker = json.dumps({"key": key, "size": size, "s3_upload_id": upload.s3_id}).encode()
        with self._errors(f"starting an upload of {key!r}", key):
            self.client.put_object(Bucket=self.bucket, Key=self._upload_dir(upload) + "upload", Body=marker)
        return upload.encode()

    def _require_open(self, key: str, upload_id: str, upload: _Upload) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._upload_dir(upload) + "upload")
        except ClientError:
            raise StoreError(f"upload {upload_id} of {key!r} does not exist (aborted or completed?)") from None

    def write_at(self, key: str, upload_id: str, offset: int, data: BytesLike) -> None:
        upload = self.parse_upload(key, upload_id)
        view = as_bytes(data)
        if offset < 0 or offset + len(view) > upload.size:
            raise StoreError(f"write of bytes [{offset}, {offset + len(view)}) is outside upload of {key!r} "
                             f"({upload.size} bytes)")
        pos, checked = offset, False
        while pos < offset + len(view):
            k = pos // upload.cell
            lo, hi = upload.cell_range(k)
            end = min(hi, offset + len(view))
            piece = view[pos - offset : end - offset]
            what = f"writing bytes [{pos}, {end}) of upload {upload_id}"
            if upload.s3_id is not None and pos == lo and end == hi:
                try:  # a whole cell: its part, with no extra request on this hot path
                    with self._errors(what, key, upload_id):
                        self.client.upload_part(Bucket=self.bucket, Key=self._name(key), UploadId=upload.s3_id,
                                                PartNumber=k + 1, Body=_ViewBody(piece))
                except StoreError:
                    # S3 says NoSuchUpload; other servers answer otherwise (moto: 500): name the cause if it is this
                    self._require_open(key, upload_id, upload)
                    raise
            else:
                if not checked:  # a fragment is a plain object: S3 would accept it for a closed upload
                    self._require_open(key, upload_id, upload)
                    checked = True
                with self._errors(what, key, upload_id):
                    self.client.put_object(Bucket=self.bucket, Key=f"{self._upload_dir(upload)}f/{pos:020d}",
                                           Body=_ViewBody(piece))
            self.io.puts += 1
            pos = end
        self.io.bytes_written += len(view)

    def writer(self, key: str, upload_id: str, offset: int) -> SequentialWriter:
        return S3SequentialWriter(self, key, upload_id, offset)

    def _fragments(self, upload: _Upload) -> dict[int, tuple[str, int]]:
        """Fragment objects of an upload: ``{offset: (s3 key, size)}``."""
        out: dict[int, tuple[str, int]] = {}
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                      Prefix=self._upload_dir(upload) + "f/")
        for page in pages:
            for item in page.get("Contents", []):
                out[int(item["Key"].rsplit("/", 1)[1])] = (item["Key"], int(item["Size"]))
        return out

    def _parts(self, key: str, upload: _Upload) -> dict[int, tuple[str, int]]:
        """Parts already uploaded: ``{part number: (etag, size)}``."""
        out: dict[int, tuple[str, int]] = {}
        pages = self.client.get_paginator("list_parts").paginate(Bucket=self.bucket, Key=self._name(key),
                                                                 UploadId=upload.s3_id)
        for page in pages:
            for part in page.get("Parts", []):
                out[int(part["PartNumber"])] = (str(part["ETag"]), int(part["Size"]))
        return out

    def _compose(self, upload: _Upload, k: int, fragments: dict[int, tuple[str, int]]) -> bytearray:
        """Cell ``k`` assembled from the fragments inside it; bytes nobody wrote are zero."""
        lo, hi = upload.cell_range(k)
        cell = bytearray(hi - lo)
        for offset, (name, size) in fragments.items():
            if lo <= offset < hi:
                if offset + size > hi:
                    raise StoreError(f"fragment at byte {offset} of {size} bytes crosses the end of cell {k}")
                self.get_into_raw(name, memoryview(cell)[offset - lo : offset - lo + size])
        return cell

    def get_into_raw(self, name: str, view: memoryview) -> None:
        """Read a whole internal object (a fragment) into ``view``."""
        body = self.client.get_object(Bucket=self.bucket, Key=name)["Body"]
        try:
            data = body.read()
        finally:
            body.close()
        if len(data) != len(view):
            raise StoreError(f"internal object {name!r} has {len(data)} bytes, expected {len(view)}")
        view[:] = data

    def complete_upload(self, key: str, upload_id: str) -> None:
        upload = self.parse_upload(key, upload_id)
        name = self._name(key)
        with self._errors(f"completing upload {upload_id} of {key!r}", key, upload_id):
            self._require_open(key, upload_id, upload)
            fragments = self._fragments(upload)
            if upload.s3_id is None:
                cell = self._compose(upload, 0, fragments)
                self.client.put_object(Bucket=self.bucket, Key=name, Body=_ViewBody(memoryview(cell)))
            else:
                parts = self._parts(key, upload)
                missing = [k for k in range(upload.cells)
                           if parts.get(k + 1, ("", -1))[1] != upload.cell_range(k)[1] - upload.cell_range(k)[0]]

                def compose(k: int) -> tuple[int, str]:
                    cell = self._compose(upload, k, fragments)
                    with self._errors(f"composing cell {k} of upload {upload_id}", key, upload_id):
                        done = self.client.upload_part(Bucket=self.bucket, Key=name, UploadId=upload.s3_id,
                                                       PartNumber=k + 1, Body=_ViewBody(memoryview(cell)))
                    return k + 1, str(done["ETag"])

                with ThreadPoolExecutor(min(self.read_concurrency, max(1, len(missing)))) as pool:
                    for number, etag in pool.map(compose, missing):
                        parts[number] = (etag, 0)
                self.client.complete_multipart_upload(
                    Bucket=self.bucket, Key=name, UploadId=upload.s3_id,
                    MultipartUpload={"Parts": [{"PartNumber": n, "ETag": parts[n][0]}
                                               for n in range(1, upload.cells + 1)]})
                self.io.puts += len(missing)
        self.io.puts += 1
        self._remove_upload_objects(upload, [name for name, _ in fragments.values()])

    def abort_upload(self, key: str, upload_id: str) -> None:
        from botocore.exceptions import ClientError

        upload = self.parse_upload(key, upload_id)
        if upload.s3_id is not None:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=self._name(key), UploadId=upload.s3_id)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "NoSuchUpload":
                    raise self._client_error(f"aborting upload {upload_id}", str(exc.response["Error"]["Code"]),
                                             str(exc), key, upload_id) from None
        self._remove_upload_objects(upload)

    def _remove_upload_objects(self, upload: _Upload, fragments: Sequence[str] | None = None) -> None:
        """Delete an upload's marker (first: a crash midway leaves it closed) and its fragments (listed if not
        given)."""
        with self._errors(f"cleaning up upload {upload.tag}"):
            self.client.delete_object(Bucket=self.bucket, Key=self._upload_dir(upload) + "upload")
            names = fragments if fragments is not None else [name for name, _ in self._fragments(upload).values()]
            for lo in range(0, len(names), 1000):
                self.client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": n} for n in names[lo : lo + 1000]], "Quiet": True})

    # --- stale uploads ---------------------------------------------------------------------------------------------
    def _paginate(self, operation: str, **kwargs: Any) -> Iterator[dict[str, Any]]:
        yield from self.client.get_paginator(operation).paginate(Bucket=self.bucket, **kwargs)

    def _parts_activity(self, name: str, s3_id: str) -> tuple[float, int]:
        """(time of the newest part, bytes in parts) of a multipart upload; (0, 0) if it has none or is gone."""
        from botocore.exceptions import ClientError

        last, size = 0.0, 0
        try:
            for page in self._paginate("list_parts", Key=name, UploadId=s3_id):
                for part in page.get("Parts", []):
                    last, size = max(last, part["LastModified"].timestamp()), size + int(part["Size"])
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "NoSuchUpload":
                raise
        return last, size

    def _upload_groups(self) -> dict[str, builtins.list[dict[str, Any]]]:
        """Objects under ``<prefix>.uploads/``, by upload tag."""
        root = f"{self.prefix}{_UPLOADS}/"
        groups: dict[str, builtins.list[dict[str, Any]]] = {}
        for page in self._paginate("list_objects_v2", Prefix=root):
            for item in page.get("Contents", []):
                groups.setdefault(item["Key"][len(root):].split("/", 1)[0], []).append(item)
        return groups

    def stale_uploads(self, older_than_s: float = STALE_UPLOAD_S, key: str | None = None) -> builtins.list[StaleUpload]:
        """Uploads whose marker, fragments, parts and start are all at least ``older_than_s`` seconds old: those
        with a marker (ids ``<tag>~<size>~<S3 id or ->``), fragments left without one (``<tag>~0~-``) and multipart
        uploads under the prefix that no marker names (``-~0~<S3 id>``)."""
        now, wanted = time.time(), None if key is None else _key_tag(check_key(key))
        found: builtins.list[StaleUpload] = []
        with self._errors("listing stale uploads"):
            multipart = {str(u["UploadId"]): (str(u["Key"]), u["Initiated"].timestamp())
                         for page in self._paginate("list_multipart_uploads", Prefix=self.prefix)
                         for u in page.get("Uploads", [])}
            for tag, items in sorted(self._upload_groups().items()):
                marker = next((i["Key"] for i in items if i["Key"].endswith(f"/{tag}/upload")), None)
                info = json.loads(self._read_small(marker)) if marker is not None else {}
                s3_id = info.get("s3_upload_id")
                claimed = multipart.pop(s3_id, None) if s3_id else None  # a marker names it: not an orphan
                if wanted is not None and not tag.endswith(wanted):
                    continue
                last = max(i["LastModified"].timestamp() for i in items)
                size = sum(int(i["Size"]) for i in items)
                if claimed is not None:
                    part_last, part_bytes = self._parts_activity(claimed[0], str(s3_id))
                    last, size = max(last, part_last, claimed[1]), size + part_bytes
                if now - last >= older_than_s:
                    found.append(StaleUpload(f"{tag}~{info.get('size', 0)}~{s3_id or '-'}", info.get("key"),
                                             now - last, size, last))
            for s3_id, (name, initiated) in sorted(multipart.items()):
                target = name[len(self.prefix):]
                if wanted is not None and _key_tag(target) != wanted:
                    continue
                part_last, part_bytes = self._parts_activity(name, s3_id)
                last = max(initiated, part_last)
                if now - last >= older_than_s:
                    found.append(StaleUpload(f"-~0~{s3_id}", target, now - last, part_bytes, last))
        return found

    def _read_small(self, name: str) -> bytes:
        body = self.client.get_object(Bucket=self.bucket, Key=name)["Body"]
        try:
            data: bytes = body.read()
        finally:
            body.close()
        return data

    def remove_stale(self, upload: StaleUpload) -> bool:
        from botocore.exceptions import ClientError

        tag, _, rest = upload.upload_id.partition("~")
        s3_id = rest.partition("~")[2]
        with self._errors(f"removing stale upload {upload.upload_id}"):
            items = self._upload_groups().get(tag, []) if tag != "-" else []
            newest = max((i["LastModified"].timestamp() for i in items), default=0.0)
            if s3_id != "-" and upload.key is not None:
                newest = max(newest, self._parts_activity(self.prefix + upload.key, s3_id)[0])
            if newest > upload.last_write:
                return False  # written since it was listed: live after all
            if s3_id != "-" and upload.key is not None:
                try:
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.prefix + upload.key,
                                                       UploadId=s3_id)
                except ClientError as exc:
                    if exc.response.get("Error", {}).get("Code") != "NoSuchUpload":
                        raise
        if tag != "-":
            self._remove_upload_objects(_Upload(tag, 0, None), [i["Key"] for i in items])
        return True

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def spec(self) -> dict[str, Any]:
        return {"kind": "s3", "bucket": self.bucket, "prefix": self.prefix, "endpoint_url": self.endpoint_url,
                "region": self.region, "read_concurrency": self.read_concurrency,
                "min_range_bytes": self.min_range_bytes, "max_attempts": self.max_attempts,
                "max_streams": self.max_streams}


def _backoff(failures: int, base_s: float = 0.05, cap_s: float = 5.0) -> None:
    """Exponential back-off with full jitter."""
    time.sleep(random.uniform(0, min(cap_s, base_s * 2 ** failures)))


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` → (bucket, prefix)."""
    if not url.startswith("s3://"):
        raise StoreError(f"not an s3:// URL: {url!r}")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    return bucket, prefix



def range_header(start: int, stop: int) -> str:
    """The HTTP ``Range`` of bytes ``[start, stop)``."""
    return f"bytes={start}-{stop - 1}"


def signed_headers(url: str) -> list[str]:
    """The ``X-Amz-SignedHeaders`` of a SigV4 presigned URL (lower-case names)."""
    from urllib.parse import parse_qs, urlsplit

    values = parse_qs(urlsplit(url).query).get("X-Amz-SignedHeaders", [""])
    return [name for name in values[0].split(";") if name]


class PresignedRangeReader:
    """Reads exactly the byte range a URL of :meth:`S3Store.presign_range` was signed for, through that URL only
    (no credentials): one GET with the signed ``Range``, a 206 whose ``Content-Range`` must be that range, and a
    body of exactly ``stop - start`` bytes read into the caller's buffer."""

    def __init__(self, url: str, start: int, stop: int, *, timeout_s: float = 60.0) -> None:
        if not 0 <= start < stop:
            raise StoreError(f"a presigned range needs 0 <= start < stop, got [{start}, {stop})")
        if "range" not in signed_headers(url):
            raise StoreError("the presigned URL does not sign a Range header; refusing to read through it")
        self.url, self.start, self.stop, self.timeout_s = url, start, stop, timeout_s
        self.size = stop - start

    def read_into(self, buf: memoryview) -> None:
        """Fill ``buf`` (exactly ``stop - start`` bytes) with the range."""
        import urllib3

        if len(buf) != self.size:
            raise StoreError(f"a presigned read of [{self.start}, {self.stop}) needs a buffer of {self.size} bytes, "
                             f"got {len(buf)}")
        http = urllib3.PoolManager(retries=urllib3.Retry(total=3, backoff_factor=0.1, status_forcelist=(500, 502,
                                                                                                      503, 504)))
        response = http.request("GET", self.url, headers={"Range": range_header(self.start, self.stop)},
                                preload_content=False, timeout=urllib3.Timeout(connect=10, read=self.timeout_s))
        try:
            where = f"presigned GET of bytes [{self.start}, {self.stop})"
            if response.status != 206:
                body = response.read(4096).decode(errors="replace")
                raise StoreError(f"{where} answered {response.status}, not 206: {body[:300]}")
            content_range = str(response.headers.get("Content-Range", ""))
            if content_range.partition("/")[0] != f"bytes {self.start}-{self.stop - 1}":
                raise StoreError(f"{where} answered Content-Range {content_range!r}")
            done = 0
            while done < self.size:
                n = response.readinto(buf[done:])
                if not n:
                    raise StoreError(f"{where} ended early at byte {self.start + done}")
                done += n
            if response.read(1):
                raise StoreError(f"{where} answered more than {self.size} bytes")
        finally:
            response.release_conn()
            http.clear()

    def read(self) -> bytes:
        buf = bytearray(self.size)
        self.read_into(memoryview(buf))
        return bytes(buf)
