"""Pure aggregation kernels: no I/O, preallocated buffers, in-place arithmetic.

FedAvg over a window of elements is ``acc = w_0·x_0; acc += w_i·x_i`` for the clients in canonical order (sorted
id), with ``w_i = n_i / Σ n`` computed in float64 and rounded once to the accumulation dtype. Every step is an
element-wise IEEE operation, so the result for an element does not depend on which window, shard or process
computed it: that is what makes GradsSharding bit-identical to a flat reduction. Summing in another client order
or as partial sums (trees) changes rounding and agrees only to float tolerance.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from gradshard.errors import GradshardError

ACCUMULATE_DTYPES = ("float32", "float64")
# The most examples one client may report per round. Counts, their sums over up to ~9,000 clients and the weights
# computed from them stay exact in float64 (below 2^53), and a count that big is a lie or a bug anyway.
MAX_EXAMPLES = 10**12
WEIGHTINGS = ("examples", "uniform", "server")  # server: weights set per client by the server


def fedavg_weights(examples: Sequence[int], weighting: str = "examples") -> list[float]:
    """Normalised client weights (float64): by number of examples, or uniform."""
    if weighting not in ("examples", "uniform"):  # 'server' weights live in the manifest, not in example counts
        raise GradshardError(f"fedavg_weights computes 'examples' or 'uniform' weights, got {weighting!r}")
    if not examples:
        raise GradshardError("cannot average zero clients")
    if any(not 1 <= n <= MAX_EXAMPLES for n in examples):
        shown = ", ".join(str(n) if len(str(n)) < 20 else f"{str(n)[:4]}...({len(str(n))} digits)" for n in examples)
        raise GradshardError(f"every client needs at least 1 and at most {MAX_EXAMPLES} examples, got [{shown}]")
    counts = [1] * len(examples) if weighting == "uniform" else list(examples)
    total = float(sum(counts))  # exact: the sum of at most ~9,000 counts below 10^12 is below 2^53
    return [c / total for c in counts]


class WeightedSum:
    """Running weighted sum over one window, reusing its buffers for every window of a shard.

    ``add`` must be called with clients in canonical order; the first call of a window overwrites, so no zeroing
    pass is needed. A writeable ``x`` may be scaled in place (it is the caller's read buffer); a read-only one
    (a zero-copy view of the page cache) is scaled into a scratch buffer instead.
    """

    def __init__(self, capacity: int, accumulate: str = "float32") -> None:
        if accumulate not in ACCUMULATE_DTYPES:
            raise GradshardError(f"accumulation dtype must be one of {ACCUMULATE_DTYPES}, got {accumulate!r}")
        self.dtype = np.dtype(accumulate)
        self._acc = np.empty(capacity, dtype=self.dtype)
        self._tmp: npt.NDArray[Any] | None = None
        self._n = 0
        self._count = 0

    def start(self, n: int) -> None:
        """Begin a window of ``n`` elements."""
        if n > len(self._acc):
            raise GradshardError(f"window of {n} elements exceeds the buffer of {len(self._acc)}")
        self._n, self._count = n, 0

    def add(self, x: npt.NDArray[Any], weight: float) -> None:
        """Fold in ``weight · x`` (``len(x)`` must equal the window)."""
        if len(x) != self._n:
            raise GradshardError(f"got {len(x)} elements for a window of {self._n}")
        acc = self._acc[: self._n]
        w = self.dtype.type(weight)
        if self._count == 0:
            np.multiply(x, w, out=acc)
        elif x.dtype == self.dtype and x.flags.writeable:
            np.multiply(x, w, out=x)
            np.add(acc, x, out=acc)
        else:
            if self._tmp is None:
                self._tmp = np.empty(len(self._acc), dtype=self.dtype)
            tmp = self._tmp[: self._n]
            np.multiply(x, w, out=tmp)
            np.add(acc, tmp, out=acc)
        self._count += 1

    @property
    def value(self) -> npt.NDArray[Any]:
        """The current window's sum (a view of the internal buffer)."""
        if self._count == 0:
            raise GradshardError("no client was added to this window")
        return self._acc[: self._n]


def all_finite(x: npt.NDArray[Any]) -> bool:
    """Whether every element is finite. Fast path: one sum (NaN and ±inf propagate into it)."""
    if np.isfinite(np.sum(x)):
        return True
    return bool(np.isfinite(x).all())  # the sum may overflow for large finite values


def fedavg(vectors: Sequence[npt.NDArray[Any]], weights: Sequence[float], accumulate: str = "float32",
           ) -> npt.NDArray[Any]:
    """Reference FedAvg of whole vectors in the given order (the flat, single-aggregator computation)."""
    if len(vectors) != len(weights) or not vectors:
        raise GradshardError("need one weight per vector and at least one vector")
    acc = WeightedSum(len(vectors[0]), accumulate)
    acc.start(len(vectors[0]))
    for x, w in zip(vectors, weights, strict=True):
        acc.add(np.array(x, copy=True), w)
    return acc.value.copy()
