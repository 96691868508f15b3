"""Byzantine-robust client selection from a matrix of squared distances: Krum, Multi-Krum and Bulyan's selection.

Pure functions on the exact N×N matrix ``D`` (float64, ``D[i, j] = ‖xᵢ − xⱼ‖²``, clients in canonical order) that
the driver assembles from the shard functions' per-chunk partials (:mod:`gradshard.aggregation.distances`). Ties are
broken by canonical position (the lower index wins), so a selection never depends on sort stability.

- **Krum** (Blanchard et al., 2017): the score of client i is the sum of its ``n − f − 2`` smallest distances to the
  others; the client with the lowest score is selected. Needs ``n ≥ 2f + 3``.
- **Multi-Krum**: the ``k`` clients with the lowest Krum scores, averaged (weighted as the round weights them).
- **Bulyan** (El Mhamdi et al., 2018): ``θ = n − 2f`` clients chosen by Krum one after another (each time among the
  clients not chosen yet, scores recomputed on that subset); then, element by element, the mean of the
  ``β = θ − 2f`` values closest to the median (:class:`gradshard.core.reducers.ClosestToMedian`). Needs
  ``n ≥ 4f + 3``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from gradshard.errors import PlanError

Matrix = npt.NDArray[np.float64]


def check_matrix(d: Matrix) -> None:
    """Refuse what is not a symmetric N×N matrix of finite, non-negative distances with a zero diagonal."""
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise PlanError(f"a distance matrix is N×N, got shape {d.shape}")
    if not np.isfinite(d).all() or (d < 0).any():
        raise PlanError("squared distances must be finite and non-negative")
    if (np.diag(d) != 0).any() or not np.array_equal(d, d.T):
        raise PlanError("a distance matrix is symmetric with a zero diagonal")


def krum_scores(d: Matrix, f: int) -> list[float]:
    """Each client's Krum score: the sum of its ``max(1, n − f − 2)`` smallest distances to the other clients."""
    n = len(d)
    if n < 2:
        raise PlanError(f"Krum compares clients with each other: it needs at least 2, got {n}")
    closest = max(1, n - f - 2)
    scores = []
    for i in range(n):
        others = np.sort(np.delete(d[i], i))
        scores.append(float(np.sum(others[:closest])))
    return scores


def _ranked(scores: list[float]) -> list[int]:
    """Positions by increasing score, ties by position."""
    return sorted(range(len(scores)), key=lambda i: (scores[i], i))


def _check_clients(rule: str, n: int, f: int, factor: int) -> None:
    """``rule`` tolerates f Byzantine clients among n only if ``n ≥ factor·f + 3``."""
    if f < 0:
        raise PlanError(f"the number of Byzantine clients f must be at least 0, got {f}")
    if n < factor * f + 3:
        raise PlanError(f"{rule} with f = {f} needs at least {factor}f + 3 = {factor * f + 3} clients, this round "
                        f"has {n}; lower f to at most {max(0, (n - 3) // factor)}")


def check_krum(n: int, f: int) -> None:
    _check_clients("Krum", n, f, 2)


def krum(d: Matrix, f: int) -> list[int]:
    """The one client Krum selects (as a one-element list)."""
    check_krum(len(d), f)
    return _ranked(krum_scores(d, f))[:1]


def multi_krum(d: Matrix, f: int, k: int) -> list[int]:
    """The ``k`` clients with the lowest Krum scores, in canonical order."""
    check_krum(len(d), f)
    if not 1 <= k <= len(d):
        raise PlanError(f"Multi-Krum keeps k clients with 1 <= k <= n = {len(d)}, got k = {k}")
    return sorted(_ranked(krum_scores(d, f))[:k])


def check_bulyan(n: int, f: int) -> None:
    _check_clients("Bulyan", n, f, 4)


def bulyan(d: Matrix, f: int) -> list[int]:
    """The ``θ = n − 2f`` clients Bulyan's iterated Krum selects, in canonical order."""
    n = len(d)
    check_bulyan(n, f)
    remaining = list(range(n))
    chosen: list[int] = []
    for _ in range(n - 2 * f):
        sub = d[np.ix_(remaining, remaining)]
        best = _ranked(krum_scores(sub, f))[0] if len(remaining) > 1 else 0
        chosen.append(remaining.pop(best))
    return sorted(chosen)


def bulyan_beta(n: int, f: int) -> int:
    """How many values per element Bulyan averages: ``β = θ − 2f = n − 4f`` (of the θ selected)."""
    check_bulyan(n, f)
    return n - 4 * f
