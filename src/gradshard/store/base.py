"""The object store contract every backend implements.

Objects are immutable byte strings under ``/``-separated keys. Writes become visible atomically: ``put`` for
small objects, and *uploads* for large ones, which many writers fill at byte offsets (each shard function writes
its own range of the output) and which appear only when completed. Reads can be ranged, so a shard function
reads only its slice of every client's update.
"""

from __future__ import annotations

import builtins
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from gradshard.errors import StoreError

STALE_UPLOAD_S = 3600.0  # an upload nobody wrote for this long is abandoned (longer than any function's timeout)
BytesLike = bytes | bytearray | memoryview | npt.NDArray[Any]  # numpy arrays must be C-contiguous
StoreSpec = dict[str, Any]  # JSON-able: what open_store() reopens a store from, in another process
_KEY = re.compile(r"^[A-Za-z0-9_.=+-]+(/[A-Za-z0-9_.=+-]+)*$")


def as_bytes(data: BytesLike) -> memoryview:
    """A flat byte view of any bytes-like object or contiguous numpy array (no copy)."""
    view = data.data if isinstance(data, np.ndarray) else memoryview(data)
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def check_key(key: str) -> str:
    """Refuse keys that could escape a directory or collide with temporaries (``..``, leading dot, odd chars)."""
    if not _KEY.match(key) or any(part in (".", "..") or part.startswith(".") for part in key.split("/")):
        raise StoreError(f"invalid object key {key!r}: use letters, digits and _.=+- separated by '/'")
    return key


class ObjectReader(ABC):
    """An open object for ranged reads; ``read_into`` fills a buffer from a byte offset."""

    size: int

    @abstractmethod
    def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with bytes ``[offset, offset + len(buf))``; raises if the object is shorter."""

    def expect(self, offset: int, stop: int) -> None:  # noqa: B027 - optional hook
        """Bytes ``[offset, stop)`` will be read next, front to back, in consecutive pieces: a store may serve
        them from one streamed request (S3) instead of one request per piece."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the handle."""

    def __enter__(self) -> ObjectReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SequentialWriter:
    """Writes consecutive bytes of an upload from a starting offset; :meth:`close` flushes what it buffered.

    The base writer passes every write straight to :meth:`Store.write_at`. Stores whose uploads work in parts
    (S3: parts of at least 5 MiB) buffer up to a part boundary, so one function writing its range window by
    window still uploads whole parts.
    """

    def __init__(self, store: Store, key: str, upload_id: str, offset: int) -> None:
        self.store, self.key, self.upload_id, self.offset = store, key, upload_id, offset

    def write(self, data: BytesLike) -> None:
        view = as_bytes(data)
        self.store.write_at(self.key, self.upload_id, self.offset, view)
        self.offset += len(view)

    def close(self) -> None:
        """Write out anything buffered."""


@dataclass(frozen=True)
class StaleUpload:
    """An upload nobody completed, aborted or wrote for ``idle_s`` seconds (a crashed driver's, a killed client's).

    ``upload_id`` is the store's handle for it, ``key`` the object it would have published (None where the store
    cannot tell: a local upload's file names only a digest of its key), ``size`` the bytes it holds, and
    ``last_write`` the time (epoch seconds) of its last write, checked again before it is removed.
    """

    upload_id: str
    key: str | None
    idle_s: float
    size: int
    last_write: float


@dataclass
class IOCounters:
    """What a store did on behalf of one invocation."""

    gets: int = 0
    puts: int = 0
    bytes_read: int = 0
    bytes_written: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"gets": self.gets, "puts": self.puts, "bytes_read": self.bytes_read,
                "bytes_written": self.bytes_written}


class Store(ABC):
    """An object store. Implementations count their requests in ``self.io``."""

    def __init__(self) -> None:
        self.io = IOCounters()

    # --- whole objects -------------------------------------------------------------------------------------
    @abstractmethod
    def put(self, key: str, data: BytesLike) -> None:
        """Write a whole object atomically (readers see the old object or the new one, never a mix)."""

    @abstractmethod
    def size(self, key: str) -> int:
        """Length of an object in bytes; :class:`ObjectNotFoundError` if it does not exist."""

    @abstractmethod
    def open_reader(self, key: str) -> ObjectReader:
        """Open an object for ranged reads."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys that start with ``prefix``, sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object; removing a missing object is not an error."""

    def put_new(self, key: str, data: BytesLike) -> bool:
        """Write a whole object only if ``key`` does not exist yet, atomically: of any number of concurrent
        callers exactly one gets True; False (nothing written) if the object exists. Used for single-use records
        (a consumed token id); stores that cannot create exclusively refuse."""
        raise StoreError(f"{type(self).__name__} cannot create an object exclusively (put_new)")

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except KeyError:
            return False
        return True

    def get(self, key: str) -> bytes:
        return self.get_range(key, 0, self.size(key))

    def get_range(self, key: str, start: int, stop: int) -> bytes:
        """Bytes ``[start, stop)`` of an object."""
        buf = bytearray(stop - start)
        with self.open_reader(key) as reader:
            reader.read_into(start, memoryview(buf))
        return bytes(buf)

    # --- uploads: large objects written in parts at offsets, visible on completion --------------------------
    @abstractmethod
    def begin_upload(self, key: str, size: int) -> str:
        """Start an upload of an object of exactly ``size`` bytes; returns its upload id."""

    @abstractmethod
    def write_at(self, key: str, upload_id: str, offset: int, data: BytesLike) -> None:
        """Write ``data`` at byte ``offset`` of an upload. Any process may write any disjoint range."""

    def writer(self, key: str, upload_id: str, offset: int) -> SequentialWriter:
        """A writer of consecutive bytes of an upload from ``offset``; close it to flush."""
        return SequentialWriter(self, key, upload_id, offset)

    @contextmanager
    def upload(self, key: str, size: int) -> Iterator[SequentialWriter]:
        """A new object of ``size`` bytes written front to back: published when the block ends, aborted (nothing
        visible) if it raises."""
        upload_id = self.begin_upload(key, size)
        try:
            writer = self.writer(key, upload_id, 0)
            yield writer
            writer.close()
            self.complete_upload(key, upload_id)
        except BaseException:
            self.abort_upload(key, upload_id)
            raise

    @abstractmethod
    def complete_upload(self, key: str, upload_id: str) -> None:
        """Make the upload visible under ``key`` atomically."""

    @abstractmethod
    def abort_upload(self, key: str, upload_id: str) -> None:
        """Discard an upload; nothing becomes visible."""

    # --- stale uploads ------------------------------------------------------------------------------------------
    @abstractmethod
    def stale_uploads(self, older_than_s: float = STALE_UPLOAD_S, key: str | None = None) -> builtins.list[StaleUpload]:
        """Uploads (with their parts and fragments) nobody has written for at least ``older_than_s`` seconds;
        only those of ``key`` if given."""

    @abstractmethod
    def remove_stale(self, upload: StaleUpload) -> bool:
        """Abort ``upload`` and delete what it holds, unless it was written since it was listed; True if removed."""

    def collect_stale_uploads(self, older_than_s: float = STALE_UPLOAD_S, *, key: str | None = None,
                              dry_run: bool = False) -> builtins.list[StaleUpload]:
        """Abort and delete every upload idle for ``older_than_s`` seconds (default one hour); returns them.

        An upload is live while someone writes it: a round's functions write its output window by window, so an
        upload idle for longer than the longest function's timeout (15 minutes on AWS Lambda, ``timeout_s`` of an
        executor) belongs to no live round. Choose ``older_than_s`` above that, and above the time a tree
        topology's root waits before it writes. ``dry_run`` only lists them.
        """
        if older_than_s < 0:
            raise StoreError(f"the age of a stale upload must be non-negative, got {older_than_s:g} s")
        found = self.stale_uploads(older_than_s, key)
        if dry_run:
            return found
        return [upload for upload in found if self.remove_stale(upload)]

    # --- identity across processes ----------------------------------------------------------------------------
    @abstractmethod
    def spec(self) -> StoreSpec:
        """A JSON-able description from which :func:`gradshard.store.open_store` reopens this store elsewhere."""

