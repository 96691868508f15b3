"""In-memory store for tests and single-process use (not visible to other processes)."""

from __future__ import annotations

import builtins
import threading
import time
import uuid
from typing import Any

from gradshard.errors import ObjectNotFoundError, StoreError
from gradshard.store.base import STALE_UPLOAD_S, BytesLike, ObjectReader, StaleUpload, Store, as_bytes, check_key


class MemoryObjectReader(ObjectReader):
    def __init__(self, store: MemoryStore, key: str, data: bytes) -> None:
        self._store, self._key, self._data = store, key, data
        self.size = len(data)

    def read_into(self, offset: int, buf: memoryview) -> None:
        if offset < 0 or offset + len(buf) > self.size:
            raise StoreError(f"read of bytes [{offset}, {offset + len(buf)}) is outside object {self._key!r} "
                             f"of {self.size} bytes")
        buf[:] = self._data[offset : offset + len(buf)]
        self._store.io.gets += 1
        self._store.io.bytes_read += len(buf)


class MemoryStore(Store):
    """A dict of immutable ``bytes``; uploads are ``bytearray`` until completed."""

    def __init__(self) -> None:
        super().__init__()
        self._objects: dict[str, bytes] = {}
        self._uploads: dict[str, tuple[str, bytearray]] = {}
        self._written: dict[str, float] = {}  # upload id -> time of its last write (or its start)
        self._lock = threading.Lock()

    def put(self, key: str, data: BytesLike) -> None:
        blob = bytes(as_bytes(data))
        with self._lock:
            self._objects[check_key(key)] = blob
        self.io.puts += 1
        self.io.bytes_written += len(blob)

    def put_new(self, key: str, data: BytesLike) -> bool:
        blob = bytes(as_bytes(data))
        with self._lock:
            if check_key(key) in self._objects:
                return False
            self._objects[key] = blob
        self.io.puts += 1
        self.io.bytes_written += len(blob)
        return True

    def _get_object(self, key: str) -> bytes:
        try:
            return self._objects[check_key(key)]
        except KeyError:
            raise ObjectNotFoundError(f"object {key!r} does not exist in the memory store") from None

    def size(self, key: str) -> int:
        return len(self._get_object(key))

    def open_reader(self, key: str) -> ObjectReader:
        return MemoryObjectReader(self, key, self._get_object(key))

    def list(self, prefix: str = "") -> list[str]:
        with self._lock:
            return sorted(k for k in self._objects if k.startswith(prefix))

    def delete(self, key: str) -> None:
        with self._lock:
            self._objects.pop(check_key(key), None)

    def begin_upload(self, key: str, size: int) -> str:
        if size < 0:
            raise StoreError(f"upload of {key!r} needs a non-negative size, got {size}")
        upload_id = uuid.uuid4().hex
        with self._lock:
            self._uploads[upload_id] = (check_key(key), bytearray(size))
            self._written[upload_id] = time.time()
        return upload_id

    def _upload(self, key: str, upload_id: str) -> bytearray:
        entry = self._uploads.get(upload_id)
        if entry is None or entry[0] != key:
            raise StoreError(f"upload {upload_id} of {key!r} does not exist (aborted or completed?)")
        return entry[1]

    def write_at(self, key: str, upload_id: str, offset: int, data: BytesLike) -> None:
        buf = self._upload(key, upload_id)
        view = as_bytes(data)
        if offset < 0 or offset + len(view) > len(buf):
            raise StoreError(f"write of bytes [{offset}, {offset + len(view)}) is outside upload of {key!r} "
                             f"({len(buf)} bytes)")
        buf[offset : offset + len(view)] = view
        self._written[upload_id] = time.time()
        self.io.puts += 1
        self.io.bytes_written += len(view)

    def complete_upload(self, key: str, upload_id: str) -> None:
        with self._lock:
            buf = self._upload(key, upload_id)
            self._objects[key] = bytes(buf)
            del self._uploads[upload_id]
            self._written.pop(upload_id, None)
        self.io.puts += 1

    def abort_upload(self, key: str, upload_id: str) -> None:
        with self._lock:
            self._uploads.pop(upload_id, None)
            self._written.pop(upload_id, None)

    def stale_uploads(self, older_than_s: float = STALE_UPLOAD_S, key: str | None = None) -> builtins.list[StaleUpload]:
        now = time.time()
        with self._lock:
            return [StaleUpload(upload_id, target, now - self._written[upload_id], len(buf), self._written[upload_id])
                    for upload_id, (target, buf) in sorted(self._uploads.items())
                    if (key is None or target == key) and now - self._written[upload_id] >= older_than_s]

    def remove_stale(self, upload: StaleUpload) -> bool:
        with self._lock:
            if self._written.get(upload.upload_id, float("inf")) > upload.last_write:
                return False  # written since, or gone
            self._uploads.pop(upload.upload_id, None)
            self._written.pop(upload.upload_id, None)
        return True

    def spec(self) -> dict[str, Any]:
        raise StoreError("the memory store lives in one process; use a local or S3 store with process executors")
