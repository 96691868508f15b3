"""One client's input to a reducing function: verified window reads over the function's range, and its coverage.

A client that trained only part of the model (its manifest entry carries a coverage: tensors and leading slices)
is read only over the checksum chunks that hold covered elements: a chunk is verified as a whole, so the reads are
the covered ranges rounded out to chunk boundaries, and chunks with nothing covered are never read. For each
window the input says which elements the client covers (a mask built from the coverage's runs), or that it has
nothing there at all.

A compact update (:mod:`gradshard.format.compact`: only the covered elements) is read by :class:`CompactInput`:
one sequential verified stream over the compact elements of the function's range, each window's ``k`` covered
values read into the front of the window buffer and moved to their covered places; bytes read are exactly the
covered elements times the itemsize.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from gradshard.core.coverage import CoverageMap
from gradshard.format.compact import ClientReader, CompactReader, scatter
from gradshard.format.update import EncodedReader, UpdateReader, VerifiedStream


def read_window_again(reader: ClientReader | EncodedReader, a: int, b: int, out: npt.NDArray[Any]) -> None:
    """Re-read window ``[a, b)`` of ``reader`` on its own (whole chunks, verified), apart from any stream: to find
    which client put a NaN in a window."""
    lo, hi = reader.grid.extent(a, b)
    whole = np.empty(hi - lo, dtype=reader.dtype)
    reader.read_verified(lo, hi, whole)
    out[:] = whole[a - lo : b - lo]


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

    def read_again(self, a: int, b: int, out: npt.NDArray[Any]) -> None:
        """Re-read window ``[a, b)`` on its own, apart from the stream (:func:`read_window_again`)."""
        read_window_again(self.reader, a, b, out)

    def close(self) -> None:
        self.reader.close()


class CompactInput:
    """Reads of one compact update over ``[start, stop)`` (chunk-aligned), window by window, in order.

    Same interface as :class:`ClientInput`. Memory: one window mask; the window buffer is the reducer's."""

    def __init__(self, reader: CompactReader, start: int, stop: int, mask_capacity: int = 0) -> None:
        self.reader, self.coverage = reader, reader.coverage
        self.client = reader.client
        self.bytes_read = 0
        self._itemsize = reader.dtype.itemsize
        self._stream = reader.stream(start, stop)
        self._pos = self.coverage.covered_before(start)  # compact offset of the next window's first value
        self._mask = np.empty(mask_capacity, dtype=np.bool_)

    def read(self, a: int, b: int, out: npt.NDArray[Any]) -> npt.NDArray[np.bool_] | bool | None:
        """See :meth:`ClientInput.read`; windows must follow each other from ``start``."""
        end = self.coverage.covered_before(b)
        k, self._pos = end - self._pos, end
        if k == 0:
            return False
        self._stream.read_next(out[:k])
        self.bytes_read += k * self._itemsize
        if k == b - a:
            return None
        mask = self.coverage.mask(a, b, self._mask)
        scatter(self.coverage, a, b, out, k, mask)
        return mask

    def covered(self, a: int, b: int) -> npt.NDArray[np.bool_] | None:
        return self.coverage.mask(a, b, np.empty(b - a, dtype=np.bool_))

    def read_again(self, a: int, b: int, out: npt.NDArray[Any]) -> None:
        """Re-read the covered elements of window ``[a, b)`` on its own (:func:`read_window_again`)."""
        read_window_again(self.reader, a, b, out)

    def close(self) -> None:
        self.reader.close()


class ChunkedInput:
    """Reads of one encoded update (int8 or top-k) over ``[start, stop)`` (chunk-aligned), window by window, in
    order: each chunk is read once (its encoded bytes only), verified and decoded into a chunk buffer that serves the
    windows it overlaps. Same interface as :class:`ClientInput`. Memory: one chunk of float32, plus the reader's
    one chunk of encoded bytes."""

    def __init__(self, reader: EncodedReader, start: int, stop: int) -> None:
        self.reader, self.coverage = reader, None
        self.client = reader.client
        self._values = np.empty(reader.grid.chunk_elems, dtype=np.float32)
        self._loaded = -1
        reader.expect(start, stop)

    @property
    def bytes_read(self) -> int:
        return self.reader.bytes_read

    def read(self, a: int, b: int, out: npt.NDArray[Any]) -> None:
        """Fill ``out`` with the decoded elements ``[a, b)``; windows must follow each other from ``start``."""
        grid, pos = self.reader.grid, a
        while pos < b:
            index = pos // grid.chunk_elems
            lo, hi = grid.bounds(index)
            if index != self._loaded:
                self.reader.read_chunk(index, self._values[: hi - lo])
                self._loaded = index
            take = min(b, hi) - pos
            out[pos - a : pos - a + take] = self._values[pos - lo : pos - lo + take]
            pos += take

    def covered(self, a: int, b: int) -> None:
        return None

    def read_again(self, a: int, b: int, out: npt.NDArray[Any]) -> None:
        read_window_again(self.reader, a, b, out)

    def close(self) -> None:
        self.reader.close()


UpdateInput = ClientInput | CompactInput | ChunkedInput


def client_input(reader: ClientReader, start: int, stop: int, coverage: CoverageMap | None,
                 window: int) -> UpdateInput:
    """The input that reads ``reader`` over ``[start, stop)``: compact, int8, top-k or full-size (with its coverage,
    if any)."""
    if isinstance(reader, CompactReader):
        return CompactInput(reader, start, stop, window)
    if isinstance(reader, EncodedReader):
        return ChunkedInput(reader, start, stop)
    return ClientInput(reader, start, stop, coverage, window)


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
