"""Quantized updates: block-wise int8 with one float32 scale per checksum chunk, readable by range.

A client may upload its update as int8 (¼ of the float32 bytes). Block b of the flat vector is the round's checksum
chunk b (``chunk_elems`` elements, the last one shorter); its scale is ``s_b = max|x| / 127`` (float32; 0 for an
all-zero block) and its values ``q = rint(x / s_b)`` clipped to ``[-127, 127]``. Dequantization is
``x̂ = float32(q) · s_b``, one exact IEEE product per element, so every reader (any shard, any window) gets the same
values and aggregates stay identical across M.

The file is a safetensors file with one 1-D ``uint8`` tensor, ``int8_blocks``, of ``numel + 4·chunks`` bytes:
chunk b's ``n_b`` int8 values followed by its float32 scale (little-endian), chunk after chunk, so each chunk is one
contiguous byte range. Its digest is the round's digest of those ``n_b + 4`` bytes, so a shard ``[a, b)`` on the
chunk grid reads exactly its chunks' bytes (``(b − a) + 4·chunks``) and verifies each. The metadata is an update's
with ``gradshard.encoding = "int8"``; the layout digest is the round's (float32) layout's.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from gradshard.core import checksum, digests
from gradshard.core.layout import ModelLayout, TensorSpec
from gradshard.errors import GradshardError, UpdateError
from gradshard.format.update import EncodedReader, UpdateHeader, UpdateMeta
from gradshard.format.writer import check_encodable, publish_encoded, signing_meta
from gradshard.store import ObjectReader, Store
from gradshard.store.base import as_bytes

if TYPE_CHECKING:
    from gradshard.security.keys import PrivateKey

QUANT_TENSOR = "int8_blocks"
INT8 = "int8"
_SCALE_BYTES = 4
_LIMIT = np.float32(127)


def packed_bytes(numel: int, chunk_elems: int) -> int:
    return numel + _SCALE_BYTES * checksum.ChunkGrid(numel, chunk_elems).count


def file_layout(layout: ModelLayout, chunk_elems: int) -> ModelLayout:
    """The layout of the quantized file itself: one uint8 tensor of the packed chunks."""
    return ModelLayout([TensorSpec(QUANT_TENSOR, (packed_bytes(layout.numel, chunk_elems),), "uint8")])


def chunk_offset(grid: checksum.ChunkGrid, index: int) -> int:
    """Byte offset of chunk ``index`` in the packed data (its int8 values, then its scale)."""
    return grid.bounds(index)[0] + _SCALE_BYTES * index


# --- the kernels (pure) ----------------------------------------------------------------------------------------------
def quantize_block(x: npt.NDArray[np.float32], q: npt.NDArray[np.int8]) -> np.float32:
    """Fill ``q`` with block ``x`` in int8 and return its scale (``max|x| / 127``; 0 for an all-zero block)."""
    if not np.isfinite(x).all():
        raise GradshardError("cannot quantize NaN or inf")
    peak = np.float32(np.abs(x).max()) if len(x) else np.float32(0)
    scale = np.float32(peak / _LIMIT)
    if scale == 0:
        q.fill(0)
        return np.float32(0)
    scaled = np.rint(x / scale)
    np.clip(scaled, -127, 127, out=scaled)
    q[:] = scaled.astype(np.int8)
    return scale


def dequantize_block(q: npt.NDArray[np.int8], scale: np.float32, out: npt.NDArray[np.float32]) -> None:
    """``out = float32(q) · scale`` (exact casts, one rounding per element)."""
    np.multiply(q, scale, out=out, dtype=np.float32, casting="unsafe")


def pack(flat: npt.NDArray[np.float32], chunk_elems: int) -> npt.NDArray[np.uint8]:
    """The packed bytes of a whole flat float32 vector (chunk by chunk: int8 values, float32 scale)."""
    grid = checksum.ChunkGrid(len(flat), chunk_elems)
    out = np.empty(packed_bytes(len(flat), chunk_elems), dtype=np.uint8)
    for index in range(grid.count):
        a, b = grid.bounds(index)
        at = chunk_offset(grid, index)
        scale = quantize_block(np.ascontiguousarray(flat[a:b], dtype=np.float32), out[at : at + b - a].view(np.int8))
        out[at + b - a : at + b - a + _SCALE_BYTES] = np.frombuffer(np.float32(scale).astype("<f4").tobytes(),
                                                                     dtype=np.uint8)
    return out


def unpack_chunk(packed: npt.NDArray[np.uint8], n: int, out: npt.NDArray[np.float32]) -> None:
    """Dequantize one chunk's packed bytes (``n`` int8 values, then the scale) into ``out``."""
    scale = np.frombuffer(packed[n : n + _SCALE_BYTES].tobytes(), dtype="<f4")[0]
    if not np.isfinite(scale) or scale < 0:
        raise GradshardError(f"a chunk's scale must be finite and >= 0, got {scale!r}")
    dequantize_block(packed[:n].view(np.int8), np.float32(scale), out)


def dequantized(flat: npt.NDArray[np.float32], chunk_elems: int) -> npt.NDArray[np.float32]:
    """What readers of ``flat`` quantized get back (a reference for tests and clients)."""
    packed = pack(flat, chunk_elems)
    grid = checksum.ChunkGrid(len(flat), chunk_elems)
    out = np.empty(len(flat), dtype=np.float32)
    for index in range(grid.count):
        a, b = grid.bounds(index)
        at = chunk_offset(grid, index)
        unpack_chunk(packed[at : at + b - a + _SCALE_BYTES], b - a, out[a:b])
    return out


# --- writing -------------------------------------------------------------------------------------------------------
def write_quantized_update(store: Store, key: str, layout: ModelLayout, flat: npt.NDArray[Any], meta: UpdateMeta, *,
                           signer: PrivateKey | None = None) -> UpdateMeta:
    """Write ``flat`` (the round's float32 layout) as an int8 update atomically; returns ``meta`` with the chunk
    digests (over the packed chunks) and the quantized marker."""
    check_encodable(key, layout, flat, meta, "int8")
    meta = signing_meta(key, dataclasses.replace(meta, encoding=INT8, checksums=""), signer)
    grid = checksum.ChunkGrid(layout.numel, meta.chunk_elems)
    packed = pack(np.asarray(flat, dtype=np.float32), meta.chunk_elems)
    algorithm = digests.algorithm(meta.digest)
    hexes = []
    for index in range(grid.count):
        a, b = grid.bounds(index)
        at = chunk_offset(grid, index)
        hexes.append(algorithm.hexdigest(packed[at : at + b - a + _SCALE_BYTES]))
    return publish_encoded(store, key, file_layout(layout, meta.chunk_elems), meta, hexes, [packed], signer)


# --- reading ---------------------------------------------------------------------------------------------------------
class QuantizedReader(EncodedReader):
    """Verified, dequantized reads of one validated int8 update, in the round's (float32) element coordinates.

    Offers what the aggregation reads through (``client``, ``meta``, ``grid``, ``sha256``, ``header_digest``,
    :meth:`read_verified`) so functions treat it like an :class:`~gradshard.format.update.UpdateReader`."""

    def __init__(self, reader: ObjectReader, header: UpdateHeader, layout: ModelLayout, meta: UpdateMeta) -> None:
        client = meta.client
        super().__init__(reader, header, layout, meta)
        if layout.flat_dtype != "float32":
            raise UpdateError(client, f"an int8 update needs a float32 round, this one is {layout.flat_dtype}")
        names = sorted(header.tensors)
        if names != [QUANT_TENSOR]:
            raise UpdateError(client, f"an int8 update holds exactly one tensor {QUANT_TENSOR!r}, got {names[:5]}")
        entry = header.tensors[QUANT_TENSOR]
        need = packed_bytes(layout.numel, meta.chunk_elems)
        if entry.dtype != "uint8" or entry.shape != (need,):
            raise UpdateError(client, f"tensor {QUANT_TENSOR!r} must be uint8 of {need} bytes (the round's "
                                      f"{layout.numel} values and {self.grid.count} scales), got {entry.dtype} "
                                      f"{list(entry.shape)}")
        self.data_start = header.data_start + entry.begin
        self._packed = np.empty(self.grid.chunk_elems + _SCALE_BYTES, dtype=np.uint8)  # one chunk's bytes

    def expect(self, start: int, stop: int) -> None:
        """Announce a chunk-aligned range read front to back (one streamed GET on S3)."""
        if stop > start:
            first, last = self.grid.covering(start, stop)[0], self.grid.covering(start, stop)[-1]
            end = chunk_offset(self.grid, last) + self.grid.bounds(last)[1] - self.grid.bounds(last)[0] + _SCALE_BYTES
            self.reader.expect(self.data_start + chunk_offset(self.grid, first), self.data_start + end)

    def read_chunk(self, index: int, out: npt.NDArray[np.float32]) -> None:
        """Read, verify and dequantize chunk ``index`` into ``out`` (its length)."""
        a, b = self.grid.bounds(index)
        n = b - a
        raw = self._packed[: n + _SCALE_BYTES]
        self.reader.read_into(self.data_start + chunk_offset(self.grid, index), as_bytes(raw))
        self.bytes_read += n + _SCALE_BYTES
        if self.algorithm.hexdigest(raw) != self.checksum_of(index):
            raise UpdateError(self.client, f"checksum mismatch in chunk {index} (elements [{a}, {b})): the object "
                                           "is corrupted")
        try:
            unpack_chunk(raw, n, out[:n])
        except GradshardError as exc:
            raise UpdateError(self.client, f"chunk {index}: {exc}") from None
