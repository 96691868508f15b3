"""Reducer kernels of aggregation contract v2: pure, window-by-window, allocation-aware.

A shard function reduces elements ``[start, stop)`` of N clients' flat update vectors one window at a time, clients
always in canonical (sorted id) order. Every kernel here computes each element from that element's N values alone,
with a fixed sequence of IEEE operations, so the result does not depend on the window or shard an element falls in:
sharded results are bit-identical for every shard count and window size.

Protocol per window: ``start(n)``; for each client position ``i = 0 .. N-1`` in order, fill ``buffer(i)`` and call
``add(i, covered)`` (or ``skip(i)`` for a client with nothing in the window, coverage reducers only); then
``finish()`` returns the window's result in the accumulation dtype, a view of an internal buffer that the next window
overwrites. Every buffer is allocated in ``__init__``; ``memory_bytes`` is the exact sum of their sizes, so a plan
can size a function's memory before running it.

=================  ======================  =================================================================
reducer            weights                 per element
=================  ======================  =================================================================
``mean``           examples (normalised)   ``Σ wᵢxᵢ`` (today's FedAvg, byte for byte)
``coverage-mean``  examples (normalised)   ``Σ wᵢxᵢ / Σ wᵢ`` over covering clients, else the previous value
``median``         none (unweighted)       the median of the N values (``np.median``, byte for byte)
``trimmed-mean:β`` none (unweighted)       the mean of the N values without the ``⌊βN⌋`` smallest and largest
``krum:f``         examples (normalised)   the update of the client Krum selects (phase 1), i.e. ``mean`` over it
``multi-krum:f,k`` examples (normalised)   ``mean`` over the k clients with the lowest Krum scores (phase 1)
``bulyan:f``       none (unweighted)       the mean of the ``θ − 2f`` values closest to the median, over the θ
                                           clients Bulyan's iterated Krum selected (phase 1)
``fltrust``        trust scores (phase 1)  ``Σ TSᵢ·(‖g₀‖/‖gᵢ‖)·gᵢ / Σ TSᵢ``, ``TSᵢ = max(0, cos(gᵢ, g₀))`` against
                                           the server's own update g₀
``secagg:s``       the directory's wᵢ,     masked uint32 words summed modulo 2³², the masks removed (phase 1
                   applied by the clients  reconstructs them), read as int32, divided by ``2^s·N`` (``2^s·Σwᵢ``)
=================  ======================  =================================================================

The selecting reducers run a phase before the reduction: exact pairwise distances
(:mod:`gradshard.aggregation.distances`) and the selection (:mod:`gradshard.core.selection`); the clients not
selected leave the round, and the kernel here reduces the selected ones.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal, get_args

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from gradshard.core.layout import UPDATE_DTYPES
from gradshard.core.masks import remove_masks
from gradshard.core.reduce import ACCUMULATE_DTYPES, WeightedSum
from gradshard.errors import GradshardError

ReducerName = Literal["mean", "coverage-mean", "median", "trimmed-mean", "krum", "multi-krum", "bulyan", "fltrust",
                      "secagg"]
KNOWN_REDUCERS: tuple[str, ...] = ("mean", "coverage-mean", "median", "trimmed-mean:<beta>", "krum:<f>",
                                   "multi-krum:<f>,<k>", "bulyan:<f>", "fltrust", "secagg:<bits>")
SELECTING: tuple[str, ...] = ("krum", "multi-krum", "bulyan")  # reducers with a selection phase
LoadPrevious = Callable[[npt.NDArray[Any]], None]


class NonFiniteInput(GradshardError, ValueError):
    """A client's window holds NaN or ±inf. ``index`` is the client's position in canonical order."""

    def __init__(self, index: int) -> None:
        super().__init__(f"client at position {index} (canonical order) has NaN or inf values in this window; "
                         f"reject that update before aggregating")
        self.index = index


# --- the reducer's name and parameters ---------------------------------------------------------------------------
class ReducerSpec(BaseModel):
    """Which reducer a round uses. Text form: ``mean``, ``coverage-mean``, ``median``, ``trimmed-mean:0.1``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: ReducerName
    beta: float = 0.0
    f: int = 0  # selecting reducers: the Byzantine clients tolerated
    k: int = 0  # multi-krum: the clients kept
    bits: int = 0  # secagg: the fixed-point fraction bits of the clients' quantized values

    @model_validator(mode="after")
    def _check_params(self) -> ReducerSpec:
        if self.name == "trimmed-mean":
            if not 0.0 <= self.beta < 0.5:
                raise ValueError(f"trimmed-mean needs 0 <= beta < 0.5 (the fraction cut at each end), got {self.beta}")
        elif self.beta != 0.0:
            raise ValueError(f"reducer {self.name!r} takes no beta, got {self.beta}")
        if self.name in SELECTING:
            if self.f < 0:
                raise ValueError(f"{self.name} needs f >= 0 (the Byzantine clients it tolerates), got {self.f}")
        elif self.f != 0:
            raise ValueError(f"reducer {self.name!r} takes no f, got {self.f}")
        if self.name == "secagg":
            if not 1 <= self.bits <= 30:
                raise ValueError(f"secagg needs 1 <= bits <= 30 (fixed-point fraction bits), got {self.bits}")
        elif self.bits != 0:
            raise ValueError(f"reducer {self.name!r} takes no bits, got {self.bits}")
        if self.name == "multi-krum":
            if self.k < 1:
                raise ValueError(f"multi-krum needs k >= 1 (the clients it keeps), got {self.k}")
        elif self.k != 0:
            raise ValueError(f"reducer {self.name!r} takes no k, got {self.k}")
        return self

    @property
    def selects(self) -> bool:
        """Whether a selection phase chooses the clients this reducer reduces."""
        return self.name in SELECTING

    @property
    def text(self) -> str:
        """The text form; ``parse_reducer(spec.text) == spec``."""
        if self.name == "trimmed-mean":
            return f"{self.name}:{self.beta!r}"
        if self.name == "multi-krum":
            return f"{self.name}:{self.f},{self.k}"
        if self.name == "secagg":
            return f"{self.name}:{self.bits}"
        if self.name in SELECTING:
            return f"{self.name}:{self.f}"
        return self.name

    def __str__(self) -> str:
        return self.text


def _integers(text: str, arg: str, count: int, example: str) -> list[int]:
    parts = arg.split(",")
    if len(parts) != count or not all(p.strip().isdigit() for p in parts):
        raise GradshardError(f"reducer {text!r} needs {count} whole number(s) after ':', e.g. {example!r}")
    return [int(p) for p in parts]


def parse_reducer(text: str) -> ReducerSpec:
    """The :class:`ReducerSpec` of ``mean``, ``coverage-mean``, ``median``, ``trimmed-mean:<beta>``, ``krum:<f>``,
    ``multi-krum:<f>,<k>`` or ``bulyan:<f>``."""
    name, sep, arg = text.strip().partition(":")
    hint = f"known reducers: {', '.join(KNOWN_REDUCERS)}"
    if name not in get_args(ReducerName):
        raise GradshardError(f"unknown reducer {text!r}; {hint}")
    params: dict[str, int] = {}
    beta = 0.0
    if name in SELECTING:
        example = {"krum": "krum:1", "multi-krum": "multi-krum:1,5", "bulyan": "bulyan:1"}[name]
        if not sep:
            raise GradshardError(f"reducer {text!r} needs the number of Byzantine clients it tolerates, e.g. "
                                 f"{example!r}")
        values = _integers(text, arg, 2 if name == "multi-krum" else 1, example)
        params = {"f": values[0], **({"k": values[1]} if name == "multi-krum" else {})}
    elif name == "secagg":
        if not sep:
            raise GradshardError(f"reducer {text!r} needs the clients' fixed-point fraction bits, e.g. 'secagg:16'")
        params = {"bits": _integers(text, arg, 1, "secagg:16")[0]}
    elif name == "trimmed-mean":
        if not sep:
            raise GradshardError(f"reducer {text!r} needs the fraction cut at each end, e.g. 'trimmed-mean:0.1'")
        try:
            beta = float(arg)
        except ValueError:
            raise GradshardError(f"reducer {text!r}: {arg!r} is not a number; e.g. 'trimmed-mean:0.1'") from None
    elif sep:
        raise GradshardError(f"reducer {name!r} takes no parameter, got {text!r}; {hint}")
    try:
        return ReducerSpec.model_validate({"name": name, "beta": beta, **params})
    except ValidationError as exc:
        message = str(exc.errors()[0]['msg']).removeprefix('Value error, ')
        raise GradshardError(f"reducer {text!r}: {message}; {hint}") from None


def trim_count(beta: float, clients: int) -> int:
    """``k = floor(β·N)``, with ``β·N`` evaluated in float64 (so 0.3·10 = 3); at least one value must remain."""
    k = math.floor(beta * clients)
    if clients - 2 * k < 1:
        raise GradshardError(f"trimmed-mean:{beta!r} over N={clients} clients cuts k={k} at each end and leaves "
                             f"{clients - 2 * k} values; use a smaller beta or more clients")
    return k


def _as_float(weight: float) -> float:
    """``float(weight)``, or NaN for what has no float value (an int beyond the float range)."""
    try:
        return float(weight)
    except (OverflowError, TypeError, ValueError):
        return math.nan


def normalised_weights(weights: Sequence[float]) -> list[float]:
    """``wᵢ / Σw`` in float64 (the sum by ``math.fsum``): equal to ``fedavg_weights`` for example counts.

    Never overflows: when the sum of finite weights exceeds the float range (server weights near 1.8e308), all are
    first scaled by one power of two, which is exact (but for weights under 2^-1000 of the largest, which become
    negligible either way), so each is still ``wᵢ / Σw`` rounded once."""
    if not weights:
        raise GradshardError("a reducer needs at least one client weight")
    values = [_as_float(w) for w in weights]
    if not all(math.isfinite(w) and w > 0 for w in values):
        raise GradshardError(f"client weights must be finite and > 0, got {values[:8]}")
    try:
        total = math.fsum(values)
    except OverflowError:  # an intermediate partial sum overflowed
        total = math.inf
    if math.isinf(total):
        shift = math.frexp(max(values))[1] + len(values).bit_length()
        values = [math.ldexp(w, -shift) for w in values]
        total = math.fsum(values)
    return [w / total for w in values]


def _dtypes(in_dtype: npt.DTypeLike, accumulate: str) -> tuple[np.dtype[Any], np.dtype[Any]]:
    dtype = np.dtype(in_dtype)
    if dtype.name not in UPDATE_DTYPES:
        raise GradshardError(f"input dtype must be one of {UPDATE_DTYPES}, got {dtype.name!r}")
    if accumulate not in ACCUMULATE_DTYPES:
        raise GradshardError(f"accumulation dtype must be one of {ACCUMULATE_DTYPES}, got {accumulate!r}")
    return dtype, np.dtype(accumulate)


def _check_finite(x: npt.NDArray[Any], index: int) -> None:
    """Raise :class:`NonFiniteInput` if ``x`` has NaN or ±inf. One sum; min and max only if the sum is not finite
    (it may overflow on large finite values); nothing of the window's size is allocated."""
    with np.errstate(over="ignore"):
        if np.isfinite(x.sum()):
            return
    if not (np.isfinite(x.min()) and np.isfinite(x.max())):  # min and max propagate NaN
        raise NonFiniteInput(index)


# --- the contract ------------------------------------------------------------------------------------------------
class Reducer(ABC):
    """A pure kernel that reduces N clients' windows element by element (see the module docstring).

    ``add`` and ``skip`` take clients in canonical order, each exactly once per window; ``finish`` needs all N.
    ``weights`` are the raw per-client scalars (examples) in canonical order; they also fix N.
    """

    name: ClassVar[str]
    holds_all_clients: ClassVar[bool]  # order statistics need the N windows at once
    uses_coverage: ClassVar[bool]

    @classmethod
    @abstractmethod
    def memory_bytes(cls, spec: ReducerSpec, *, clients: int, window_elems: int, itemsize: int, accumulate: str,
                     parallel_reads: int = 1) -> int:
        """Bytes of the buffers an instance allocates (``itemsize``: of the input dtype)."""

    def __init__(self, spec: ReducerSpec, *, weights: Sequence[float], capacity: int, in_dtype: npt.DTypeLike,
                 accumulate: str, parallel_reads: int = 1, scales: Sequence[float] | None = None) -> None:
        if spec.name != self.name:
            raise GradshardError(f"{type(self).__name__} implements {self.name!r}, got spec {spec.text!r}")
        if capacity < 1:
            raise GradshardError(f"window capacity must be at least one element, got {capacity}")
        if parallel_reads < 1:
            raise GradshardError(f"parallel_reads must be at least 1, got {parallel_reads}")
        self.spec = spec
        self.in_dtype, self.dtype = _dtypes(in_dtype, accumulate)
        self.weights = normalised_weights(weights)
        if scales is not None:  # central DP: clip factors (times N / the expected N) applied after normalising
            if len(scales) != len(self.weights) or not all(math.isfinite(s) and s >= 0 for s in scales):
                raise GradshardError(f"scales must be {len(self.weights)} finite values >= 0, got {list(scales)[:8]}")
            self.weights = [w * s for w, s in zip(self.weights, scales, strict=True)]
        self.clients = len(self.weights)
        self.capacity = capacity
        self._n = 0
        self._next = 0
        self._open = False

    @property
    def window(self) -> int:
        """Elements in the current window."""
        return self._n

    def start(self, n: int, offset: int = 0) -> None:
        """Begin a window of ``n`` elements (``1 <= n <= capacity``) that starts at element ``offset`` of the flat
        vector (only kernels whose result depends on the position read it: secagg's masks)."""
        if not 1 <= n <= self.capacity:
            raise GradshardError(f"{self.name}: a window of {n} elements does not fit the buffers of {self.capacity}")
        self._n, self._next, self._open, self._offset = n, 0, True, offset
        self._start(n)

    @abstractmethod
    def buffer(self, i: int) -> npt.NDArray[Any]:
        """Where the caller reads client ``i``'s window (``window`` elements of the input dtype)."""

    def add(self, i: int, covered: npt.NDArray[np.bool_] | None = None) -> None:
        """Client ``i``'s buffer is filled; ``covered``: which elements of the window client ``i`` trained."""
        self._turn(i)
        if covered is not None:
            if covered.dtype != np.bool_ or covered.shape != (self._n,):
                raise GradshardError(f"{self.name}: coverage of client {i} must be {self._n} booleans, "
                                     f"got {covered.shape} {covered.dtype}")
            if not self.uses_coverage and not covered.all():
                raise GradshardError(f"reducer {self.name!r} averages every element over all clients but client "
                                     f"{i} covers only part of the window; use 'coverage-mean'")
        self._add(i, covered)
        self._next += 1

    def skip(self, i: int) -> None:
        """Client ``i`` has nothing in this window (coverage reducers only)."""
        if not self.uses_coverage:
            raise GradshardError(f"reducer {self.name!r} needs every client in every window; client {i} was skipped")
        self._turn(i)
        self._next += 1

    def finish(self, load_previous: LoadPrevious | None = None) -> npt.NDArray[Any]:
        """The window's result in the accumulation dtype, a view of an internal buffer.

        ``load_previous(out)`` fills ``out`` with the previous global values of the window; coverage reducers call
        it only if some element is uncovered. ``None`` means the previous values are 0 (the updates are deltas).
        """
        if not self._open or self._next != self.clients:
            raise GradshardError(f"{self.name}: finish() after {self._next} of {self.clients} clients; add or skip "
                                 f"every client of the window first")
        self._open = False
        return self._finish(load_previous)

    def _turn(self, i: int) -> None:
        if not self._open:
            raise GradshardError(f"{self.name}: client {i} added outside a window; call start(n) first")
        if i != self._next:
            raise GradshardError(f"{self.name}: client {i} out of order; expected client position {self._next} "
                                 f"(canonical order, each client once per window)")

    def _check_index(self, i: int) -> None:
        if not self._open or not 0 <= i < self.clients:
            raise GradshardError(f"{self.name}: no buffer for client {i} (N={self.clients}, window open: "
                                 f"{self._open})")

    def _start(self, n: int) -> None:  # noqa: B027  # optional hook
        """Prepare the buffers for a window of ``n`` elements."""

    @abstractmethod
    def _add(self, i: int, covered: npt.NDArray[np.bool_] | None) -> None: ...

    @abstractmethod
    def _finish(self, load_previous: LoadPrevious | None) -> npt.NDArray[Any]: ...


# --- weighted means ----------------------------------------------------------------------------------------------
def _read_buffers(clients: int, parallel_reads: int) -> int:
    return min(parallel_reads, clients)


class _PreallocatedSum(WeightedSum):
    """:class:`WeightedSum` with its cast scratch buffer allocated up front instead of on the first cast."""

    def __init__(self, capacity: int, accumulate: str, scratch: bool) -> None:
        super().__init__(capacity, accumulate)
        if scratch:
            self._tmp = np.empty(capacity, dtype=self.dtype)


class _BufferedReducer(Reducer):
    """A reducer that reads clients into k rotating read buffers: ``buffer(i)`` is buffer ``i % k``, so a batch of
    k clients is read at once and then added in order."""

    _bufs: npt.NDArray[Any]

    def _read_buffers(self, capacity: int, parallel_reads: int) -> npt.NDArray[Any]:
        return np.empty((_read_buffers(self.clients, parallel_reads), capacity), dtype=self.in_dtype)

    def buffer(self, i: int) -> npt.NDArray[Any]:
        self._check_index(i)
        return self._bufs[i % len(self._bufs), : self._n]


class MeanReducer(_BufferedReducer):
    """FedAvg: ``acc = w_0·x_0; acc += w_i·x_i`` in client order, exactly today's :class:`WeightedSum` bytes.

    ``w_i = n_i / Σn`` in float64, rounded once to the accumulation dtype. With ``parallel_reads`` k there are k
    read buffers, ``buffer(i)`` is buffer ``i % k``: fill a batch of k clients, then add them in order (``add``
    scales the buffer in place, so refill it only after its client was added).

    Memory: ``k·window·itemsize`` (read buffers) + ``window·acc`` (sum) + ``window·acc`` when the input dtype
    differs from the accumulation dtype and N ≥ 2 (the products are rounded there, not in the read buffer).
    """

    name: ClassVar[str] = "mean"
    holds_all_clients: ClassVar[bool] = False
    uses_coverage: ClassVar[bool] = False

    @classmethod
    def memory_bytes(cls, spec: ReducerSpec, *, clients: int, window_elems: int, itemsize: int, accumulate: str,
                     parallel_reads: int = 1) -> int:
        acc = np.dtype(accumulate).itemsize
        scratch = acc if itemsize != acc and clients >= 2 else 0  # float dtypes differ iff their itemsizes do
        return window_elems * (_read_buffers(clients, parallel_reads) * itemsize + acc + scratch)

    def __init__(self, spec: ReducerSpec, *, weights: Sequence[float], capacity: int, in_dtype: npt.DTypeLike,
                 accumulate: str, parallel_reads: int = 1, scales: Sequence[float] | None = None) -> None:
        super().__init__(spec, weights=weights, capacity=capacity, in_dtype=in_dtype, accumulate=accumulate,
                         parallel_reads=parallel_reads, scales=scales)
        self._bufs = self._read_buffers(capacity, parallel_reads)
        self._sum = _PreallocatedSum(capacity, accumulate, scratch=self.in_dtype != self.dtype and self.clients >= 2)

    def _start(self, n: int) -> None:
        self._sum.start(n)


    def _add(self, i: int, covered: npt.NDArray[np.bool_] | None) -> None:
        self._sum.add(self._bufs[i % len(self._bufs), : self._n], self.weights[i])

    def _finish(self, load_previous: LoadPrevious | None) -> npt.NDArray[Any]:
        return self._sum.value


class CoverageMeanReducer(_BufferedReducer):
    """``θ_j = Σ w_i·x_ij / Σ w_i`` over the clients covering element j; the previous value where nobody does.

    Weights are normalised as for ``mean`` (``n_i / Σn``, so the sums cannot overflow) and rounded once to the
    accumulation dtype. Per window, with ``num`` and ``den`` zero-initialised, each client in order folds in
    ``p = x·w`` (rounded to the accumulation dtype), ``num += p`` and ``den += w``, all with ``where=covered``
    (no mask: the whole window). Then ``num /= den`` where ``den > 0`` and the rest takes the previous value.

    Memory: ``k·window·itemsize`` (read buffers) + ``2·window·acc`` (``num``, ``den``) + ``window`` (a bool mask)
    + ``window·acc`` when the input dtype differs from the accumulation dtype (the products).
    """

    name: ClassVar[str] = "coverage-mean"
    holds_all_clients: ClassVar[bool] = False
    uses_coverage: ClassVar[bool] = True

    @classmethod
    def memory_bytes(cls, spec: ReducerSpec, *, clients: int, window_elems: int, itemsize: int, accumulate: str,
                     parallel_reads: int = 1) -> int:
        acc = np.dtype(accumulate).itemsize
        scratch = acc if itemsize != acc else 0
        return window_elems * (_read_buffers(clients, parallel_reads) * itemsize + 2 * acc + 1 + scratch)

    def __init__(self, spec: ReducerSpec, *, weights: Sequence[float], capacity: int, in_dtype: npt.DTypeLike,
                 accumulate: str, parallel_reads: int = 1) -> None:
        super().__init__(spec, weights=weights, capacity=capacity, in_dtype=in_dtype, accumulate=accumulate,
                         parallel_reads=parallel_reads)
        self._w = [self.dtype.type(w) for w in self.weights]
        if not all(w > 0 for w in self._w):
            raise GradshardError(f"coverage-mean: client weights {list(weights)[:8]} are too unequal; the smallest "
                                 f"rounds to 0 in {self.dtype.name}; accumulate in float64")
        self._bufs = self._read_buffers(capacity, parallel_reads)
        self._num = np.empty(capacity, dtype=self.dtype)
        self._den = np.empty(capacity, dtype=self.dtype)
        self._mask = np.empty(capacity, dtype=np.bool_)
        # zeroed: with where=, the cast loop also reads and writes back the masked-out elements
        self._prod = np.zeros(capacity, dtype=self.dtype) if self.in_dtype != self.dtype else None

    def _start(self, n: int) -> None:
        self._num[:n] = 0
        self._den[:n] = 0


    def _add(self, i: int, covered: npt.NDArray[np.bool_] | None) -> None:
        n, w = self._n, self._w[i]
        x = self._bufs[i % len(self._bufs), :n]
        prod = x if self._prod is None else self._prod[:n]  # same dtype: scale the read buffer in place
        num, den = self._num[:n], self._den[:n]
        if covered is None:
            np.multiply(x, w, out=prod)
            np.add(num, prod, out=num)
            np.add(den, w, out=den)
        else:
            np.multiply(x, w, out=prod, where=covered)
            np.add(num, prod, out=num, where=covered)
            np.add(den, w, out=den, where=covered)

    def _finish(self, load_previous: LoadPrevious | None) -> npt.NDArray[Any]:
        n = self._n
        num, den = self._num[:n], self._den[:n]
        if den.min() > 0:  # every element covered
            np.divide(num, den, out=num)
            return num
        mask = self._mask[:n]
        np.greater(den, 0, out=mask)
        np.divide(num, den, out=num, where=mask)  # uncovered elements keep num = 0
        if load_previous is not None:
            load_previous(den)  # den is free now: it receives the previous values
            np.logical_not(mask, out=mask)
            np.copyto(num, den, where=mask)
        return num


# --- order statistics --------------------------------------------------------------------------------------------
class _StackReducer(Reducer):
    """Holds the N windows in one ``(N, capacity)`` buffer (row i is client i) and one output of the window.

    Unweighted: the weights only fix N. ``add`` rejects NaN and ±inf (:class:`NonFiniteInput`), since an order
    statistic would otherwise pass them on silently. The rows are reordered in place along axis 0 (no stacked
    copy). Memory: ``N·window·itemsize + window·acc`` ≤ ``(N + 2)·window·itemsize`` for float32 accumulation; no
    cast buffer when the input dtype differs (the ufuncs cast through numpy's fixed-size internal buffers).
    """

    holds_all_clients: ClassVar[bool] = True
    uses_coverage: ClassVar[bool] = False

    @classmethod
    def memory_bytes(cls, spec: ReducerSpec, *, clients: int, window_elems: int, itemsize: int, accumulate: str,
                     parallel_reads: int = 1) -> int:
        cls._check_clients(spec, clients)
        return window_elems * (clients * itemsize + np.dtype(accumulate).itemsize)

    @classmethod
    def _check_clients(cls, spec: ReducerSpec, clients: int) -> None:
        """Raise if the reducer cannot reduce ``clients`` values."""

    def __init__(self, spec: ReducerSpec, *, weights: Sequence[float], capacity: int, in_dtype: npt.DTypeLike,
                 accumulate: str, parallel_reads: int = 1) -> None:
        super().__init__(spec, weights=weights, capacity=capacity, in_dtype=in_dtype, accumulate=accumulate,
                         parallel_reads=parallel_reads)
        self._check_clients(spec, self.clients)
        self._stack = np.empty((self.clients, capacity), dtype=self.in_dtype)
        self._out = np.empty(capacity, dtype=self.dtype)
        self._zero = self.dtype.type(0)

    def buffer(self, i: int) -> npt.NDArray[Any]:
        self._check_index(i)
        return self._stack[i, : self._n]

    def _add(self, i: int, covered: npt.NDArray[np.bool_] | None) -> None:
        _check_finite(self._stack[i, : self._n], i)


class MedianReducer(_StackReducer):
    """Coordinate-wise median (unweighted), equal to ``np.median(stack, axis=0)`` byte for byte.

    numpy partitions along axis 0 and takes the mean of the middle row (odd N) or two rows (even N): a sum that
    starts at +0.0, then a division by the count. Here: ``partition(N // 2, axis=0)`` in place, then in the
    accumulation dtype odd N ``0 + x_mid``, even N ``((max(rows below the middle) + 0) + x_mid) / 2``. The order
    statistics are the same values (the input is finite; only tied zeros may differ in sign, and a sum started at
    +0.0 never yields -0.0), and the sum is the same, so are the bytes. (numpy divides by the integer count in float64
    and rounds; halving is exact in either precision.) One kth instead of numpy's three is 3–4× faster for N = 16.
    For float16 input with float32 accumulation the result is ``np.median(stack.astype(float32), axis=0)``.
    """

    name: ClassVar[str] = "median"

    def _finish(self, load_previous: LoadPrevious | None) -> npt.NDArray[Any]:
        n, size = self._n, self.clients
        rows, out = self._stack[:, :n], self._out[:n]
        half = size // 2
        if size > 1:
            rows.partition(half, axis=0)
        if size % 2 == 1:
            np.add(rows[half], self._zero, out=out, dtype=self.dtype)
        else:
            np.maximum.reduce(rows[:half], axis=0, out=out, dtype=self.dtype)  # the lower middle value
            np.add(out, self._zero, out=out)
            np.add(out, rows[half], out=out, dtype=self.dtype)
            np.divide(out, self.dtype.type(2), out=out)
        return out


class TrimmedMeanReducer(_StackReducer):
    """Coordinate-wise trimmed mean (unweighted): drop the ``k = floor(β·N)`` smallest and largest values.

    The N values of each element are sorted in place (``sort(axis=0)``), then summed sequentially in sorted order
    in the accumulation dtype starting from +0.0, ``acc = ((0 + s_k) + s_{k+1}) + … + s_{N-k-1}``, and divided by
    ``N − 2k``: the same operations as ``np.mean(np.sort(stack, axis=0)[k:N-k], axis=0)``. Needs ``N − 2k ≥ 1``.
    """

    name: ClassVar[str] = "trimmed-mean"

    @classmethod
    def _check_clients(cls, spec: ReducerSpec, clients: int) -> None:
        trim_count(spec.beta, clients)

    def _finish(self, load_previous: LoadPrevious | None) -> npt.NDArray[Any]:
        n, size = self._n, self.clients
        k = trim_count(self.spec.beta, size)
        rows, out = self._stack[:, :n], self._out[:n]
        if size > 1:
            rows.sort(axis=0)
        np.add(rows[k], self._zero, out=out, dtype=self.dtype)
        for j in range(k + 1, size - k):
            np.add(out, rows[j], out=out, dtype=self.dtype)
        if size - 2 * k > 1:
            np.divide(out, self.dtype.type(size - 2 * k), out=out)
        return out


class KrumReducer(MeanReducer):
    """Phase 2 of ``krum:f``: the mean over the one selected client (its update, rounded once to the accumulation
    dtype by a weight of 1)."""

    name: ClassVar[str] = "krum"


class MultiKrumReducer(MeanReducer):
    """Phase 2 of ``multi-krum:f,k``: the weighted mean over the k selected clients."""

    name: ClassVar[str] = "multi-krum"


class FLTrustReducer(MeanReducer):
    """Phase 2 of ``fltrust``: the weighted mean with the trust scores as weights and ``‖g₀‖/‖gᵢ‖`` as scales (set
    on the manifest by phase 1)."""

    name: ClassVar[str] = "fltrust"


class BulyanReducer(_StackReducer):
    """Phase 2 of ``bulyan:f``: per element, the mean of the ``β = θ − 2f`` values closest to the median of the θ
    selected clients' values (unweighted; Bulyan's coordinate-wise rule, as Flower's ``aggregate_bulyan``).

    The θ values are sorted in place; the β closest to the median are a run of consecutive sorted values, the run
    ``[s, s + β)`` with the smallest ``max(median − v_s, v_{s+β−1} − median)`` (ties: the lowest s). Its values
    are summed in sorted order from +0.0 in the accumulation dtype and divided by β. Memory as ``median`` plus one
    window of start indices and one of costs per candidate run (``2f + 1`` of them)."""

    name: ClassVar[str] = "bulyan"

    @classmethod
    def _check_clients(cls, spec: ReducerSpec, clients: int) -> None:
        if clients - 2 * spec.f < 1:
            raise GradshardError(f"bulyan:{spec.f} averages θ − 2f values of the θ = {clients} selected clients: "
                                 f"none would remain; use a smaller f or more clients")

    @classmethod
    def memory_bytes(cls, spec: ReducerSpec, *, clients: int, window_elems: int, itemsize: int, accumulate: str,
                     parallel_reads: int = 1) -> int:
        base = super().memory_bytes(spec, clients=clients, window_elems=window_elems, itemsize=itemsize,
                                    accumulate=accumulate, parallel_reads=parallel_reads)
        return base + window_elems * (4 * 8 + 3 * 8 + itemsize + 1)  # 4 float64, 3 int64, gathered, a mask

    def __init__(self, spec: ReducerSpec, *, weights: Sequence[float], capacity: int, in_dtype: npt.DTypeLike,
                 accumulate: str, parallel_reads: int = 1) -> None:
        super().__init__(spec, weights=weights, capacity=capacity, in_dtype=in_dtype, accumulate=accumulate,
                         parallel_reads=parallel_reads)
        self._median, self._best, self._cost, self._other = np.empty((4, capacity), dtype=np.float64)
        self._start_at, self._index = np.empty((2, capacity), dtype=np.int64)
        self._columns = np.arange(capacity, dtype=np.int64)
        self._gathered = np.empty(capacity, dtype=self.in_dtype)

    def _run_cost(self, s: int, beta: int, n: int, out: npt.NDArray[np.float64]) -> None:
        """``max(median − v_s, v_{s+β−1} − median)`` per element: how far the run ``[s, s + β)`` reaches."""
        rows, median, other = self._stack, self._median[:n], self._other[:n]
        np.subtract(median, rows[s, :n], out=out, dtype=np.float64)
        np.subtract(rows[s + beta - 1, :n], median, out=other, dtype=np.float64)
        np.maximum(out, other, out=out)

    def _finish(self, load_previous: LoadPrevious | None) -> npt.NDArray[Any]:
        n, size = self._n, self.clients
        beta = size - 2 * self.spec.f
        rows, out, median = self._stack[:, :n], self._out[:n], self._median[:n]
        if size > 1:
            rows.sort(axis=0)
        half = size // 2
        if size % 2:
            np.copyto(median, rows[half], casting="safe")
        else:
            np.add(rows[half - 1], rows[half], out=median, dtype=np.float64)
            np.multiply(median, 0.5, out=median)
        start, best, cost = self._start_at[:n], self._best[:n], self._cost[:n]
        start.fill(0)
        self._run_cost(0, beta, n, best)
        for s in range(1, size - beta + 1):
            self._run_cost(s, beta, n, cost)
            start[cost < best] = s
            np.minimum(best, cost, out=best)
        flat, index, gathered = self._stack.reshape(-1), self._index[:n], self._gathered[:n]
        for j in range(beta):  # row start + j of each column, in sorted order
            np.add(start, j, out=index)
            np.multiply(index, self.capacity, out=index)
            np.add(index, self._columns[:n], out=index)
            np.take(flat, index, out=gathered)
            if j == 0:
                np.add(gathered, self._zero, out=out, dtype=self.dtype)
            else:
                np.add(out, gathered, out=out, dtype=self.dtype)
        if beta > 1:
            np.divide(out, self.dtype.type(beta), out=out)
        return out


class SecAggReducer(_BufferedReducer):
    """Phase 2 of ``secagg:s``: the clients' masked uint32 words (read bit for bit into the float32 buffers) summed
    modulo 2³², each window's masks removed (``masks``: the ``(key, sign)`` terms phase 1 reconstructed; each
    regenerates exactly the window's elements, :func:`gradshard.security.secagg.mask_slice`), the result read as
    int32 and divided by ``2^s·N`` in float64 (``2^s·Σwᵢ`` when the clients masked weighted updates,
    ``total_weight``), rounded once to the accumulation dtype. Integer sums are associative: the same words for every
    M, window and order.

    Memory: the read buffers, one uint32 sum, one output window, and one mask slice at a time (its keystream bytes,
    about three windows of uint32 while it is made).
    """

    name: ClassVar[str] = "secagg"
    holds_all_clients: ClassVar[bool] = False
    uses_coverage: ClassVar[bool] = False

    @classmethod
    def memory_bytes(cls, spec: ReducerSpec, *, clients: int, window_elems: int, itemsize: int, accumulate: str,
                     parallel_reads: int = 1) -> int:
        acc = np.dtype(accumulate).itemsize
        return window_elems * (_read_buffers(clients, parallel_reads) * itemsize + 4 + acc + 3 * 4)  # + mask bytes

    def __init__(self, spec: ReducerSpec, *, weights: Sequence[float], capacity: int, in_dtype: npt.DTypeLike,
                 accumulate: str, parallel_reads: int = 1, masks: Sequence[tuple[str, int]] = (),
                 mask_round: int = 0, total_weight: float | None = None) -> None:
        super().__init__(spec, weights=weights, capacity=capacity, in_dtype=in_dtype, accumulate=accumulate,
                         parallel_reads=parallel_reads)
        if self.in_dtype.itemsize != 4:
            raise GradshardError(f"secagg reads 32-bit words; the round's dtype is {self.in_dtype.name}")
        self.masks, self.mask_round = list(masks), mask_round
        self.total_weight = total_weight  # the clients masked weighted updates: the sum is divided by this
        self._bufs = self._read_buffers(capacity, parallel_reads)
        self._sum = np.empty(capacity, dtype=np.uint32)
        self._out = np.empty(capacity, dtype=self.dtype)

    def _add(self, i: int, covered: npt.NDArray[np.bool_] | None) -> None:
        words = self._bufs[i % len(self._bufs), : self._n].view(np.uint32)
        total = self._sum[: self._n]
        if self._next == 0:
            np.copyto(total, words)
        else:
            np.add(total, words, out=total)  # wraps modulo 2^32

    def _finish(self, load_previous: LoadPrevious | None) -> npt.NDArray[Any]:
        total, out = self._sum[: self._n], self._out[: self._n]
        remove_masks(total, self._offset, self.masks, self.mask_round)
        denominator = self.clients if self.total_weight is None else self.total_weight
        np.divide(total.view(np.int32), float(2**self.spec.bits) * denominator, out=out, dtype=np.float64,
                  casting="unsafe")
        return out


REDUCERS: dict[str, type[Reducer]] = {
    cls.name: cls for cls in (MeanReducer, CoverageMeanReducer, MedianReducer, TrimmedMeanReducer, KrumReducer,
                              MultiKrumReducer, BulyanReducer, FLTrustReducer, SecAggReducer)
}


def make_reducer(spec: ReducerSpec | str, **kwargs: Any) -> Reducer:
    """The reducer of ``spec`` (a :class:`ReducerSpec` or its text); ``kwargs`` as for :class:`Reducer`."""
    if isinstance(spec, str):
        spec = parse_reducer(spec)
    return REDUCERS[spec.name](spec, **kwargs)
