"""Which sampled client trains which subnetwork in a round, and the largest subnetwork's weight β.

Every policy is a pure function of (run seed, round, the sampled clients, the recorded history), so a retried or
resumed round assigns the same subnetworks; the plugin records each round's assignment in the store
(``rounds/<r>/plugin.json``) and the sandwich policy counts "least often" from those records only.

Subnetworks are given by index into the family; ``largest`` and ``smallest`` are indices (by MACs).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def _client_number(client: str) -> int:
    """``client-0007`` → 7 (the trainer's ids); any other id → a stable number from its bytes."""
    tail = client.rpartition("-")[2]
    return int(tail) if tail.isdigit() else int.from_bytes(client.encode()[-8:].rjust(8, b"\0"), "little")


def assign_static(cohort: Sequence[str], k: int) -> dict[str, int]:
    """Client ``i`` always trains subnetwork ``i mod k``."""
    return {client: _client_number(client) % k for client in cohort}


def assign_random(cohort: Sequence[str], k: int, seed: int, r: int, choices: Sequence[int] | None = None) -> dict[
        str, int]:
    """Each client draws uniformly from ``choices`` (default all k), seeded by (run seed, round, client)."""
    pool = list(range(k)) if choices is None else list(choices)
    return {client: pool[int(np.random.default_rng([seed, r, _client_number(client)]).integers(len(pool)))]
            for client in cohort}


def _least_served(candidates: Sequence[str], counts: Mapping[str, int], n: int, seed: int, r: int,
                  salt: int) -> list[str]:
    """The ``n`` candidates with the fewest counts; ties broken by a seeded shuffle of (seed, round, salt)."""
    order = np.random.default_rng([seed, r, salt]).permutation(len(candidates))
    ranked = sorted(range(len(candidates)), key=lambda i: (counts.get(candidates[i], 0), int(order[i])))
    return [candidates[i] for i in ranked[:n]]


def assign_sandwich(cohort: Sequence[str], k: int, largest: int, smallest: int, history: Sequence[Mapping[str, int]],
                    seed: int, r: int, per_side: int = 1) -> dict[str, int]:
    """The tracking sandwich: the ``per_side`` sampled clients that trained the largest subnetwork least often (in
    ``history``, the assignments of earlier rounds) get it, then likewise the smallest among the others, and the
    rest draw at random from the subnetworks in between (all of them when there are none in between)."""
    clients = sorted(cohort)
    served_large = {c: sum(1 for past in history if past.get(c) == largest) for c in clients}
    served_small = {c: sum(1 for past in history if past.get(c) == smallest) for c in clients}
    n = min(per_side, len(clients))
    large = _least_served(clients, served_large, n, seed, r, 1)
    rest = [c for c in clients if c not in large]
    small = _least_served(rest, served_small, min(per_side, len(rest)), seed, r, 2)
    middle = [i for i in range(k) if i not in (largest, smallest)] or list(range(k))
    out = assign_random([c for c in rest if c not in small], k, seed, r, middle)
    out.update({c: largest for c in large})
    out.update({c: smallest for c in small})
    return {c: out[c] for c in clients}


def beta(r: int, rounds: int, start: float, end: float, share: float, schedule: str = "cosine") -> float:
    """The largest subnetwork's total weight in round ``r``: ``start`` at round 0, ``end`` from round
    ``T = max(1, round(share · rounds))`` on; in between ``end + (start − end)(1 + cos(π t))/2`` (cosine) or
    ``start + (end − start) t`` (linear), with ``t = r / T``."""
    horizon = max(1, round(share * rounds))
    t = min(1.0, r / horizon)
    if schedule == "cosine":
        return end + (start - end) * (1 + math.cos(math.pi * t)) / 2
    if schedule == "linear":
        return start + (end - start) * t
    raise ValueError(f"unknown β schedule {schedule!r}; cosine or linear")


def beta_weights(assignment: Mapping[str, int], largest: int, value: float) -> dict[str, float]:
    """Per-client weights: the clients on the largest subnetwork share ``value``, the others ``1 − value`` (each
    group split evenly). A group that is empty leaves the other with all the weight."""
    large = [c for c, i in assignment.items() if i == largest]
    other = [c for c in assignment if c not in large]
    if not large or not other:
        return {c: 1.0 / len(assignment) for c in assignment}
    return {c: (value / len(large) if c in large else (1 - value) / len(other)) for c in assignment}
