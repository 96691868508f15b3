"""Phase 1 of two-phase reducers (aggregation contract v2): a registry the driver asks, never a special case in it.

A phase runs its own plan over the round's shards before the reduction, combines the functions' small results
exactly (fixed chunk partials, ``math.fsum``), and changes the manifest for phase 2: takes clients out of the round
(Krum, Multi-Krum, Bulyan: :mod:`gradshard.aggregation.selection`) or sets their weights and scales (FLTrust:
:mod:`gradshard.aggregation.trust`). Modules register their phase under the reducer's name.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gradshard.core.reducers import ReducerSpec
from gradshard.errors import RoundError
from gradshard.format.round import RoundManifest, check_enough
from gradshard.runtime.executor import Executor, ProgressCallback
from gradshard.store import Store
from gradshard.topology.sharded import Partition

if TYPE_CHECKING:
    from gradshard.runtime.report import InvocationReport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PhaseContext:
    """What a phase runs with: the round's store, executor, shards, partition, progress callback and policy."""

    store: Store
    executor: Executor
    shards: int
    partition: Partition
    on_done: ProgressCallback | None = None
    policy: str = "skip"


#: A phase: changes ``manifest`` for phase 2 and returns the reports of the invocations it ran.
Phase = Callable[[RoundManifest, ReducerSpec, PhaseContext], "list[InvocationReport]"]
_PHASES: dict[str, tuple[Phase, str | None]] = {}


def register_phase(reducer: str, phase: Phase, function: str | None) -> None:
    """``phase`` runs before reducer ``reducer``'s reduction; it invokes ``function`` (started ahead by the driver;
    None: it runs in the driver only)."""
    _PHASES[reducer] = (phase, function)


def phase_of(reducer: str) -> Phase | None:
    return _PHASES[reducer][0] if reducer in _PHASES else None


def phase_function(reducer: str) -> str | None:
    """The function a reducer's phase invokes (None: the reducer has no phase)."""
    return _PHASES[reducer][1] if reducer in _PHASES else None


def reject_bad_updates(manifest: RoundManifest, reports: Sequence[InvocationReport], policy: str) -> bool:
    """Take the clients some invocation found bad out of the round (policy ``skip``; the round still needs enough
    clients) or fail the round (``fail``); whether there were any."""
    bad = {client: reason for r in reports for client, reason in r.bad_updates.items()}
    if not bad:
        return False
    if policy == "fail":
        raise RoundError(f"round {manifest.round} failed on bad updates: {bad}")
    for client, reason in bad.items():
        log.warning("rejecting client %s: %s", client, reason)
        manifest.reject(client, reason)
    check_enough(manifest)
    return True
