"""One client's input to a reducing function: verified window reads over the function's range, and its coverage.

A client that trained only part of the model (its manifest entry carries a coverage: tensors and leading slices)
is read only over the checksum chunks that hold covered elements: a chunk is verified as a whole, so the reads are
the covered ranges rounded out to chunk boundaries, and chunks with nothing covered are never read. For each
window the input says which elements the client covers (a mask built from the coverage's runs), or that it has
nothing there at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from gradshard.core.coverage import CoverageMap
from gradshard.format.update import UpdateReader, VerifiedStream


class ClientInput:
    """Reads of one client over ``[start, stop)`` (chunk-aligned), window by window, in order."""

    def __init__(self, reader: UpdateReader, start: int, stop: int, coverage: CoverageMap | None,
                 mask_capacity: int = 0) -> None:
        self.reader, self.coverage = reader, coverage
        self.client = reader.client
        self.bytes_read = 0
        self._itemsize = reader.dtype.itemsize
        self._runs = iter([(start, stop)] if coverage is None else self._needed_runs(start, stop))
        self._run: tuple[int, int] | None = None
        self._stream: VerifiedStream | None = None
        self._next_run()
        self._mask = np.empty(mask_capacity if coverage is not None else 0, dtype=np.bool_)

    def _needed_runs(self, start: int, stop: int) -> Iterator[tuple[int, int]]:
        """Maximal runs of consecutive chunks in ``[start, stop)`` that hold at least one covered element."""
        assert self.coverage is not None
        grid = self.reader.grid
        run: tuple[int, int] | None = None
        for index in grid.covering(start, stop):
            lo, hi = grid.bounds(index)
            if not self.coverage.any_covered(lo, hi):
                continue
            if run is not None and run[1] == lo:
                run = (run[0], hi)
                continue
            if run is not None:
                yield run
            run = (lo, hi)
        if run is not None:
            yield run

    def _next_run(self) -> None:
        self._run = next(self._runs, None)
        self._stream = None if self._run is None else self.reader.stream(*self._run)

    def read(self, a: int, b: int, out: npt.NDArray[Any]) -> npt.NDArray[np.bool_] | bool | None:
        """Read this client's part of window ``[a, b)`` into ``out`` (length ``b - a``).

        Returns ``None`` when the client covers the whole window, a boolean mask of the covered elements, or
        ``False`` when it has nothing in the window (nothing was read). Elements outside the covered chunks are
        left as they were in ``out``: the mask excludes them.
        """
        read_any = False
        while self._run is not None and self._run[0] < b:
            lo, hi = max(a, self._run[0]), min(b, self._run[1])
            if lo < hi:
                assert self._stream is not None
                self._stream.read_next(out[lo - a : hi - a])
                self.bytes_read += (hi - lo) * self._itemsize
                read_any = True
            if self._run[1] > b:
                break
            self._next_run()
        if self.coverage is None:
            return None
        if not read_any or not self.coverage.any_covered(a, b):
            return False
        return self.coverage.mask(a, b, self._mask)

    def covered(self, a: int, b: int) -> npt.NDArray[np.bool_] | None:
        """The covered elements of ``[a, b)`` (None: all), e.g. to find which client put a NaN in a window."""
        if self.coverage is None:
            return None
        return self.coverage.mask(a, b, np.empty(b - a, dtype=np.bool_))

    def close(self) -> None:
        self.reader.close()


class PreviousModel:
    """Verified window reads of the previous global model, for the elements no client covers."""

    def __init__(self, reader: UpdateReader) -> None:
        self.reader = reader
        self._buffer = np.empty(0, dtype=reader.dtype)

    def load(self, a: int, b: int, out: npt.NDArray[Any]) -> None:
        """Fill ``out`` with elements ``[a, b)`` (cast to its dtype); the reads cover whole chunks, to verify them."""
        lo, hi = self.reader.grid.extent(a, b)
        if len(self._buffer) < hi - lo:
            self._buffer = np.empty(hi - lo, dtype=self.reader.dtype)
        self.reader.read_verified(lo, hi, self._buffer[: hi - lo])
        np.copyto(out, self._buffer[a - lo : b - lo], casting="same_kind")

    def close(self) -> None:
        self.reader.close()
