"""Local-directory store, the embedded default.

Objects are files under a root directory. ``put`` and completed uploads become visible by ``os.replace`` of a
fully written and fsynced temporary file, so a reader never sees a partial object. Uploads are preallocated
temporary files under ``<root>/.uploads/`` that any process may ``pwrite`` into.

**Only regular files inside the root are objects.** Every path is resolved one directory at a time from the root
with ``O_NOFOLLOW`` (``openat``), so a symbolic link — as the object or as any directory above it — is never
followed, and the entry itself is checked with ``lstat`` before it is opened (``O_NONBLOCK``, then ``S_ISREG`` on
the opened descriptor). A symlink, FIFO, socket or device is refused with :class:`UnsafeObjectError`, naming the
key and the kind of file and never anything read from it; nothing is written or deleted through a symlinked
directory either. Listing names such entries (so a round can reject them by name) but never descends a symlinked
directory. Reads of a regular file cannot block: a read that returns no bytes raises.
"""

from __future__ import annotations

import builtins
import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import resource
import stat
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gradshard.errors import ObjectNotFoundError, StoreError, UnsafeObjectError
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

log = logging.getLogger(__name__)

_UPLOADS = ".uploads"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_FILE_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _key_tag(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def file_kind(mode: int) -> str:
    """What a file of ``mode`` is, in words."""
    for test, kind in ((stat.S_ISLNK, "symbolic link"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISDIR, "directory"), (stat.S_ISREG, "regular file")):
        if test(mode):
            return kind
    return "special file"


def _scan(dfd: int, base: str, start: str, keys: list[str]) -> None:
    """Append the keys of directory ``dfd`` (closed here) whose names start with ``start``, recursively."""
    try:
        with os.scandir(dfd) as entries:
            found = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries
                     if e.name.startswith(start) and not e.name.startswith(".")]
        for name, is_dir in found:
            if not is_dir:
                keys.append(base + name)
                continue
            try:
                sub = os.open(name, _DIR_FLAGS, dir_fd=dfd)
            except OSError:  # removed, or replaced by a link, since it was listed
                continue
            _scan(sub, f"{base}{name}/", "", keys)
    finally:
        os.close(dfd)


class OpenFiles:
    """The descriptors a store's readers keep open between reads, at most ``limit`` of them.

    The first ``limit`` readers keep theirs; any further reader opens its file for each read and closes it after
    (for the cyclic access of a shard function over N clients this keeps the most descriptors stable). So a
    function reading 1,100 clients under ``ulimit -n 1024`` never runs out of descriptors.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: dict[LocalObjectReader, int] = {}
        self._lock = threading.Lock()

    def take(self, reader: LocalObjectReader) -> int | None:
        """The reader's kept descriptor, now the caller's (None: it has none)."""
        with self._lock:
            return self._held.pop(reader, None)

    def keep(self, reader: LocalObjectReader, fd: int) -> None:
        """Give ``fd`` back to be kept for ``reader``, or close it if the budget is spent."""
        with self._lock:
            if len(self._held) < self.limit:
                self._held[reader] = fd
                return
        os.close(fd)


def default_open_files() -> int:
    """How many descriptors a local store's readers keep open: a quarter of the soft ``RLIMIT_NOFILE``, at most
    256 (the rest is left to the process, and to readers of other stores)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(8, min(256, soft // 4)) if soft != resource.RLIM_INFINITY else 256


class LocalObjectReader(ObjectReader):
    """A file read with ``pread`` (no shared file position, safe across threads), pinned to the file it opened.

    Its descriptor is kept between reads while the store's :class:`OpenFiles` budget allows; otherwise each read
    reopens the key and checks that it is the same file (device, inode and size), so a replaced object fails
    loudly instead of mixing two versions — as the S3 store pins an ETag.
    """

    def __init__(self, store: LocalStore, key: str) -> None:
        self._store = store
        self._key = key
        fd, st = store.open_regular(key, os.O_RDONLY)
        self.size = st.st_size
        self._pin = (st.st_dev, st.st_ino)
        self._closed = False
        store.open_files.keep(self, fd)

    def _fd(self) -> int:
        fd = self._store.open_files.take(self)
        if fd is not None:
            return fd
        if self._closed:
            raise StoreError(f"object {self._key!r} was read after its reader was closed")
        fd, st = self._store.open_regular(self._key, os.O_RDONLY)
        if (st.st_dev, st.st_ino) != self._pin or st.st_size != self.size:
            os.close(fd)
            raise StoreError(f"object {self._key!r} in {self._store.root} was replaced while it was being read; "
                             "rerun the round (objects must not change while a round reads them)")
        return fd

    def read_into(self, offset: int, buf: memoryview) -> None:
        want = len(buf)
        if offset < 0 or offset + want > self.size:
            raise StoreError(f"read of bytes [{offset}, {offset + want}) is outside object {self._key!r} "
                             f"of {self.size} bytes")
        fd = self._fd()
        try:
            done = 0
            while done < want:
                n = os.preadv(fd, [buf[done:]], offset + done)
                if n == 0:
                    raise StoreError(f"object {self._key!r} ended early at byte {offset + done} (truncated?)")
                done += n
        finally:
            self._store.open_files.keep(self, fd)
        self._store.io.gets += 1
        self._store.io.bytes_read += want

    def close(self) -> None:
        self._closed = True
        fd = self._store.open_files.take(self)
        if fd is not None:
            os.close(fd)


def _sync_file_range() -> Callable[[int, int, int], None] | None:
    """libc's ``sync_file_range`` (wait before, write, wait after) where it exists (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    call.restype = ctypes.c_int
    flags = 1 | 2 | 4  # SYNC_FILE_RANGE_WAIT_BEFORE | _WRITE | _WAIT_AFTER

    def sync(fd: int, offset: int, nbytes: int) -> None:
        if call(fd, offset, nbytes, flags) != 0:  # not fatal: the commit's fsync writes whatever is left
            log.debug("sync_file_range failed: %s", os.strerror(ctypes.get_errno()))

    return sync


_SYNC_FILE_RANGE = _sync_file_range()


class _RangeSyncingWriter(SequentialWriter):
    """A sequential writer whose :meth:`close` writes its own range back to the disk (see :meth:`LocalStore.writer`)."""

    def __init__(self, store: LocalStore, key: str, upload_id: str, offset: int) -> None:
        super().__init__(store, key, upload_id, offset)
        self.local, self.start = store, offset

    def close(self) -> None:
        self.local.sync_range(self.key, self.upload_id, self.start, self.offset - self.start)


class LocalStore(Store):
    """Objects as files under ``root`` (created if missing).

    ``fsync=True`` (default) makes every published object durable before it becomes visible; ``False`` keeps
    atomic visibility but leaves flushing to the OS (for scratch stores and benchmarks). ``max_open_files``
    bounds the descriptors its readers keep between reads (default :func:`default_open_files`); readers past it
    reopen their file for each read.
    """

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True, max_open_files: int | None = None,
                 sync_ranges: bool = True) -> None:
        super().__init__()
        self.fsync = fsync
        self.sync_ranges = sync_ranges  # with fsync: each range writer writes its range back as it closes
        self.open_files = OpenFiles(default_open_files() if max_open_files is None else max_open_files)
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    # --- resolving keys without following links ---------------------------------------------------------------
    def _refusal(self, subject: str, name: str, mode: int) -> UnsafeObjectError:
        """The error for entry ``name`` of kind ``mode`` met while doing ``subject`` (it names nothing read)."""
        what = f"{subject} in {self.root} is" if subject == f"object {name!r}" else \
            f"{subject} in {self.root}: {name!r} is"
        return UnsafeObjectError(f"{what} a {file_kind(mode)}, not a regular file inside the store; refused without "
                                 "reading it (remove it; objects must be regular files, directories real ones)")

    def _open_dir(self, parts: Sequence[str], subject: str, *, create: bool = False) -> int | None:
        """A descriptor of the directory ``root/parts...``, each step opened with ``O_NOFOLLOW``; None if it does
        not exist (unless ``create``). A symlink or special file on the way raises :class:`UnsafeObjectError`."""
        fd = os.open(self.root, _DIR_FLAGS & ~os.O_NOFOLLOW)  # the root itself was resolved by the caller
        try:
            for i, part in enumerate(parts):
                try:
                    step = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        os.close(fd)
                        return None
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, dir_fd=fd)
                    step = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    mode = os.lstat(part, dir_fd=fd).st_mode
                    if stat.S_ISREG(mode) and not create:  # "a/b" where "a" is an object: no such object
                        os.close(fd)
                        return None
                    raise self._refusal(subject, "/".join(parts[: i + 1]), mode) from None
                os.close(fd)
                fd = step
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _missing(self, key: str) -> ObjectNotFoundError:
        return ObjectNotFoundError(f"object {key!r} does not exist in {self.root}")

    def _lstat(self, key: str) -> tuple[int, os.stat_result]:
        """(descriptor of the key's directory, lstat of the entry), the entry checked to be a regular file."""
        parts = check_key(key).split("/")
        dfd = self._open_dir(parts[:-1], f"object {key!r}")
        if dfd is None:
            raise self._missing(key)
        try:
            st = os.lstat(parts[-1], dir_fd=dfd)
        except FileNotFoundError:
            os.close(dfd)
            raise self._missing(key) from None
        if not stat.S_ISREG(st.st_mode):
            os.close(dfd)
            if stat.S_ISDIR(st.st_mode):
                raise self._missing(key)  # a directory is not an object
            raise self._refusal(f"object {key!r}", key, st.st_mode)
        return dfd, st

    def open_regular(self, key: str, flags: int) -> tuple[int, os.stat_result]:
        """Open the object ``key`` (``flags``: ``O_RDONLY`` or ``O_WRONLY``) if it is a regular file inside the
        root, never following a link or blocking on a FIFO; returns (descriptor, its stat)."""
        dfd, st = self._lstat(key)
        try:
            try:
                fd = os.open(key.rsplit("/", 1)[-1], flags | _FILE_FLAGS, dir_fd=dfd)
            except FileNotFoundError:
                raise self._missing(key) from None
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise StoreError(f"cannot open object {key!r} in {self.root}: {exc.strerror}") from None
                raise self._refusal(f"object {key!r}", key, stat.S_IFLNK) from None
        finally:
            os.close(dfd)
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
            os.close(fd)  # replaced between the check and the open
            raise self._refusal(f"object {key!r}", key, opened.st_mode)
        return fd, opened

    # --- objects -----------------------------------------------------------------------------------------------
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

    def put_new(self, key: str, data: BytesLike) -> bool:
        """A fully written (and fsynced) temporary file hard-linked to the key (``linkat`` fails if any entry of
        that name exists, a symlink included, and never follows one); the temporary is removed either way."""
        view = as_bytes(data)
        parts = check_key(key).split("/")
        upload_id = self.begin_upload(key, len(view))
        try:
            self.write_at(key, upload_id, 0, view)
            if self.fsync:
                fd = self._open_upload(key, upload_id, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            dst = self._open_dir(parts[:-1], f"publishing {key!r}", create=True)
            src = self._uploads_dir()
            assert dst is not None and src is not None
            try:
                os.link(upload_id, parts[-1], src_dir_fd=src, dst_dir_fd=dst, follow_symlinks=False)
            except FileExistsError:
                self.io.puts -= 1
                self.io.bytes_written -= len(view)
                return False
            finally:
                os.close(dst)
                os.close(src)
            return True
        finally:
            self.abort_upload(key, upload_id)

    def size(self, key: str) -> int:
        dfd, st = self._lstat(key)
        os.close(dfd)
        return st.st_size

    def open_reader(self, key: str) -> ObjectReader:
        return LocalObjectReader(self, key)

    def list(self, prefix: str = "") -> list[str]:
        """Keys under ``prefix``, visiting only the directory the prefix names (and, below it, what matches).

        Every entry that is not a directory is listed — a symlink or FIFO too, so that whoever reads it gets a
        refusal that names it — but a symlinked directory is never descended. Hidden names (``.uploads``) are not
        objects."""
        head, _, start = prefix.rpartition("/")
        parts = head.split("/") if head else []
        if any(not part or part.startswith(".") for part in parts):
            return []
        dfd = self._open_dir(parts, f"listing {prefix!r}")
        if dfd is None:
            return []
        keys: list[str] = []
        _scan(dfd, f"{head}/" if head else "", start, keys)
        return sorted(keys)

    def delete(self, key: str) -> None:
        parts = check_key(key).split("/")
        dfd = self._open_dir(parts[:-1], f"deleting {key!r}")
        if dfd is None:
            return
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(parts[-1], dir_fd=dfd)  # removes a link itself, never its target
        finally:
            os.close(dfd)

    # --- uploads -----------------------------------------------------------------------------------------------
    def _uploads_dir(self, *, create: bool = False) -> int | None:
        return self._open_dir([_UPLOADS], "the uploads directory", create=create)

    def _open_upload(self, key: str, upload_id: str, flags: int) -> int:
        self._upload_path(key, upload_id)  # checks the id
        dfd = self._uploads_dir()
        try:
            if dfd is None:
                raise FileNotFoundError
            return os.open(upload_id, flags | _FILE_FLAGS, dir_fd=dfd)
        except FileNotFoundError:
            raise StoreError(f"upload {upload_id} of {key!r} does not exist (aborted or completed?)") from None
        except OSError as exc:
            raise StoreError(f"cannot open upload {upload_id} of {key!r} in {self.root}: {exc.strerror}") from None
        finally:
            if dfd is not None:
                os.close(dfd)

    def begin_upload(self, key: str, size: int) -> str:
        check_key(key)
        if size < 0:
            raise StoreError(f"upload of {key!r} needs a non-negative size, got {size}")
        upload_id = uuid.uuid4().hex + _key_tag(key)
        dfd = self._uploads_dir(create=True)
        assert dfd is not None
        try:
            fd = os.open(upload_id, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _FILE_FLAGS, 0o644, dir_fd=dfd)
        finally:
            os.close(dfd)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        return upload_id

    def write_at(self, key: str, upload_id: str, offset: int, data: BytesLike) -> None:
        view = as_bytes(data)
        fd = self._open_upload(key, upload_id, os.O_WRONLY)
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

    def writer(self, key: str, upload_id: str, offset: int) -> SequentialWriter:
        """A writer from ``offset``; with ``fsync``, closing it writes its own byte range back to the disk and waits
        (``sync_file_range``), so M functions flush their ranges in parallel and the commit's ``fsync`` finds little
        left to do (``sync_ranges=False``: the commit's fsync writes everything). Durability is still the commit's: the
        object is fsynced before it becomes visible."""
        if self.fsync and self.sync_ranges:
            return _RangeSyncingWriter(self, key, upload_id, offset)
        return SequentialWriter(self, key, upload_id, offset)

    def sync_range(self, key: str, upload_id: str, offset: int, nbytes: int) -> None:
        """Write bytes ``[offset, offset + nbytes)`` of an upload back to the disk and wait (Linux; elsewhere a
        no-op: the commit's fsync covers them)."""
        if nbytes <= 0 or _SYNC_FILE_RANGE is None:
            return
        fd = self._open_upload(key, upload_id, os.O_WRONLY)
        try:
            _SYNC_FILE_RANGE(fd, offset, nbytes)
        finally:
            os.close(fd)

    def complete_upload(self, key: str, upload_id: str) -> None:
        fd = self._open_upload(key, upload_id, os.O_RDONLY)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise StoreError(f"upload {upload_id} of {key!r} is not a regular file")
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        parts = key.split("/")
        dst = self._open_dir(parts[:-1], f"publishing {key!r}", create=True)
        src = self._uploads_dir()
        assert dst is not None
        try:
            if src is None:
                raise StoreError(f"upload {upload_id} of {key!r} does not exist (aborted or completed?)")
            os.replace(upload_id, parts[-1], src_dir_fd=src, dst_dir_fd=dst)
        finally:
            os.close(dst)
            if src is not None:
                os.close(src)
        self.io.puts += 1

    def abort_upload(self, key: str, upload_id: str) -> None:
        self._upload_path(key, upload_id)  # checks the id
        dfd = self._uploads_dir()
        if dfd is None:
            return
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(upload_id, dir_fd=dfd)
        finally:
            os.close(dfd)

    def stale_uploads(self, older_than_s: float = STALE_UPLOAD_S, key: str | None = None) -> builtins.list[StaleUpload]:
        """Files under ``.uploads/`` not modified for ``older_than_s`` seconds (every ``write_at`` touches one)."""
        dfd = self._uploads_dir()
        if dfd is None:
            return []
        now, found = time.time(), []
        try:
            with os.scandir(dfd) as entries:
                for entry in entries:
                    if key is not None and not entry.name.endswith(_key_tag(key)):
                        continue
                    st = entry.stat(follow_symlinks=False)
                    if now - st.st_mtime >= older_than_s:
                        found.append(StaleUpload(entry.name, key, now - st.st_mtime, st.st_size, st.st_mtime))
        finally:
            os.close(dfd)
        return sorted(found, key=lambda u: u.upload_id)

    def remove_stale(self, upload: StaleUpload) -> bool:
        dfd = self._uploads_dir()
        if dfd is None:
            return False
        try:
            try:
                if os.lstat(upload.upload_id, dir_fd=dfd).st_mtime > upload.last_write:
                    return False  # written since it was listed: live after all
                os.unlink(upload.upload_id, dir_fd=dfd)
            except FileNotFoundError:
                return False
        finally:
            os.close(dfd)
        return True

    def spec(self) -> dict[str, Any]:
        return {"kind": "local", "root": str(self.root), "fsync": self.fsync, "sync_ranges": self.sync_ranges}
