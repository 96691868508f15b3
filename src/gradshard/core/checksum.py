"""Per-chunk digests of a flat vector.

The flat vector is cut into chunks of ``chunk_elems`` elements (the last one shorter); each chunk has a digest
(:mod:`gradshard.core.digests`: xxh3-64 by default, 16 hex digits; BLAKE3 or SHA-256, 64 hex digits). A reader of
any element range reads the whole chunks that overlap it and checks them, so corruption is found without reading
the rest of the object. xxh3 hashes faster than an in-place ``np.add`` (see :mod:`gradshard.core.digests` for the
measured throughputs), so checking costs little next to the reduction; the cryptographic ones cost more and
authenticate the data when a signature covers the digest list.
"""

from __future__ import annotations

import math
from typing import Any

import numpy.typing as npt

from gradshard.core import digests
from gradshard.errors import GradshardError

ALGORITHM = digests.DEFAULT
HEX_WIDTH = digests.algorithm(ALGORITHM).hex_width
MIN_CHUNK_ELEMS = 65536  # 256 KiB of float32: per-chunk Python overhead stays small next to hashing
TARGET_CHUNKS = 4096  # keeps the digest list in a header under ~64 KiB (xxh3) or ~256 KiB (64-hex digests)
MIN_CHUNKS = 64  # small models still get enough chunks to be cut into many shards


def checksum(data: bytes | bytearray | memoryview | npt.NDArray[Any], algorithm: str = ALGORITHM) -> str:
    """The digest of a buffer with ``algorithm`` (default xxh3-64, 16 hex digits); numpy arrays must be contiguous."""
    return digests.algorithm(algorithm).hexdigest(data)


def hex_width(algorithm: str) -> int:
    """Hex digits per chunk digest of ``algorithm``."""
    return digests.algorithm(algorithm).hex_width


def default_chunk_elems(numel: int) -> int:
    """A power of two giving at most ~4096 chunks of at least 65536 elements, but at least 64 chunks if possible."""
    chunk = max(MIN_CHUNK_ELEMS, 1 << max(0, math.ceil(math.log2(max(1.0, numel / TARGET_CHUNKS)))))
    while chunk > 1 and numel // chunk < MIN_CHUNKS:
        chunk //= 2
    return chunk


class ChunkGrid:
    """Uniform chunks of ``chunk_elems`` elements over ``[0, numel)``."""

    def __init__(self, numel: int, chunk_elems: int) -> None:
        if chunk_elems < 1:
            raise GradshardError(f"chunk size must be at least 1 element, got {chunk_elems}")
        self.numel = numel
        self.chunk_elems = chunk_elems
        self.count = -(-numel // chunk_elems)

    def bounds(self, index: int) -> tuple[int, int]:
        start = index * self.chunk_elems
        return start, min(start + self.chunk_elems, self.numel)

    def covering(self, start: int, stop: int) -> range:
        """Indices of the chunks that overlap elements ``[start, stop)``."""
        if start >= stop:
            return range(0)
        return range(start // self.chunk_elems, -(-stop // self.chunk_elems))

    def extent(self, start: int, stop: int) -> tuple[int, int]:
        """The chunk-aligned element range that covers ``[start, stop)``."""
        idx = self.covering(start, stop)
        return self.bounds(idx.start)[0], self.bounds(idx.stop - 1)[1]

    def is_aligned(self, start: int, stop: int) -> bool:
        """Whether ``[start, stop)`` begins and ends on chunk boundaries (or the end of the vector)."""
        return start < stop and self.extent(start, stop) == (start, stop)


class ChunkStream:
    """Digests the chunks of a range fed sequentially in pieces of any size (pieces need not align with chunks).

    ``feed`` returns the ``(chunk index, digest)`` of every chunk the piece completed. The digests depend only on
    the bytes of each chunk, never on how the range was cut into pieces.
    """

    def __init__(self, grid: ChunkGrid, start: int, algorithm: str = ALGORITHM) -> None:
        if start % grid.chunk_elems:
            raise GradshardError(f"a chunk stream must start on a chunk boundary, got element {start}")
        self.grid = grid
        self.pos = start
        self.algorithm = digests.algorithm(algorithm)
        self._hasher: digests.Hasher | None = None  # the chunk a previous piece started

    def feed(self, values: npt.NDArray[Any]) -> list[tuple[int, str]]:
        done: list[tuple[int, str]] = []
        size, n = self.grid.chunk_elems, len(values)
        data, item = digests.byte_view(values), values.dtype.itemsize
        off = 0
        if self.pos % size:  # finish the chunk a previous piece started
            off = self._partial(data[: min(n, size - self.pos % size) * item], item, done)
        whole = (min(n - off, self.grid.numel - self.pos)) // size
        if whole:
            first, step, base, oneshot = self.pos // size, size * item, off * item, self.algorithm.oneshot
            done.extend((first + k, oneshot(data[base + k * step : base + (k + 1) * step])) for k in range(whole))
            off += whole * size
            self.pos += whole * size
        if off < n:  # the start of a chunk, or the vector's short last chunk
            self._partial(data[off * item :], item, done)
        return done

    def _partial(self, piece: memoryview, item: int, done: list[tuple[int, str]]) -> int:
        """Feed ``piece`` (bytes of whole elements) into the running hash; close the chunk if it completes it.

        Returns the number of elements fed."""
        take = len(piece) // item
        index = self.pos // self.grid.chunk_elems
        if self._hasher is None:
            self._hasher = self.algorithm.new()
        self._hasher.update(piece)
        self.pos += take
        if take and self.pos == self.grid.bounds(index)[1]:  # an empty piece completes nothing
            done.append((index, self._hasher.hexdigest()))
            self._hasher = None
        return take


def pack(hexes: list[str]) -> str:
    """Checksums as one string of fixed-width hex digits (the form stored in metadata)."""
    return "".join(hexes)

