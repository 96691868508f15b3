"""A client's view of the store through URLs the driver presigned: it reads the objects it was given and writes the
one object it was given, with no credentials of its own.

The driver (which holds the store's credentials) presigns, per client task, a ranged GET of each whole object the
client reads (its data, the global model, the kept buffers: :meth:`S3Store.presign_range`) and a PUT of its own
update key (:meth:`S3Store.presign_put`). A client function deployed with no S3 permission at all can then train and
upload, and cannot read or write any other object — what IAM alone cannot give per invocation.

Uploads are buffered in memory and sent as one PUT when complete (an update is written once, whole); nothing is
visible before. Listing, deleting and every key not in the URLs are refused with the reason.
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping

from gradshard.errors import ObjectNotFoundError, StoreError
from gradshard.store.base import STALE_UPLOAD_S, BytesLike, ObjectReader, StaleUpload, Store, StoreSpec, as_bytes


class _WholeObjectReader(ObjectReader):
    """Ranged reads of an object fetched whole, once, through its presigned GET."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self.size = len(data)

    def read_into(self, offset: int, buf: memoryview) -> None:
        if offset < 0 or offset + len(buf) > self.size:
            raise StoreError(f"read of bytes [{offset}, {offset + len(buf)}) is outside an object of {self.size}")
        buf[:] = self._data[offset : offset + len(buf)]


class PresignedStore(Store):
    """``gets``: key -> (presigned GET of the whole object, its size); ``puts``: key -> presigned PUT."""

    def __init__(self, gets: Mapping[str, tuple[str, int]], puts: Mapping[str, str], *, timeout_s: float = 60.0
                 ) -> None:
        super().__init__()
        self.gets, self.puts, self.timeout_s = dict(gets), dict(puts), timeout_s
        self._cache: dict[str, bytes] = {}
        self._uploads: dict[str, tuple[str, bytearray]] = {}
        self._written: set[str] = set()

    def _refuse(self, what: str, key: str) -> StoreError:
        return StoreError(f"{what} {key!r} is not among the objects this task was given URLs for")

    def _fetch(self, key: str) -> bytes:
        from gradshard.store.s3 import PresignedRangeReader

        if key not in self._cache:
            if key not in self.gets:
                raise ObjectNotFoundError(f"object {key!r}: no presigned GET was given for it")
            url, size = self.gets[key]
            data = PresignedRangeReader(url, 0, size, timeout_s=self.timeout_s).read() if size else b""
            self.io.gets += 1
            self.io.bytes_read += len(data)
            self._cache[key] = data
        return self._cache[key]

    def size(self, key: str) -> int:
        if key in self.gets:
            return self.gets[key][1]
        raise ObjectNotFoundError(f"object {key!r}: no presigned GET was given for it")

    def exists(self, key: str) -> bool:
        return key in self.gets or key in self._written

    def open_reader(self, key: str) -> ObjectReader:
        return _WholeObjectReader(self._fetch(key))

    def get(self, key: str) -> bytes:
        return self._fetch(key)

    def put(self, key: str, data: BytesLike) -> None:
        self._send(key, bytes(as_bytes(data)))

    def _send(self, key: str, body: bytes) -> None:
        import urllib3

        if key not in self.puts:
            raise self._refuse("writing", key)
        http = urllib3.PoolManager(retries=urllib3.Retry(total=3, backoff_factor=0.1,
                                                         status_forcelist=(500, 502, 503, 504)))
        try:
            response = http.request("PUT", self.puts[key], body=body, timeout=urllib3.Timeout(
                connect=10, read=self.timeout_s))
        finally:
            http.clear()
        if response.status != 200:
            raise StoreError(f"presigned PUT of {key!r} answered {response.status}: "
                             f"{response.data[:300].decode(errors='replace')}")
        self.io.puts += 1
        self.io.bytes_written += len(body)
        self._written.add(key)

    def begin_upload(self, key: str, size: int) -> str:
        if key not in self.puts:
            raise self._refuse("writing", key)
        upload_id = f"presigned-{len(self._uploads)}"
        self._uploads[upload_id] = (key, bytearray(size))
        return upload_id

    def write_at(self, key: str, upload_id: str, offset: int, data: BytesLike) -> None:
        target, buffer = self._upload(key, upload_id)
        view = as_bytes(data)
        if offset < 0 or offset + len(view) > len(buffer):
            raise StoreError(f"write of bytes [{offset}, {offset + len(view)}) outside the upload of {target!r}")
        buffer[offset : offset + len(view)] = view

    def complete_upload(self, key: str, upload_id: str) -> None:
        _, buffer = self._upload(key, upload_id)
        self._send(key, bytes(buffer))
        del self._uploads[upload_id]

    def abort_upload(self, key: str, upload_id: str) -> None:
        self._uploads.pop(upload_id, None)

    def _upload(self, key: str, upload_id: str) -> tuple[str, bytearray]:
        found = self._uploads.get(upload_id)
        if found is None or found[0] != key:
            raise StoreError(f"no open upload {upload_id!r} of {key!r}")
        return found

    def list(self, prefix: str = "") -> builtins.list[str]:
        raise StoreError("a presigned view of the store cannot list it")

    def delete(self, key: str) -> None:
        raise self._refuse("deleting", key)

    def stale_uploads(self, older_than_s: float = STALE_UPLOAD_S, key: str | None = None) -> builtins.list[StaleUpload]:
        return []

    def remove_stale(self, upload: StaleUpload) -> bool:
        return False

    def spec(self) -> StoreSpec:
        raise StoreError("a presigned view of the store lives in its function only")
