"""The update object: one safetensors file per client per round.

Layout on the wire (plain safetensors, readable by the ``safetensors`` library)::

    u64 header length | JSON header (tensors + "__metadata__") | data: tensors in layout order

Because the tensors are written in the layout's order with one dtype, the data section *is* the flat update
vector, and any element range is one byte range. Files written by the plain safetensors library (which orders
tensors its own way) are accepted too: the reader maps a flat range to the byte ranges of the tensors it touches.

Metadata (all strings, keys prefixed ``gradshard.``): ``client``, ``round``, ``examples``, ``base_model``,
``layout`` (digest of the aggregated layout), ``chunk_elems`` and ``checksums`` (xxh3-64 of every chunk of the
flat vector, 16 hex digits each, concatenated). :func:`update_metadata` computes them for any writer.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from gradshard.core import checksum
from gradshard.core.layout import ModelLayout, TensorSpec, numpy_dtype, safetensors_dtype
from gradshard.errors import GradshardError, StoreError, UpdateError
from gradshard.format.keys import check_client_id
from gradshard.store import ObjectReader, Store
from gradshard.store.base import as_bytes

FORMAT_VERSION = "1"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
_WRITE_PIECE = 64 * 1024 * 1024
_P = "gradshard."


@dataclass(frozen=True)
class UpdateMeta:
    """What an update says about itself."""

    client: str
    round: int
    examples: int
    layout_digest: str
    chunk_elems: int
    checksums: str = ""
    base_model: str = ""
    kind: str = "update"
    extra: Mapping[str, str] = field(default_factory=dict)

    def with_checksums(self, hexes: list[str]) -> UpdateMeta:
        return dataclasses.replace(self, checksums=checksum.pack(hexes))

    def to_metadata(self) -> dict[str, str]:
        md = {f"{_P}format": FORMAT_VERSION, f"{_P}kind": self.kind, f"{_P}client": self.client,
              f"{_P}round": str(self.round), f"{_P}examples": str(self.examples),
              f"{_P}base_model": self.base_model, f"{_P}layout": self.layout_digest,
              f"{_P}checksum": checksum.ALGORITHM, f"{_P}chunk_elems": str(self.chunk_elems),
              f"{_P}checksums": self.checksums}
        md.update({f"{_P}x.{k}": v for k, v in self.extra.items()})
        return md

    @classmethod
    def from_metadata(cls, client: str, md: Mapping[str, str]) -> UpdateMeta:
        """Parse and validate; errors name ``client`` (the client the object is filed under)."""

        def need(name: str) -> str:
            value = md.get(_P + name)
            if value is None:
                raise UpdateError(client, f"metadata field '{_P}{name}' is missing")
            return value

        def positive_int(name: str, minimum: int) -> int:
            raw = need(name)
            try:
                value = int(raw)
            except ValueError:
                raise UpdateError(client, f"metadata field '{_P}{name}' is not an integer: {raw!r}") from None
            if value < minimum:
                raise UpdateError(client, f"metadata field '{_P}{name}' must be >= {minimum}, got {value}")
            return value

        if need("format") != FORMAT_VERSION:
            raise UpdateError(client, f"unsupported update format {md[_P + 'format']!r} (expected {FORMAT_VERSION})")
        if need("checksum") != checksum.ALGORITHM:
            raise UpdateError(client, f"unsupported checksum {md[_P + 'checksum']!r} (expected {checksum.ALGORITHM})")
        extra = {k.removeprefix(_P + "x."): v for k, v in md.items() if k.startswith(_P + "x.")}
        return cls(client=need("client"), round=positive_int("round", 0), examples=positive_int("examples", 1),
                   layout_digest=need("layout"), chunk_elems=positive_int("chunk_elems", 1),
                   checksums=need("checksums"), base_model=need("base_model"), kind=need("kind"), extra=extra)


# --- writing -----------------------------------------------------------------------------------------------------
def encode_header(layout: ModelLayout, metadata: Mapping[str, str]) -> bytes:
    """The 8-byte length and the space-padded JSON header of a safetensors object in layout order."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for spec in layout:
        header[spec.name] = {"dtype": safetensors_dtype(spec.dtype), "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors pads the header with spaces to 8-byte alignment
    return struct.pack("<Q", len(blob)) + blob


class UpdateWriter:
    """Streams a flat vector into a new object and makes it visible atomically on :meth:`commit`.

    The header (with every chunk's checksum) is written last, at offset 0, so a 10 GB update is written in one
    pass with constant memory. Use as a context manager: leaving it by an exception aborts the upload.
    """

    def __init__(self, store: Store, key: str, layout: ModelLayout, meta: UpdateMeta) -> None:
        self.store, self.key, self.layout, self.meta = store, key, layout, meta
        self.dtype = np.dtype(layout.flat_dtype)
        self.grid = checksum.ChunkGrid(layout.numel, meta.chunk_elems)
        self._header_len = len(encode_header(layout, meta.with_checksums(["0" * checksum.HEX_WIDTH] * self.grid.count)
                                             .to_metadata()))
        self.upload_id = store.begin_upload(key, self._header_len + layout.nbytes)
        self._out = store.writer(key, self.upload_id, self._header_len)
        self._written = 0  # elements
        self._hashes: list[str] = []
        self._stream = checksum.ChunkStream(self.grid, 0)
        self._done = False

    def write(self, values: npt.NDArray[Any]) -> None:
        """Append the next ``len(values)`` elements of the flat vector."""
        if values.dtype != self.dtype or values.ndim != 1:
            raise GradshardError(f"expected a 1-D {self.dtype} array, got {values.ndim}-D {values.dtype}")
        if self._written + len(values) > self.layout.numel:
            raise GradshardError(f"writing {len(values)} more elements overflows the layout's {self.layout.numel}")
        step = _WRITE_PIECE // self.dtype.itemsize
        for lo in range(0, len(values), step):
            piece = values[lo : lo + step]
            self._out.write(piece)
            self._hashes.extend(h for _, h in self._stream.feed(piece))
        self._written += len(values)

    def commit(self) -> UpdateMeta:
        """Write the header and publish the object; returns the metadata with its checksums."""
        if self._written != self.layout.numel:
            raise GradshardError(f"update {self.key!r} got {self._written} of {self.layout.numel} elements")
        self._out.close()
        meta = self.meta.with_checksums(self._hashes)
        header = encode_header(self.layout, meta.to_metadata())
        assert len(header) == self._header_len, "checksums are fixed-width, so the header length cannot change"
        self.store.write_at(self.key, self.upload_id, 0, header)
        self.store.complete_upload(self.key, self.upload_id)
        self._done = True
        return meta

    def abort(self) -> None:
        if not self._done:
            self.store.abort_upload(self.key, self.upload_id)
            self._done = True

    def __enter__(self) -> UpdateWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None or not self._done:
            self.abort()


def write_update(store: Store, key: str, layout: ModelLayout, flat: npt.NDArray[Any], meta: UpdateMeta) -> UpdateMeta:
    """Write a whole flat vector as an update object (atomically). ``meta.checksums`` is filled in."""
    if flat.shape != (layout.numel,):
        raise GradshardError(f"flat vector has shape {flat.shape}, layout needs ({layout.numel},)")
    with UpdateWriter(store, key, layout, meta) as writer:
        writer.write(np.ascontiguousarray(flat))
        return writer.commit()


def update_metadata(layout: ModelLayout, flat: npt.NDArray[Any], *, client: str, round: int, examples: int,
                    base_model: str = "", chunk_elems: int | None = None) -> dict[str, str]:
    """Metadata for an update written by any tool (e.g. ``safetensors.numpy.save_file(..., metadata=...)``)."""
    if flat.shape != (layout.numel,):
        raise GradshardError(f"flat vector has shape {flat.shape}, layout needs ({layout.numel},)")
    chunk = chunk_elems or checksum.default_chunk_elems(layout.numel)
    grid = checksum.ChunkGrid(layout.numel, chunk)
    data = np.ascontiguousarray(flat, dtype=layout.flat_dtype)
    hexes = [checksum.checksum(data[a:b]) for a, b in (grid.bounds(i) for i in range(grid.count))]
    meta = UpdateMeta(client=check_client_id(client), round=round, examples=examples,
                      layout_digest=layout.digest(), chunk_elems=chunk, checksums=checksum.pack(hexes),
                      base_model=base_model)
    return meta.to_metadata()


# --- reading -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # byte offset inside the data section
    end: int


@dataclass(frozen=True)
class UpdateHeader:
    """A parsed, structurally valid safetensors header and where the data section starts."""

    key: str
    data_start: int
    object_size: int
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    sha256: str  # of the raw header bytes: identifies the object version


def _parse_tensors(client: str, header: dict[str, Any]) -> dict[str, TensorEntry]:
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = numpy_dtype(info["dtype"])
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError, GradshardError) as exc:
            raise UpdateError(client, f"header entry for tensor {name!r} is malformed: {exc}") from None
        if any(d < 0 for d in shape) or end - begin != math.prod(shape) * np.dtype(dtype).itemsize:
            raise UpdateError(client, f"tensor {name!r}: data_offsets [{begin}, {end}) do not fit shape {shape}")
        entries[name] = TensorEntry(dtype, shape, begin, end)
    covered = 0
    for entry in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if entry.begin != covered:
            raise UpdateError(client, f"header data offsets leave a gap or overlap at byte {covered}")
        covered = entry.end
    return entries


def read_header(reader: ObjectReader, key: str, client: str) -> UpdateHeader:
    """Read and structurally validate the header of the object ``key`` (filed for ``client``)."""
    if reader.size < 8:
        raise UpdateError(client, f"object {key!r} is truncated: {reader.size} bytes, too short for a header")
    prefix = bytearray(8)
    reader.read_into(0, memoryview(prefix))
    (n,) = struct.unpack("<Q", prefix)
    if n > MAX_HEADER_BYTES or 8 + n > reader.size:
        raise UpdateError(client, f"object {key!r} is truncated or not safetensors: header length {n} "
                                  f"but the object has {reader.size} bytes")
    raw = bytearray(n)
    reader.read_into(8, memoryview(raw))
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UpdateError(client, f"object {key!r} has a header that is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise UpdateError(client, f"object {key!r} has a header that is not a JSON object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UpdateError(client, "header '__metadata__' must map strings to strings")
    tensors = _parse_tensors(client, header)
    data_len = max((e.end for e in tensors.values()), default=0)
    expected = 8 + n + data_len
    if reader.size < expected:
        raise UpdateError(client, f"object {key!r} is truncated: {reader.size} bytes, header promises {expected}")
    if reader.size > expected:
        raise UpdateError(client, f"object {key!r} has {reader.size - expected} unexpected trailing bytes")
    return UpdateHeader(key, 8 + n, reader.size, tensors, metadata, hashlib.sha256(raw).hexdigest())


def check_layout(client: str, header: UpdateHeader, layout: ModelLayout) -> None:
    """Raise :class:`UpdateError` naming the first tensor that differs from the round's layout."""
    missing = [t.name for t in layout if t.name not in header.tensors]
    extra = sorted(set(header.tensors) - {t.name for t in layout})
    if missing or extra:
        raise UpdateError(client, f"wrong layout: missing tensors {missing[:5]}, unexpected tensors {extra[:5]}")
    for spec in layout:
        entry = header.tensors[spec.name]
        if entry.dtype != spec.dtype:
            raise UpdateError(client, f"wrong dtype: tensor {spec.name!r} is {entry.dtype}, the round expects "
                                      f"{spec.dtype}")
        if entry.shape != spec.shape:
            raise UpdateError(client, f"wrong layout: tensor {spec.name!r} has shape {entry.shape}, the round "
                                      f"expects {spec.shape}")


class UpdateReader:
    """Ranged, checksum-verified reads of one validated update, in flat (layout) element coordinates."""

    def __init__(self, reader: ObjectReader, header: UpdateHeader, layout: ModelLayout, meta: UpdateMeta) -> None:
        # Keep only what reads need — never the parsed header (one dict per tensor): a shard function holds one
        # reader per client, and its memory must not grow with N times the number of tensors.
        self.client = meta.client
        self.reader, self.layout, self.meta = reader, layout, meta
        self.sha256, self.object_size = header.sha256, header.object_size
        self.dtype = np.dtype(layout.flat_dtype)
        self.grid = checksum.ChunkGrid(layout.numel, meta.chunk_elems)
        if len(meta.checksums) != self.grid.count * checksum.HEX_WIDTH:
            raise UpdateError(self.client, f"checksums do not match the layout: {self.grid.count} chunks need "
                                           f"{self.grid.count * checksum.HEX_WIDTH} hex digits, got "
                                           f"{len(meta.checksums)}")
        # byte runs: (flat start element, flat stop element, file offset); merged when the file is in layout order
        runs: list[list[int]] = []
        for slot in layout.slots:
            offset = header.data_start + header.tensors[slot.spec.name].begin
            if runs and runs[-1][1] == slot.start and runs[-1][2] + (slot.start - runs[-1][0]) * self.dtype.itemsize \
                    == offset:
                runs[-1][1] = slot.stop
            elif slot.stop > slot.start:
                runs.append([slot.start, slot.stop, offset])
        self._runs = runs
        self._run_starts = [r[0] for r in runs]

    @property
    def contiguous(self) -> bool:
        """True when the data section is the flat vector in layout order (one byte range per element range)."""
        return len(self._runs) <= 1

    def read(self, start: int, stop: int, out: npt.NDArray[Any]) -> None:
        """Fill ``out`` (length ``stop - start``) with elements ``[start, stop)``; no checksum check."""
        view = as_bytes(out)
        size = self.dtype.itemsize
        try:
            for i in range(max(0, bisect.bisect_right(self._run_starts, start) - 1), len(self._runs)):
                lo, hi, offset = self._runs[i]
                if lo >= stop:
                    break
                a, b = max(start, lo), min(stop, hi)
                if a < b:
                    self.reader.read_into(offset + (a - lo) * size, view[(a - start) * size : (b - start) * size])
        except StoreError as exc:
            raise UpdateError(self.client, f"read failed: {exc}") from exc

    def checksum_of(self, index: int) -> str:
        """The stored checksum of chunk ``index`` (sliced from the packed metadata string)."""
        return self.meta.checksums[index * checksum.HEX_WIDTH : (index + 1) * checksum.HEX_WIDTH]

    def stream(self, start: int, stop: int) -> VerifiedStream:
        """Sequential reads of ``[start, stop)`` (chunk-aligned), each chunk's checksum checked when complete."""
        if not self.grid.is_aligned(start, stop):
            raise GradshardError(f"verified reads must be chunk-aligned, got [{start}, {stop})")
        return VerifiedStream(self, start, stop)

    def read_verified(self, start: int, stop: int, out: npt.NDArray[Any]) -> None:
        """:meth:`read` a chunk-aligned range and check every chunk's checksum."""
        self.stream(start, stop).read_next(out)

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> UpdateReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VerifiedStream:
    """Reads a chunk-aligned range window by window; a chunk's checksum is checked as soon as it is complete.

    A corrupted chunk raises :class:`UpdateError` at the window that completes it, after earlier windows of that
    chunk were already used: callers must treat their output as void on error (the aggregation driver aborts the
    output upload, so unverified data never becomes visible).
    """

    def __init__(self, update: UpdateReader, start: int, stop: int) -> None:
        self.update, self.stop = update, stop
        self.pos = start
        self._chunks = checksum.ChunkStream(update.grid, start)

    def read_next(self, out: npt.NDArray[Any]) -> None:
        """Fill ``out`` with the next ``len(out)`` elements."""
        self._check_room(len(out))
        self.update.read(self.pos, self.pos + len(out), out)
        self._advance(out)

    def _check_room(self, n: int) -> None:
        if self.pos + n > self.stop:
            raise GradshardError(f"read past the end of the stream at element {self.stop}")

    def _advance(self, out: npt.NDArray[Any]) -> None:
        self.pos += len(out)
        for index, digest in self._chunks.feed(out):
            if digest != self.update.checksum_of(index):
                a, b = self.update.grid.bounds(index)
                raise UpdateError(self.update.client, f"checksum mismatch in chunk {index} (elements [{a}, {b})): "
                                                      "the object is corrupted")


def open_update(store: Store, key: str, client: str, layout: ModelLayout) -> UpdateReader:
    """Open ``key``, validate header, metadata and layout, and return a reader; errors name ``client``."""
    reader = store.open_reader(key)
    try:
        header = read_header(reader, key, client)
        meta = UpdateMeta.from_metadata(client, header.metadata)
        check_layout(client, header, layout)
        return UpdateReader(reader, header, layout, meta)
    except BaseException:
        reader.close()
        raise


def read_flat(store: Store, key: str, layout: ModelLayout, client: str = "?") -> npt.NDArray[Any]:
    """The whole flat vector of an update or aggregate, every chunk verified."""
    upd = open_update(store, key, client, layout)
    try:
        out = np.empty(layout.numel, dtype=layout.flat_dtype)
        upd.read_verified(0, layout.numel, out)
        return out
    finally:
        upd.close()


def infer_layout(header: UpdateHeader) -> ModelLayout:
    """The layout of an object's tensors in file order (our writer's order is the layout order)."""
    ordered = sorted(header.tensors.items(), key=lambda item: item[1].begin)
    return ModelLayout(TensorSpec(name, entry.shape, entry.dtype) for name, entry in ordered)


def inspect_update(store: Store, key: str, layout: ModelLayout | None = None,
                   window_elems: int = 4 << 20) -> dict[str, Any]:
    """Validate one update or aggregate completely (every chunk, every value) and describe it.

    Without ``layout`` the file order is taken as the layout order and confirmed against the layout digest in
    the metadata (files from other writers may order tensors differently: then pass the round's layout).
    """
    client = key.rsplit("/", 1)[-1].removesuffix(".safetensors")
    with store.open_reader(key) as reader:
        header = read_header(reader, key, client)
    meta = UpdateMeta.from_metadata(client, header.metadata)
    layout = layout or infer_layout(header)
    if layout.digest() != meta.layout_digest:
        raise UpdateError(client, "the layout does not match the metadata's layout digest; pass the round's layout")
    nonfinite = 0
    with open_update(store, key, client, layout) as upd:
        stream = upd.stream(0, layout.numel)
        buf = np.empty(min(window_elems, layout.numel), dtype=upd.dtype)
        for start in range(0, layout.numel, len(buf)):
            values = buf[: min(len(buf), layout.numel - start)]
            stream.read_next(values)
            nonfinite += int(np.count_nonzero(~np.isfinite(values)))
    return {"key": key, "kind": meta.kind, "client": meta.client, "round": meta.round, "examples": meta.examples,
            "base_model": meta.base_model, "tensors": len(layout), "elements": layout.numel,
            "dtype": layout.flat_dtype, "bytes": header.object_size, "chunk_elems": meta.chunk_elems,
            "chunks_verified": upd.grid.count, "non_finite_values": nonfinite, "layout_digest": meta.layout_digest,
            "extra": dict(meta.extra)}
