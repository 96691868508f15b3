"""Coverage of one client: which elements of the flat vector it trained (SuperFed, width-scaled clients).

A coverage is a mapping from tensor name to a *leading extent* per dimension: ``{"conv.weight": [32, 16, 3, 3]}``
says the client trained ``t[:32, :16, :3, :3]``. A tensor absent from the mapping is not covered. (A client
without any coverage description trained everything; callers represent that as ``None``, not as a map.)

In C order the covered part of a tensor is a set of equally long runs in closed form. Let ``j`` be the last
dimension with ``e_j < s_j``: the dimensions after ``j`` are whole, so each run is ``e_j·Π_{k>j} s_k`` elements
long and starts at ``Σ_{k<j} i_k·stride_k`` for every index tuple ``i_k < e_k`` (in C order, so the starts
increase). No dimension short: the tensor is one run; some ``e_k = 0``: nothing. Queries never build a mask of the
tensor or list all its runs: a mixed-radix count finds the first and last run that meet ``[start, stop)`` and only
those runs are generated, so a query costs ``O(ndim + runs in range)`` time and memory.
"""

from __future__ import annotations

import math
import operator
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from gradshard.core.checksum import ChunkGrid
from gradshard.core.layout import ModelLayout, TensorSlot
from gradshard.errors import LayoutError

Runs = tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]
_SLICE_RUNS = 32  # up to this many runs a mask is written by slices, beyond by a difference array and a cumsum


@dataclass(frozen=True)
class _TensorRuns:
    """The covered runs of one tensor: for every tuple ``t`` in the box ``outer`` (C order), the run of
    ``length`` elements at local offset ``Σ t_k·strides_k``."""

    start: int  # the tensor's slot in the flat vector
    stop: int
    outer: tuple[int, ...]  # extents of the dimensions before j
    strides: tuple[int, ...]  # their C strides in the tensor
    blocks: tuple[int, ...]  # blocks[k] = Π_{m>k} outer[m]: runs per step of index k
    length: int

    @classmethod
    def of(cls, slot: TensorSlot, extent: tuple[int, ...]) -> _TensorRuns:
        shape = slot.spec.shape
        short = [k for k, (e, s) in enumerate(zip(extent, shape, strict=True)) if e < s]
        j = short[-1] if short else 0
        strides = tuple(math.prod(shape[k + 1 :]) for k in range(len(shape)))
        length = extent[j] * strides[j] if short else slot.stop - slot.start
        outer = extent[:j]
        blocks = tuple(math.prod(outer[k + 1 :]) for k in range(j))
        return cls(slot.start, slot.stop, outer, strides[:j], blocks, length)

    def runs_before(self, x: int) -> int:
        """How many runs start before local offset ``x``: the tuples ``t ≤ digits(x − 1)`` in C order."""
        if x <= 0:
            return 0
        count, rest = 0, x - 1
        for extent, stride, block in zip(self.outer, self.strides, self.blocks, strict=True):
            digit, rest = divmod(rest, stride)
            if digit >= extent:
                return count + extent * block
            count += digit * block
        return count + 1

    def run_start(self, index: int) -> int:
        """Local offset of run ``index`` (its C-order tuple's digits times the strides)."""
        offset = 0
        for extent, stride in zip(reversed(self.outer), reversed(self.strides), strict=True):
            index, digit = divmod(index, extent)
            offset += digit * stride
        return offset

    @property
    def covered(self) -> int:
        return math.prod(self.outer) * self.length

    def covered_before(self, x: int) -> int:
        """How many covered elements lie before local offset ``x``: the runs that end by ``x`` whole, and the part
        of the one run that contains ``x``."""
        if x <= 0:
            return 0
        whole = self.runs_before(x - self.length + 1)
        started = self.runs_before(x)
        return whole * self.length + (x - self.run_start(started - 1) if started > whole else 0)

    def clipped(self, start: int, stop: int) -> Runs | None:
        """The runs that meet global ``[start, stop)``, clipped to it; ``None`` if there are none."""
        first = self.runs_before(start - self.start - self.length + 1)
        last = self.runs_before(stop - self.start)
        if last <= first:
            return None
        index = np.arange(first, last, dtype=np.int64)
        lo = np.full(last - first, self.start, dtype=np.int64)
        digit = np.empty_like(index)
        for extent, stride in zip(reversed(self.outer), reversed(self.strides), strict=True):
            np.remainder(index, extent, out=digit)
            digit *= stride
            lo += digit
            index //= extent
        hi = lo + self.length
        np.maximum(lo, start, out=lo)
        np.minimum(hi, stop, out=hi)
        return lo, hi


def _merge(lo: npt.NDArray[np.int64], hi: npt.NDArray[np.int64]) -> Runs:
    """Join runs where one ends exactly where the next starts."""
    joined = lo[1:] == hi[:-1]
    if not joined.any():
        return lo, hi
    apart = ~joined
    return lo[np.concatenate(([True], apart))], hi[np.concatenate((apart, [True]))]


def _extent_of(slot: TensorSlot, extent: Any) -> tuple[int, ...]:
    name, shape = slot.spec.name, slot.spec.shape
    try:
        if isinstance(extent, str | bytes):
            raise TypeError
        values = tuple(operator.index(e) for e in extent)
    except TypeError:
        raise LayoutError(f"coverage of tensor {name!r} must be a list of {len(shape)} integers (its leading "
                          f"extent per dimension), got {extent!r}") from None
    if len(values) != len(shape) or not all(0 <= e <= s for e, s in zip(values, shape, strict=False)):
        raise LayoutError(f"coverage of tensor {name!r} is {list(values)} but its shape is {list(shape)}; give one "
                          f"extent 0 <= e <= size per dimension")
    return values


class CoverageMap:
    """The elements of the flat vector of ``layout`` that one client covers (see the module docstring).

    ``extents`` maps tensor names to leading extents; it is validated against the layout (:class:`LayoutError`
    naming the tensor). ``covered_elems`` counts the covered elements, ``full`` says whether that is all of them.
    """

    def __init__(self, layout: ModelLayout, extents: Mapping[str, Sequence[int]]) -> None:
        unknown = [name for name in extents if name not in {t.name for t in layout}]
        if unknown:
            raise LayoutError(f"coverage names tensors that are not in the layout: {unknown[:5]}; use the names of "
                              f"the model's aggregated tensors")
        self.layout = layout
        self.extents: dict[str, tuple[int, ...]] = {
            slot.spec.name: _extent_of(slot, extents[slot.spec.name]) for slot in layout.slots
            if slot.spec.name in extents
        }
        self._parts = [_TensorRuns.of(layout.slot(name), extent) for name, extent in self.extents.items()
                       if math.prod(extent) > 0]
        self._stops = [part.stop for part in self._parts]
        self._before = [0]  # covered elements in the parts before part i
        for part in self._parts:
            self._before.append(self._before[-1] + part.covered)
        self.covered_elems: int = sum(math.prod(extent) for extent in self.extents.values())
        self.full: bool = self.covered_elems == layout.numel

    def __repr__(self) -> str:
        return f"CoverageMap({len(self.extents)} tensors, {self.covered_elems:,} of {self.layout.numel:,} elements)"

    def runs(self, start: int, stop: int) -> Runs:
        """Sorted, disjoint, non-adjacent covered runs ``[lo, hi)`` (global int64 offsets) clipped to
        ``[start, stop)``."""
        pieces = [runs for part in self._overlapping(start, stop) if (runs := part.clipped(start, stop)) is not None]
        if not pieces:
            empty = np.empty(0, dtype=np.int64)
            return empty, empty.copy()
        if len(pieces) == 1:
            return pieces[0]
        return _merge(np.concatenate([lo for lo, _ in pieces]), np.concatenate([hi for _, hi in pieces]))

    def mask(self, start: int, stop: int, out: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
        """The covered elements of ``[start, stop)``, written into ``out[:stop - start]`` (a view of it returned)."""
        n = stop - start
        if out.dtype != np.bool_ or out.ndim != 1 or len(out) < n:
            raise LayoutError(f"mask buffer must be at least {n} booleans, got {out.shape} {out.dtype}")
        lo, hi = self.runs(start, stop)
        view = out[:n]
        view.fill(False)
        if len(lo) <= _SLICE_RUNS:
            for a, b in zip(lo.tolist(), hi.tolist(), strict=True):
                view[a - start : b - start] = True
            return view
        steps = view.view(np.int8)  # +1 where a run starts, -1 where it ends (never the same place), then cumsum
        steps[lo - start] = 1
        ends = hi - start
        steps[ends[ends < n]] = -1
        np.cumsum(steps, dtype=np.int8, out=steps)
        return view

    def any_covered(self, start: int, stop: int) -> bool:
        """Whether some element of ``[start, stop)`` is covered."""
        for part in self._overlapping(start, stop):
            a, b = max(start, part.start) - part.start, min(stop, part.stop) - part.start
            if part.runs_before(b) > part.runs_before(a - part.length + 1):
                return True
        return False

    def count(self, start: int, stop: int) -> int:
        """How many elements of ``[start, stop)`` are covered."""
        lo, hi = self.runs(start, stop)
        return int(hi.sum() - lo.sum())

    def covered_before(self, j: int) -> int:
        """How many covered elements lie in ``[0, j)``: element ``j``'s offset in the compact vector (the covered
        elements in layout order). Closed form, ``O(ndim + log tensors)``; no mask."""
        if not 0 <= j <= self.layout.numel:
            raise LayoutError(f"element {j} is not inside the flat vector of {self.layout.numel} elements")
        i = bisect_right(self._stops, j)  # the parts before i end at or before j
        if i == len(self._parts) or self._parts[i].start >= j:
            return self._before[i]
        part = self._parts[i]
        return self._before[i] + part.covered_before(j - part.start)

    def _overlapping(self, start: int, stop: int) -> list[_TensorRuns]:
        if not 0 <= start <= stop <= self.layout.numel:
            raise LayoutError(f"range [{start}, {stop}) is not inside the flat vector of {self.layout.numel} elements")
        if start == stop:
            return []
        first = bisect_right(self._stops, start)
        parts = []
        for part in self._parts[first:]:
            if part.start >= stop:
                break
            parts.append(part)
        return parts


def covered_chunks(maps: Iterable[CoverageMap], grid: ChunkGrid) -> list[tuple[int, int]]:
    """The chunk-aligned element ranges ``[lo, hi)`` (sorted, disjoint, merged) holding every element some map
    covers: per covered tensor, the span from its first to its last covered element, rounded out to the chunk grid.

    A chunk outside these ranges holds no covered element of any map (a chunk inside may hold none either: spans
    are bounds, not masks). Costs ``O(tensors covered × ndim)`` per map, never a mask of the vector."""
    spans: list[tuple[int, int]] = []
    for cov in maps:
        for part in cov._parts:  # a leading box starts at the tensor's first element and ends with its last run
            last = part.run_start(math.prod(part.outer) - 1) + part.length
            spans.append(grid.extent(part.start, part.start + last))
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(spans):
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged
