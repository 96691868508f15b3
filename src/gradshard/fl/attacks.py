"""Simulated Byzantine clients, for tests and the robust-aggregation report: what an attacking client does to its
data before training or to its update after.

Kinds (``TrainConfig.attacks``: client id -> kind):

- ``sign-flip``: uploads ``−Δ`` (its honest update reversed);
- ``scale:<s>``: uploads ``s·Δ`` (``scale:100``, a boosted update);
- ``noise:<σ>``: uploads ``Δ + N(0, σ²)`` per element (seeded by the run, round and client);
- ``label-flip``: trains on labels ``C − 1 − y`` (its data poisoned, its update honest to that data).

Pure functions on numpy arrays; the client function applies them (:func:`gradshard.fl.client.train_client`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from gradshard.errors import GradshardError

KINDS = ("sign-flip", "scale:<s>", "noise:<sigma>", "label-flip")


@dataclass(frozen=True)
class Attack:
    """One parsed attack: its kind and parameter (the factor of ``scale``, σ of ``noise``)."""

    kind: str
    value: float = 0.0

    @property
    def on_data(self) -> bool:
        return self.kind == "label-flip"


def parse_attack(text: str) -> Attack:
    """``sign-flip``, ``scale:<s>``, ``noise:<σ>`` or ``label-flip``; anything else is an error naming the kinds."""
    kind, sep, arg = text.strip().partition(":")
    if kind in ("sign-flip", "label-flip") and not sep:
        return Attack(kind)
    if kind in ("scale", "noise") and sep:
        try:
            value = float(arg)
        except ValueError:
            value = math.nan
        if math.isfinite(value) and (value > 0 if kind == "noise" else value != 0):
            return Attack(kind, value)
        raise GradshardError(f"attack {text!r}: {kind} needs a finite {'σ > 0' if kind == 'noise' else 'factor ≠ 0'}"
                             f", e.g. '{kind}:{100 if kind == 'scale' else 0.1}'")
    raise GradshardError(f"unknown attack {text!r}; known: {', '.join(KINDS)}")


def poison_labels(attack: Attack, y: npt.NDArray[np.int64], classes: int) -> npt.NDArray[np.int64]:
    """The labels an attacker trains on (``label-flip``: ``C − 1 − y``; other kinds: unchanged)."""
    return (classes - 1 - y).astype(y.dtype) if attack.kind == "label-flip" else y


def poison_update(attack: Attack, delta: npt.NDArray[np.floating], seed: int) -> None:
    """Change ``delta`` in place as ``attack`` uploads it (``label-flip``: unchanged)."""
    if attack.kind == "sign-flip":
        np.negative(delta, out=delta)
    elif attack.kind == "scale":
        np.multiply(delta, delta.dtype.type(attack.value), out=delta)
    elif attack.kind == "noise":
        rng = np.random.default_rng(seed)
        delta += rng.normal(0.0, attack.value, delta.shape).astype(delta.dtype)
