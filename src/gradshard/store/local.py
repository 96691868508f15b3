"""Local-directory store, the embedded default.

Objects are files under a root directory. ``put`` and completed uploads become visible by ``os.replace`` of a
fully written and fsynced temporary file, so a reader never sees a partial object. Uploads are preallocated
temporary files under ``<root>/.uploads/`` that any process may ``pwrite`` into.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Any

from gradshard.errors import ObjectNotFoundError, StoreError
from gradshard.store.base import BytesLike, ObjectReader, Store, as_bytes, check_key

_UPLOADS = ".uploads"


def _key_tag(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class LocalObjectReader(ObjectReader):
    """A file opened once and read with ``pread`` (no shared file position, safe across threads)."""

    def __init__(self, store: LocalStore, key: str, path: Path) -> None:
        self._store = store
        self._key = key
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise ObjectNotFoundError(f"object {key!r} does not exist in {store.root}") from None
        self.size = os.fstat(self._fd).st_size

    def read_into(self, offset: int, buf: memoryview) -> None:
        want = len(buf)
        if offset < 0 or offset + want > self.size:
            raise StoreError(f"read of bytes [{offset}, {offset + want}) is outside object {self._key!r} "
                             f"of {self.size} bytes")
        done = 0
        while done < want:
            n = os.preadv(self._fd, [buf[done:]], offset + done)
            if n == 0:
                raise StoreError(f"object {self._key!r} ended early at byte {offset + done} (truncated?)")
            done += n
        self._store.io.gets += 1
        self._store.io.bytes_read += want

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class LocalStore(Store):
    """Objects as files under ``root`` (created if missing).

    ``fsync=True`` (default) makes every published object durable before it becomes visible; ``False`` keeps
    atomic visibility but leaves flushing to the OS (for scratch stores and benchmarks).
    """

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        super().__init__()
        self.fsync = fsync
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _upload_path(self, key: str, upload_id: str) -> Path:
        """The temporary file of an upload; the id ends with a digest of its key, so ids cannot be mixed up."""
        if not upload_id.isalnum() or not upload_id.endswith(_key_tag(key)):
            raise StoreError(f"upload id {upload_id!r} is not an upload of {key!r}")
        return self.root / _UPLOADS / upload_id

    def put(self, key: str, data: BytesLike) -> None:
        view = as_bytes(data)  # len() of a numpy array counts elements, not bytes
        upload_id = self.begin_upload(key, len(view))
        try:
            self.write_at(key, upload_id, 0, view)
            self.complete_upload(key, upload_id)
        except BaseException:
            self.abort_upload(key, upload_id)
            raise
        self.io.puts -= 1  # begin/complete counted one put; write_at counted the bytes

    def size(self, key: str) -> int:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFoundError(f"object {key!r} does not exist in {self.root}")
        return path.stat().st_size

    def open_reader(self, key: str) -> ObjectReader:
        return LocalObjectReader(self, key, self._path(key))

    def list(self, prefix: str = "") -> list[str]:
        keys = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self.root)
            for name in filenames:
                if name.startswith("."):
                    continue
                key = (rel / name).as_posix() if rel != Path(".") else name
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def begin_upload(self, key: str, size: int) -> str:
        check_key(key)
        if size < 0:
            raise StoreError(f"upload of {key!r} needs a non-negative size, got {size}")
        upload_id = uuid.uuid4().hex + _key_tag(key)
        path = self._upload_path(key, upload_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.truncate(size)
        return upload_id

    def write_at(self, key: str, upload_id: str, offset: int, data: BytesLike) -> None:
        path = self._upload_path(key, upload_id)
        view = as_bytes(data)
        try:
            fd = os.open(path, os.O_WRONLY)
        except FileNotFoundError:
            raise StoreError(f"upload {upload_id} of {key!r} does not exist (aborted or completed?)") from None
        try:
            size = os.fstat(fd).st_size
            if offset < 0 or offset + len(view) > size:
                raise StoreError(f"write of bytes [{offset}, {offset + len(view)}) is outside upload of {key!r} "
                                 f"({size} bytes)")
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], offset + done)
        finally:
            os.close(fd)
        self.io.puts += 1
        self.io.bytes_written += len(view)

    def complete_upload(self, key: str, upload_id: str) -> None:
        src = self._upload_path(key, upload_id)
        dst = self._path(key)
        try:
            fd = os.open(src, os.O_RDONLY)
        except FileNotFoundError:
            raise StoreError(f"upload {upload_id} of {key!r} does not exist (aborted or completed?)") from None
        try:
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
        self.io.puts += 1

    def abort_upload(self, key: str, upload_id: str) -> None:
        self._upload_path(key, upload_id).unlink(missing_ok=True)

    def spec(self) -> dict[str, Any]:
        return {"kind": "local", "root": str(self.root), "fsync": self.fsync}
