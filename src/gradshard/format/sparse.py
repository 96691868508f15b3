"""Top-k sparse updates, readable by range: a shard reads only its slice of the index and value arrays.

A client keeps the k elements of largest magnitude of its update (ties: the lower index) and uploads them; every
other element is 0 (the update still covers the whole model: reducers see the densified vector). The file is a
safetensors file with two 1-D tensors in chunk order: ``indices`` (uint32, each element's offset inside its checksum
chunk, ascending within a chunk) and ``values`` (float32). The per-chunk **pointer table** — how many of the k
entries fall in each chunk — is in the metadata (``gradshard.topk_counts``: base64 of little-endian uint32, one per
chunk), so it is covered by the header digest and read with the header: a shard ``[a, b)`` on the chunk grid reads
exactly its chunks' entries, ``8`` bytes each, and nothing of the other chunks.

Chunk i's digest is the round's digest of its indices' bytes followed by its values' bytes. A reader checks, per
chunk, the digest, that the offsets are strictly ascending and inside the chunk, and that the values are finite.
The metadata is an update's with ``gradshard.encoding = "topk"``; the layout digest is the round's float32 layout's.
"""

from __future__ import annotations

import base64
import dataclasses
import math
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

TOPK = "topk"
COUNTS_FIELD = "gradshard.topk_counts"  # UpdateMeta.topk_counts
INDICES, VALUES = "indices", "values"


def encode_counts(counts: npt.NDArray[np.uint32]) -> str:
    return base64.b64encode(np.ascontiguousarray(counts, dtype="<u4").tobytes()).decode()


def decode_counts(text: str, chunks: int) -> npt.NDArray[np.int64]:
    """The per-chunk entry counts of a header (refused unless one uint32 per chunk)."""
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        raise GradshardError(f"'{COUNTS_FIELD}' is not base64") from None
    if len(raw) != 4 * chunks:
        raise GradshardError(f"'{COUNTS_FIELD}' holds {len(raw) // 4} counts, the round has {chunks} chunks")
    return np.frombuffer(raw, dtype="<u4").astype(np.int64)


def file_layout(k: int) -> ModelLayout:
    """The layout of the file itself: k uint32 offsets, then k float32 values."""
    return ModelLayout([TensorSpec(INDICES, (k,), "uint32"), TensorSpec(VALUES, (k,), "float32")])


# --- the kernels (pure) ----------------------------------------------------------------------------------------------
def top_k(flat: npt.NDArray[np.float32], k: int) -> npt.NDArray[np.int64]:
    """The flat indices of the k elements of largest magnitude, ascending (ties: the lower index wins)."""
    if not 0 <= k <= len(flat):
        raise GradshardError(f"top-k needs 0 <= k <= {len(flat)}, got {k}")
    if not np.isfinite(flat).all():
        raise GradshardError("cannot sparsify NaN or inf")
    order = np.argsort(-np.abs(flat.astype(np.float64)), kind="stable")[:k]
    return np.sort(order)


def k_of(fraction: float, numel: int) -> int:
    """``ceil(fraction · numel)``, at least 1: the entries a ``fraction`` keeps."""
    if not (0 < fraction <= 1 and math.isfinite(fraction)):
        raise GradshardError(f"the fraction of elements kept must be in (0, 1], got {fraction!r}")
    return max(1, math.ceil(fraction * numel))


def parse_compression(text: str) -> tuple[str, float]:
    """How clients upload: ``none``, ``int8`` or ``topk:<fraction>`` (``(kind, fraction)``, fraction 1 but for
    topk)."""
    kind, sep, arg = text.partition(":")
    if kind in ("none", "int8") and not sep:
        return kind, 1.0
    if kind == TOPK and sep:
        try:
            fraction = float(arg)
        except ValueError:
            fraction = math.nan
        if 0 < fraction <= 1:
            return kind, fraction
    raise GradshardError(f"compression {text[:40]!r}: use none, int8 or topk:<fraction in (0, 1]>, e.g. topk:0.01")


def densified(flat: npt.NDArray[np.float32], k: int) -> npt.NDArray[np.float32]:
    """What readers of ``flat`` sparsified to k entries get back (a reference for tests and clients)."""
    out = np.zeros(len(flat), dtype=np.float32)
    keep = top_k(flat, k)
    out[keep] = flat[keep]
    return out


# --- writing -------------------------------------------------------------------------------------------------------
def write_topk_update(store: Store, key: str, layout: ModelLayout, flat: npt.NDArray[Any], meta: UpdateMeta, *,
                      k: int, keep: npt.NDArray[np.int64] | None = None, signer: PrivateKey | None = None
                      ) -> UpdateMeta:
    """Write the k largest-magnitude elements of ``flat`` (the round's float32 layout) as a top-k update atomically;
    returns ``meta`` with the pointer table and the chunk digests. ``keep``: :func:`top_k` of ``flat`` when the
    caller computed it already (error feedback needs it too); it must be k ascending indices."""
    check_encodable(key, layout, flat, meta, "top-k")
    flat = np.asarray(flat, dtype=np.float32)
    if keep is None:
        keep = top_k(flat, k)
    elif len(keep) != k or (k and (keep[0] < 0 or keep[-1] >= len(flat) or np.any(np.diff(keep) <= 0))):
        raise GradshardError(f"keep must be {k} ascending indices below {len(flat)}")
    grid = checksum.ChunkGrid(layout.numel, meta.chunk_elems)
    chunk_of = keep // meta.chunk_elems
    counts = np.bincount(chunk_of, minlength=grid.count).astype(np.uint32)
    indices = (keep - chunk_of * meta.chunk_elems).astype("<u4")
    values = flat[keep].astype("<f4")
    meta = dataclasses.replace(meta, encoding=TOPK, checksums="", topk_counts=encode_counts(counts))
    meta = signing_meta(key, meta, signer)
    algorithm = digests.algorithm(meta.digest)
    bounds = np.concatenate(([0], np.cumsum(counts, dtype=np.int64)))
    hexes = []
    for index in range(grid.count):
        hasher = algorithm.new()
        hasher.update(digests.byte_view(indices[bounds[index] : bounds[index + 1]]))
        hasher.update(digests.byte_view(values[bounds[index] : bounds[index + 1]]))
        hexes.append(hasher.hexdigest())
    return publish_encoded(store, key, file_layout(k), meta, hexes, [indices, values], signer)


# --- reading ---------------------------------------------------------------------------------------------------------
class SparseReader(EncodedReader):
    """Verified, densified reads of one validated top-k update, in the round's (float32) element coordinates."""

    def __init__(self, reader: ObjectReader, header: UpdateHeader, layout: ModelLayout, meta: UpdateMeta) -> None:
        client = meta.client
        super().__init__(reader, header, layout, meta)
        if layout.flat_dtype != "float32":
            raise UpdateError(client, f"a top-k update needs a float32 round, this one is {layout.flat_dtype}")
        try:
            counts = decode_counts(meta.topk_counts, self.grid.count)
        except GradshardError as exc:
            raise UpdateError(client, str(exc)) from None
        sizes = np.full(self.grid.count, self.grid.chunk_elems, dtype=np.int64)
        sizes[-1] = layout.numel - self.grid.chunk_elems * (self.grid.count - 1)
        if (counts > sizes).any():
            bad = int(np.flatnonzero(counts > sizes)[0])
            raise UpdateError(client, f"'{COUNTS_FIELD}' puts {counts[bad]} entries in chunk {bad} of {sizes[bad]} "
                                      "elements")
        self.k = int(counts.sum())
        self.bounds = np.concatenate(([0], np.cumsum(counts)))
        names = sorted(header.tensors)
        if names != [INDICES, VALUES]:
            raise UpdateError(client, f"a top-k update holds tensors {INDICES!r} and {VALUES!r}, got {names[:5]}")
        for name, dtype in ((INDICES, "uint32"), (VALUES, "float32")):
            entry = header.tensors[name]
            if entry.dtype != dtype or entry.shape != (self.k,):
                raise UpdateError(client, f"tensor {name!r} must be {dtype} of {self.k} entries (the pointer "
                                          f"table's total), got {entry.dtype} {list(entry.shape)}")
        self.indices_start = header.data_start + header.tensors[INDICES].begin
        self.values_start = header.data_start + header.tensors[VALUES].begin

    def expect(self, start: int, stop: int) -> None:
        """Announce a chunk-aligned range read front to back (its slices of both arrays)."""
        first, last = start // self.grid.chunk_elems, -(-stop // self.grid.chunk_elems)
        lo, hi = int(self.bounds[first]), int(self.bounds[min(last, self.grid.count)])
        if hi > lo:
            self.reader.expect(self.indices_start + 4 * lo, self.indices_start + 4 * hi)
            self.reader.expect(self.values_start + 4 * lo, self.values_start + 4 * hi)

    def read_chunk(self, index: int, out: npt.NDArray[np.float32]) -> None:
        """Read and verify chunk ``index``'s entries and write the densified chunk into ``out`` (its length)."""
        a, b = self.grid.bounds(index)
        lo, hi = int(self.bounds[index]), int(self.bounds[index + 1])
        indices = np.empty(hi - lo, dtype="<u4")
        values = np.empty(hi - lo, dtype="<f4")
        if hi > lo:
            self.reader.read_into(self.indices_start + 4 * lo, as_bytes(indices))
            self.reader.read_into(self.values_start + 4 * lo, as_bytes(values))
            self.bytes_read += 8 * (hi - lo)
        hasher = self.algorithm.new()
        hasher.update(digests.byte_view(indices))
        hasher.update(digests.byte_view(values))
        if hasher.hexdigest() != self.checksum_of(index):
            raise UpdateError(self.client, f"checksum mismatch in chunk {index} (elements [{a}, {b})): the object "
                                           "is corrupted")
        if len(indices) and (int(indices[-1]) >= b - a or (len(indices) > 1 and (np.diff(indices.astype(np.int64))
                                                                               <= 0).any())):
            raise UpdateError(self.client, f"chunk {index}: offsets must ascend strictly inside the chunk's {b - a} "
                                           "elements")
        out[: b - a] = 0
        out[indices.astype(np.int64)] = values
