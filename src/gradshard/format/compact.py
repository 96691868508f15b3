"""Compact updates: a client that trained a subnetwork uploads only its covered elements (SuperFed).

A compact update is a safetensors file with one 1-D tensor, ``compact``, in the round's (supernet) layout dtype:
the ``K`` elements the client's coverage names, in flat layout order (``K = CoverageMap.covered_elems``). Its
metadata is an update's (:class:`~gradshard.format.update.UpdateMeta`) with ``gradshard.coverage`` (required) and
``gradshard.compact = "1"``; the layout digest is the supernet's (the round's), and the header digest covers the
whole header as for any format-2 update.

Chunk digests follow the round's chunk grid over the *supernet*: one digest per supernet chunk ``i``, over the
compact elements ``[c(lo_i), c(hi_i))`` where ``c(j) = CoverageMap.covered_before(j)`` is the number of covered
elements before supernet element ``j``. A chunk with nothing covered has the digest of zero bytes (the list keeps
one fixed-width digest per chunk, so signing and indexing stay as for full-size updates; validation checks these).
A shard ``[a, b)`` on the chunk grid therefore reads exactly the compact bytes ``[c(a), c(b))`` and verifies
each of its chunks: ``(covered elements in the shard) × itemsize`` bytes, no rounding to chunks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from gradshard.core import checksum, digests
from gradshard.core.coverage import CoverageMap
from gradshard.core.layout import ModelLayout, TensorSpec
from gradshard.errors import GradshardError, InvocationError, UnsafeObjectError, UpdateError
from gradshard.format.masked import SECAGG, MaskedReader
from gradshard.format.quantized import INT8, QuantizedReader
from gradshard.format.sparse import TOPK, SparseReader
from gradshard.format.update import (
    MAX_HEADER_BYTES,
    SIGNATURE_HEX,
    UpdateHeader,
    UpdateMeta,
    UpdateReader,
    Validated,
    VerifiedObject,
    check_layout,
    read_header,
)
from gradshard.format.writer import encode_header, publish_header, signing_meta
from gradshard.store import ObjectReader, Store
from gradshard.store.base import as_bytes

if TYPE_CHECKING:
    from gradshard.security.keys import PrivateKey

COMPACT_TENSOR = "compact"
_WRITE_PIECE_BYTES = 64 << 20
_SLICE_RUNS = 32  # up to this many runs a window is scattered in place, slice by slice


def _coverage_map(layout: ModelLayout, coverage: CoverageMap | Mapping[str, Sequence[int]]) -> CoverageMap:
    return coverage if isinstance(coverage, CoverageMap) else CoverageMap(layout, coverage)


def file_layout(layout: ModelLayout, coverage: CoverageMap) -> ModelLayout:
    """The layout of the compact file itself: one 1-D tensor of the covered count, in the round's dtype."""
    return ModelLayout([TensorSpec(COMPACT_TENSOR, (coverage.covered_elems,), layout.flat_dtype)])


# --- test and client helpers ---------------------------------------------------------------------------------------
def compact_of(layout: ModelLayout, coverage: CoverageMap | Mapping[str, Sequence[int]],
               dense_flat: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """The covered elements of a full-size flat vector, in layout order (what a compact update holds).

    Builds the coverage mask of the whole vector: a helper for tests and small models, not for shard functions."""
    cov = _coverage_map(layout, coverage)
    if dense_flat.shape != (layout.numel,):
        raise GradshardError(f"flat vector has shape {dense_flat.shape}, layout needs ({layout.numel},)")
    return np.ascontiguousarray(dense_flat[cov.mask(0, layout.numel, np.empty(layout.numel, dtype=np.bool_))])


def dense_of(layout: ModelLayout, coverage: CoverageMap | Mapping[str, Sequence[int]], compact: npt.NDArray[Any],
             fill: float | npt.NDArray[Any] = 0.0) -> npt.NDArray[Any]:
    """The inverse of :func:`compact_of`: a full-size vector with ``compact`` at the covered elements and ``fill``
    (a scalar or a full-size vector) elsewhere."""
    cov = _coverage_map(layout, coverage)
    if compact.shape != (cov.covered_elems,):
        raise GradshardError(f"compact vector has shape {compact.shape}, the coverage holds {cov.covered_elems}")
    out = np.empty(layout.numel, dtype=layout.flat_dtype)
    out[:] = fill
    out[cov.mask(0, layout.numel, np.empty(layout.numel, dtype=np.bool_))] = compact
    return out


# --- chunk digests in compact coordinates ------------------------------------------------------------------------
class CompactChunkStream:
    """Digests of the supernet chunks from chunk boundary ``start`` on, fed the compact elements in order.

    Chunk ``i`` holds compact elements ``[c(lo_i), c(hi_i))``; ``feed`` returns ``(chunk index, digest)`` of every
    chunk its piece completed, empty chunks (nothing covered) included as soon as the stream reaches them."""

    def __init__(self, grid: checksum.ChunkGrid, coverage: CoverageMap, start: int, algorithm: str) -> None:
        if start % grid.chunk_elems and start != grid.numel:
            raise GradshardError(f"a chunk stream must start on a chunk boundary, got element {start}")
        self.grid, self.coverage = grid, coverage
        self.algorithm = digests.algorithm(algorithm)
        self.index = start // grid.chunk_elems
        self.pos = coverage.covered_before(start)  # compact offset of the next element
        self._stop = self._compact_stop(self.index)
        self._hasher: digests.Hasher | None = None

    def _compact_stop(self, index: int) -> int:
        return self.coverage.covered_before(self.grid.bounds(index)[1]) if index < self.grid.count else -1

    def feed(self, values: npt.NDArray[Any]) -> list[tuple[int, str]]:
        done: list[tuple[int, str]] = []
        data, item, n, off = digests.byte_view(values), values.dtype.itemsize, len(values), 0
        while True:
            while self.index < self.grid.count and self.pos == self._stop:  # complete (or empty) chunks
                hasher = self._hasher or self.algorithm.new()
                done.append((self.index, hasher.hexdigest()))
                self._hasher = None
                self.index += 1
                self._stop = self._compact_stop(self.index)
            if off == n:
                return done
            if self.index >= self.grid.count:
                raise GradshardError(f"{n - off} compact elements more than the coverage holds")
            take = min(n - off, self._stop - self.pos)
            if self._hasher is None:
                self._hasher = self.algorithm.new()
            self._hasher.update(data[off * item : (off + take) * item])
            off += take
            self.pos += take


def empty_chunk_problem(grid: checksum.ChunkGrid, coverage: CoverageMap, meta: UpdateMeta) -> str | None:
    """Why the stored digests of the chunks with nothing covered are wrong (each must be the digest of zero bytes),
    or None. Header only: ``O(chunks · ndim)``."""
    empty = digests.algorithm(meta.digest).new().hexdigest()
    width = meta.hex_width
    before = 0
    for index in range(grid.count):
        after = coverage.covered_before(grid.bounds(index)[1])
        if after == before and meta.checksums[index * width : (index + 1) * width] != empty:
            return f"chunk {index} holds no covered element but its digest is not that of zero bytes"
        before = after
    return None


# --- writing -----------------------------------------------------------------------------------------------------
class CompactWriter:
    """Streams the compact vector of one client into a new object and publishes it on :meth:`commit`.

    ``layout`` is the round's (supernet) layout, ``coverage`` the client's subnetwork; ``meta`` is the update's
    metadata for the round (its ``layout_digest`` the supernet's); its coverage and compact marker are set here.
    Use as a context manager: leaving it by an exception, or without commit, aborts the upload."""

    def __init__(self, store: Store, key: str, layout: ModelLayout,
                 coverage: CoverageMap | Mapping[str, Sequence[int]], meta: UpdateMeta,
                 signer: PrivateKey | None = None) -> None:
        cov = _coverage_map(layout, coverage)
        if meta.layout_digest != layout.digest():
            raise GradshardError(f"compact update {key!r}: its metadata's layout digest is not the layout's (give "
                                 "the round's supernet layout and its digest)")
        meta = dataclasses.replace(meta, coverage=dict(cov.extents), compact=True, checksums="")
        self.meta = signing_meta(key, meta, signer)
        self.store, self.key, self.layout, self.coverage, self.signer = store, key, layout, cov, signer
        self.file = file_layout(layout, cov)
        self.dtype = np.dtype(layout.flat_dtype)
        self.grid = checksum.ChunkGrid(layout.numel, meta.chunk_elems)
        placeholder = self.meta.with_checksums(["0" * meta.hex_width] * self.grid.count)
        self.header_len = len(encode_header(self.file, placeholder.to_metadata(),
                                            (lambda _: "0" * SIGNATURE_HEX) if self.meta.signer else None))
        if self.header_len - 8 > MAX_HEADER_BYTES:
            raise GradshardError(f"the header of {key!r} would be {self.header_len - 8:,} bytes, over the "
                                 f"{MAX_HEADER_BYTES:,} readers accept; use larger chunks")
        self.upload_id = store.begin_upload(key, self.header_len + self.file.nbytes)
        self.state = "open"
        self.pos = 0
        self._chunks = CompactChunkStream(self.grid, cov, 0, meta.digest)
        self._digests: dict[int, str] = {}
        self._out = store.writer(key, self.upload_id, self.header_len)

    def write(self, values: npt.NDArray[Any]) -> None:
        """Append the next ``len(values)`` compact elements (1-D, the layout's dtype)."""
        if values.ndim != 1 or values.dtype != self.dtype:
            raise GradshardError(f"expected a 1-D {self.dtype} array, got {values.ndim}-D {values.dtype}")
        if self.pos + len(values) > self.coverage.covered_elems:
            raise GradshardError(f"writing {len(values)} more elements overflows the {self.coverage.covered_elems} "
                                 "the coverage holds")
        piece = max(1, _WRITE_PIECE_BYTES // self.dtype.itemsize)
        for lo in range(0, len(values), piece):
            part = np.ascontiguousarray(values[lo : lo + piece])
            self._out.write(part)
            self._digests.update(self._chunks.feed(part))
        self.pos += len(values)

    def commit(self) -> UpdateMeta:
        """Write the header with every chunk's digest and publish; returns the metadata with its digests."""
        if self.state != "open":
            raise GradshardError(f"upload of {self.key!r} is {self.state}; begin a new one")
        if self.pos != self.coverage.covered_elems:
            raise GradshardError(f"compact update {self.key!r} got {self.pos} of {self.coverage.covered_elems} "
                                 "covered elements")
        self._digests.update(self._chunks.feed(np.empty(0, dtype=self.dtype)))  # trailing empty chunks
        self._out.close()
        if len(self._digests) != self.grid.count:
            raise InvocationError(f"cannot commit {self.key!r}: {len(self._digests)} of {self.grid.count} chunk "
                                  "digests")
        meta = self.meta.with_checksums([self._digests[i] for i in range(self.grid.count)])
        published = publish_header(self.store, self.key, self.upload_id, self.file, meta, self.header_len,
                                   self.signer)
        self.state = "committed"
        return published

    def abort(self) -> None:
        if self.state == "open":
            self.state = "aborted"
            self.store.abort_upload(self.key, self.upload_id)

    def __enter__(self) -> CompactWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


def write_compact_update(store: Store, key: str, layout: ModelLayout,
                         coverage: CoverageMap | Mapping[str, Sequence[int]], compact_values: npt.NDArray[Any],
                         meta: UpdateMeta, *, signer: PrivateKey | None = None) -> UpdateMeta:
    """Write a client's compact update (its covered elements in layout order) atomically; returns ``meta`` with
    the coverage, the compact marker and the chunk digests (and, with ``signer``, the signature)."""
    with CompactWriter(store, key, layout, coverage, meta, signer) as writer:
        if compact_values.shape != (writer.coverage.covered_elems,):
            raise GradshardError(f"compact vector has shape {compact_values.shape}, the coverage holds "
                                 f"{writer.coverage.covered_elems} elements")
        writer.write(compact_values)
        return writer.commit()


# --- reading -----------------------------------------------------------------------------------------------------
class CompactReader(VerifiedObject):
    """Verified reads of one validated compact update, in supernet (layout) element coordinates.

    Offers what the aggregation reads through (``client``, ``meta``, ``grid``, ``sha256``, ``header_digest``,
    :meth:`stream`, :meth:`read_verified`) so functions treat it like an :class:`UpdateReader`."""

    def __init__(self, reader: ObjectReader, header: UpdateHeader, layout: ModelLayout, meta: UpdateMeta) -> None:
        client = meta.client
        assert meta.coverage is not None  # UpdateMeta refuses a compact update without one
        try:
            self.coverage = CoverageMap(layout, meta.coverage)
        except GradshardError as exc:
            raise UpdateError(client, f"bad coverage: {exc}") from None
        super().__init__(reader, header, layout, meta)
        names = sorted(n for n in header.tensors)
        if names != [COMPACT_TENSOR]:
            raise UpdateError(client, f"a compact update holds exactly one tensor {COMPACT_TENSOR!r}, got "
                                      f"{names[:5]}")
        entry = header.tensors[COMPACT_TENSOR]
        if entry.dtype != layout.flat_dtype:
            raise UpdateError(client, f"wrong dtype: tensor {COMPACT_TENSOR!r} is {entry.dtype}, the round expects "
                                      f"{layout.flat_dtype}")
        if entry.shape != (self.coverage.covered_elems,):
            raise UpdateError(client, f"wrong length: tensor {COMPACT_TENSOR!r} has shape {list(entry.shape)}, its "
                                      f"coverage holds {self.coverage.covered_elems} elements")
        self.data_start = header.data_start + entry.begin  # byte offset of compact element 0

    def stream(self, start: int, stop: int) -> CompactStream:
        """Sequential verified reads of the compact elements of supernet range ``[start, stop)`` (chunk-aligned)."""
        if not self.grid.is_aligned(start, stop):
            raise GradshardError(f"verified reads must be chunk-aligned, got [{start}, {stop})")
        return CompactStream(self, start, stop)

    def read_verified(self, start: int, stop: int, out: npt.NDArray[Any]) -> None:
        """Fill the covered elements of chunk-aligned ``[start, stop)`` in ``out`` (length ``stop - start``), every
        chunk verified; the uncovered elements of ``out`` are left as they were."""
        stream = self.stream(start, stop)
        k = stream.remaining
        stream.read_next(out[:k])
        scatter(self.coverage, start, stop, out, k, self.coverage.mask(start, stop, np.empty(stop - start, bool)))

    def check_empty_chunks(self) -> None:
        """Validation (header only): every chunk with nothing covered must carry the digest of zero bytes."""
        problem = empty_chunk_problem(self.grid, self.coverage, self.meta)
        if problem is not None:
            raise UpdateError(self.client, f"compact update: {problem}")


class CompactStream:
    """Reads the compact elements of a chunk-aligned supernet range front to back (one announced byte range: one
    ranged request on S3); each chunk's digest is checked as soon as its last element is read."""

    def __init__(self, update: CompactReader, start: int, stop: int) -> None:
        self.update = update
        self._chunks = CompactChunkStream(update.grid, update.coverage, start, update.meta.digest)
        self.pos, self.stop = self._chunks.pos, update.coverage.covered_before(stop)
        size = update.dtype.itemsize
        if self.stop > self.pos:
            update.reader.expect(update.data_start + self.pos * size, update.data_start + self.stop * size)

    @property
    def remaining(self) -> int:
        return self.stop - self.pos

    def read_next(self, out: npt.NDArray[Any]) -> None:
        """Fill ``out`` with the next ``len(out)`` compact elements and check the chunks they complete."""
        if self.pos + len(out) > self.stop:
            raise GradshardError(f"read past the end of the compact stream at element {self.stop}")
        if len(out):
            size = self.update.dtype.itemsize
            self.update.reader.read_into(self.update.data_start + self.pos * size, as_bytes(out))
        self.pos += len(out)
        for index, digest in self._chunks.feed(out):
            if digest != self.update.checksum_of(index):
                a, b = self.update.grid.bounds(index)
                raise UpdateError(self.update.client, f"checksum mismatch in chunk {index} (elements [{a}, {b})): "
                                                      "the object is corrupted")


def scatter(coverage: CoverageMap, a: int, b: int, out: npt.NDArray[Any], k: int,
            mask: npt.NDArray[np.bool_] | None = None) -> None:
    """Move the ``k`` compact values at the front of ``out`` to their covered places in window ``[a, b)``.

    In place for a few runs (the i-th covered element sits at or after i, so runs move right, the last first);
    with many runs, by ``mask`` (the window's coverage mask) and one transient copy of the ``k`` values."""
    lo, hi = coverage.runs(a, b)
    if mask is not None and len(lo) > _SLICE_RUNS:
        out[: b - a][mask] = out[:k].copy()
        return
    src = k
    for r in range(len(lo) - 1, -1, -1):
        n = int(hi[r] - lo[r])
        src -= n
        dst = int(lo[r]) - a
        if dst != src:
            out[dst : dst + n] = out[src : src + n]  # numpy copies overlapping slices correctly
    if src != 0:
        raise GradshardError(f"{k} compact values do not fill the covered runs of [{a}, {b})")


# --- opening any client update -------------------------------------------------------------------------------------
#: What a client's update opens as: full-size, compact (its covered elements), block-wise int8 or top-k.
ClientReader = UpdateReader | CompactReader | QuantizedReader | SparseReader | MaskedReader


def open_client_update(store: Store, key: str, client: str, layout: ModelLayout,
                       trusted_sha256: str | None = None, *, trusted: Validated | None = None
                       ) -> ClientReader:
    """Open a client's update, full-size or compact, validated against the round's ``layout``; errors name
    ``client``. Without ``trusted_sha256`` (validation) a compact update's empty-chunk digests are checked too.
    ``trusted`` (a full-size update's validated size and byte runs, with ``trusted_sha256``) skips re-parsing its
    tensor entries."""
    try:
        reader = store.open_reader(key)
    except UnsafeObjectError as exc:
        raise UpdateError(client, str(exc)) from None
    try:
        fast = trusted if trusted_sha256 is not None else None
        header = read_header(reader, key, client, trusted_sha256,
                             trusted_size=fast.size if fast is not None else None, layout=layout)
        meta = UpdateMeta.from_metadata(client, header.metadata)
        if meta.encoding:
            if fast is not None:  # the manifest recorded a float update: these bytes cannot be it
                raise UpdateError(client, f"object changed since the round was validated (now an {meta.encoding} "
                                          "update)")
            kinds: dict[str, type[QuantizedReader | SparseReader | MaskedReader]] = {
                INT8: QuantizedReader, TOPK: SparseReader, SECAGG: MaskedReader}
            return kinds[meta.encoding](reader, header, layout, meta)
        if meta.compact:
            if fast is not None:  # the manifest recorded a full-size update: these bytes cannot be it
                raise UpdateError(client, "object changed since the round was validated (now a compact update)")
            compact = CompactReader(reader, header, layout, meta)
            if trusted_sha256 is None:
                compact.check_empty_chunks()
            return compact
        if fast is not None:
            return UpdateReader(reader, header, layout, meta, fast.runs)
        check_layout(client, header, layout)
        return UpdateReader(reader, header, layout, meta)
    except BaseException:
        reader.close()
        raise
