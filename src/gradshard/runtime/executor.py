"""Executors run a plan's invocations stage by stage, with bounded concurrency and retries.

Concrete executors only implement :meth:`Executor.attempt` (one try of one invocation). Failures that would
fail again with the same input (a bad update, a memory cap breach) are not retried; anything else (a crash, a
timeout, a store error) is retried up to ``retries`` times.

With ``tokens`` (a :class:`~gradshard.security.tokens.TokenIssuer`) every attempt carries a fresh invocation token
scoped to its function, round and range (``attempt(..., token=...)``), so a retry is never refused as a replay.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Self

from gradshard.errors import GradshardError, StoreError
from gradshard.runtime import registry
from gradshard.runtime.report import InvocationReport
from gradshard.security.tokens import TokenIssuer
from gradshard.store import Store, StoreSpec
from gradshard.topology.base import Invocation, Plan

log = logging.getLogger(__name__)
ProgressCallback = Callable[[InvocationReport], None]


def spec_or_none(store: Store) -> StoreSpec | None:
    """The store's spec, or None for a store that lives in this process only (what a token's store digest binds)."""
    try:
        return store.spec()
    except StoreError:
        return None


class Executor(ABC):
    """Runs plans. ``workers`` invocations at once; ``retries`` extra attempts for retryable failures; ``tokens``
    mints a scoped invocation token for every attempt (its workers verify it)."""

    def __init__(self, *, workers: int = 2, retries: int = 2, memory_cap_bytes: int | None = None,
                 timeout_s: float = 900.0, tokens: TokenIssuer | None = None) -> None:
        if workers < 1:
            raise GradshardError(f"workers must be at least 1, got {workers}")
        if retries < 0:
            raise GradshardError(f"retries must be non-negative, got {retries}")
        self.workers = workers
        self.retries = retries
        self.memory_cap_bytes = memory_cap_bytes
        self.timeout_s = timeout_s
        self.tokens = tokens

    def cap_of(self, invocation: Invocation) -> int | None:
        """The memory cap of one invocation: the smaller of the executor's and the invocation's own (None: none)."""
        caps = [c for c in (self.memory_cap_bytes, invocation.memory_cap_bytes) if c is not None]
        return min(caps) if caps else None

    def prestart(self, functions: Iterable[str], store: Store,  # noqa: B027 - executors with runtimes override
                 *, wait: bool = False) -> None:
        """Start whatever running ``functions`` against ``store`` will need (a runtime process): in the background,
        so that its start overlaps the caller's work, and never raising (the first invocation reports any failure);
        or with ``wait``, here and now, raising what fails (the runtime's cold start, timed on its own)."""

    def close(self) -> None:  # noqa: B027 - executors that hold processes or connections override it
        """Release what the executor holds (worker processes, a Ray it started); it cannot run plans afterwards."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abstractmethod
    def attempt(self, invocation: Invocation, store: Store, token: str | None = None) -> InvocationReport:
        """Run one invocation once, carrying ``token`` to the function, and report; never raises for a failure of
        the function itself."""

    def mint(self, invocation: Invocation, store: Store) -> str | None:
        """A fresh token for one attempt of ``invocation`` (None without ``tokens``)."""
        if self.tokens is None:
            return None
        return self.tokens.mint(invocation.function, scope=registry.scope_of(invocation.function, invocation.args),
                                args=invocation.payload(), store_spec=spec_or_none(store))

    def run_one(self, invocation: Invocation, store: Store) -> InvocationReport:
        """Run an invocation, retrying retryable failures; each attempt with a token of its own."""
        for attempt in range(1, self.retries + 2):
            token = self.mint(invocation, store)
            # Executors without tokens keep the two-argument call (so subclasses written before tokens still work).
            report = self.attempt(invocation, store) if token is None else self.attempt(invocation, store, token)
            report.attempts = attempt
            report.predicted_bytes = invocation.memory_bytes
            if report.ok or not report.retryable or attempt == self.retries + 1:
                return report
            log.warning("invocation %s failed (%s: %s); retrying (%d/%d)", invocation.id, report.error_type,
                        report.error, attempt, self.retries)
        raise AssertionError("unreachable")

    def run(self, plan: Plan, store: Store, on_done: ProgressCallback | None = None) -> list[InvocationReport]:
        """Run every stage of ``plan``; a stage starts when the previous one succeeded. Reports in plan order."""
        reports: dict[str, InvocationReport] = {}
        for stage in plan.stages():
            with ThreadPoolExecutor(max_workers=min(self.workers, len(stage))) as pool:
                futures = [pool.submit(self.run_one, inv, store) for inv in stage]
                for future in futures:
                    report = future.result()
                    reports[report.invocation] = report
                    if on_done is not None:
                        on_done(report)
            if not all(reports[inv.id].ok for inv in stage):
                break
        return [reports[inv.id] for inv in plan.invocations if inv.id in reports]
