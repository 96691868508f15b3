"""Per-chunk checksums of a flat vector.

The flat vector is cut into chunks of ``chunk_elems`` elements (the last one shorter); each chunk has an xxh3-64
checksum stored as 16 hex digits. A reader of any element range reads the whole chunks that overlap it and checks
them, so corruption is found without reading the rest of the object. xxh3 (the ``xxhash`` package) hashes at
about 18 GB/s here, twice the speed of an in-place ``np.add``, so checking costs little next to the reduction;
``zlib.crc32`` (2 GB/s) and blake2b (1 GB/s) would dominate it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
import xxhash

from gradshard.errors import GradshardError

ALGORITHM = "xxh3_64"
HEX_WIDTH = 16
MIN_CHUNK_ELEMS = 65536  # 256 KiB of float32: per-chunk Python overhead stays small next to hashing
TARGET_CHUNKS = 4096  # keeps the checksum list in a header under ~64 KiB
MIN_CHUNKS = 64  # small models still get enough chunks to be cut into many shards


def checksum(data: bytes | bytearray | memoryview | npt.NDArray[Any]) -> str:
    """The 16-hex-digit xxh3-64 checksum of a buffer (a numpy array must be contiguous)."""
    return xxhash.xxh3_64_hexdigest(data.data if isinstance(data, np.ndarray) else data)


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
    """Checksums chunks of a range fed sequentially in pieces of any size (windows need not align with chunks).

    ``feed`` returns the ``(chunk index, checksum)`` of every chunk the piece completed.
    """

    def __init__(self, grid: ChunkGrid, start: int) -> None:
        if start % grid.chunk_elems:
            raise GradshardError(f"a chunk stream must start on a chunk boundary, got element {start}")
        self.grid = grid
        self.pos = start
        self._hasher = xxhash.xxh3_64()

    def feed(self, values: npt.NDArray[Any]) -> list[tuple[int, str]]:
        done: list[tuple[int, str]] = []
        size, n = self.grid.chunk_elems, len(values)
        off = 0
        if self.pos % size:  # finish the chunk a previous piece started
            off = self._partial(values, min(n, size - self.pos % size), done)
        whole = (min(n - off, self.grid.numel - self.pos)) // size
        if whole:
            first = self.pos // size
            data = values.data
            done.extend((first + k, xxhash.xxh3_64_hexdigest(data[off + k * size : off + (k + 1) * size]))
                        for k in range(whole))
            off += whole * size
            self.pos += whole * size
        if off < n:  # the start of a chunk, or the vector's short last chunk
            self._partial(values, n - off, done, off)
        return done

    def _partial(self, values: npt.NDArray[Any], take: int, done: list[tuple[int, str]], off: int = 0) -> int:
        """Feed ``take`` elements from ``off`` into the running hash; close the chunk if they complete it."""
        index = self.pos // self.grid.chunk_elems
        self._hasher.update(values[off : off + take].data)
        self.pos += take
        if take and self.pos == self.grid.bounds(index)[1]:  # an empty piece completes nothing
            done.append((index, self._hasher.hexdigest()))
            self._hasher.reset()
        return off + take


def pack(hexes: list[str]) -> str:
    """Checksums as one string of fixed-width hex digits (the form stored in metadata)."""
    return "".join(hexes)

