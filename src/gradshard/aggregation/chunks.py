"""What every phase-1 function shares: reading one checksum chunk of every client into float64 rows, and the
driver's assembly of the per-chunk partials the functions return (base64 float64, ``chunks × width``).

Every row is padded with zeros to a multiple of 8 float64 and reduced along one contiguous row, so a chunk's partials
are computed the same way whichever function reads it; the driver then adds partials over all chunks with
``math.fsum`` (exact), so phase-1 results are the same bytes for every M.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from gradshard.core.checksum import ChunkGrid
from gradshard.errors import RoundError, UpdateError
from gradshard.format.update import EncodedReader, UpdateReader, VerifiedStream

ALIGN = 8  # float64 per padded row unit (64 bytes)


def padded_width(chunk_elems: int) -> int:
    return -(-chunk_elems // ALIGN) * ALIGN


class ChunkRows:
    """One float64 row per reader (zero-padded to :func:`padded_width`), refilled chunk by chunk, in order, over the
    chunk-aligned range ``[start, stop)``: each reader is read as one sequential stream of that range (one streamed
    GET per client on S3), every chunk verified."""

    def __init__(self, readers: Sequence[UpdateReader | EncodedReader], grid: ChunkGrid, dtype: npt.DTypeLike,
                 start: int, stop: int, names: Sequence[str] | None = None) -> None:
        self.readers, self.grid = readers, grid
        self.names = list(names) if names is not None else [r.client for r in readers]
        self.rows = np.zeros((len(readers), padded_width(grid.chunk_elems)), dtype=np.float64)
        self._values = np.empty(grid.chunk_elems, dtype=dtype)
        self._streams: list[VerifiedStream | None] = []
        for reader in readers:
            if isinstance(reader, UpdateReader):
                self._streams.append(reader.stream(start, stop))
            else:
                reader.expect(start, stop)
                self._streams.append(None)

    def load(self, index: int) -> npt.NDArray[np.float64]:
        """Read chunk ``index`` (the next in order) of every reader (verified; NaN or inf is an error naming it)."""
        a, b = self.grid.bounds(index)
        window = self._values[: b - a]
        for i, (reader, stream) in enumerate(zip(self.readers, self._streams, strict=True)):
            if stream is not None:
                stream.read_next(window)
            else:
                assert isinstance(reader, EncodedReader)
                reader.read_chunk(index, window)
            if not np.isfinite(window).all():
                raise UpdateError(self.names[i], f"non-finite values (NaN or inf) in elements [{a}, {b})")
            self.rows[i, : b - a] = window
            self.rows[i, b - a :] = 0.0
        return self.rows


def encode_partials(partials: npt.NDArray[np.float64]) -> str:
    return base64.b64encode(np.ascontiguousarray(partials, dtype="<f8").tobytes()).decode()


def partial_table(parts: Sequence[tuple[int, int, str]], chunks: int, width: int, what: str
                  ) -> npt.NDArray[np.float64]:
    """The ``chunks × width`` table from ``(first_chunk, chunks, base64)`` parts; every chunk exactly once."""
    table = np.full((chunks, width), np.nan)
    seen = np.zeros(chunks, dtype=bool)
    for first, count, text in parts:
        raw = base64.b64decode(text, validate=True)
        stop = first + count
        if len(raw) != count * width * 8:
            raise RoundError(f"{what} partials of chunks [{first}, {stop}) have {len(raw)} bytes, expected "
                             f"{count * width * 8}")
        if stop > chunks or seen[first:stop].any():
            raise RoundError(f"{what} partials overlap or overrun at chunks [{first}, {stop})")
        seen[first:stop] = True
        table[first:stop] = np.frombuffer(raw, dtype="<f8").reshape(count, width)
    if not seen.all():
        raise RoundError(f"{what} partials miss chunks {np.flatnonzero(~seen)[:5].tolist()}: the plan did not cover "
                         "the model")
    return table


def column_sums(table: npt.NDArray[np.float64]) -> list[float]:
    """Each column's exact sum (``math.fsum``: correctly rounded, independent of the order of the chunks)."""
    return [math.fsum(table[:, k].tolist()) for k in range(table.shape[1])]
