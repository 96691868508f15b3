"""Inline executor: runs invocations in the calling process (any store, including the in-memory one).

For tests and debugging. It measures duration and I/O but neither isolates nor caps memory; use
:class:`~gradshard.runtime.local.LocalExecutor` for that. With ``tokens`` the function side verifies each attempt's
token with the issuer's public key (in this process), recording consumed token ids in the invocation's store.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from gradshard.runtime.executor import Executor, spec_or_none
from gradshard.runtime.report import InvocationReport, error_fields
from gradshard.runtime.worker import run_function
from gradshard.security.tokens import TokenIssuer
from gradshard.store import IOCounters, Store
from gradshard.topology.base import Invocation


class InlineExecutor(Executor):
    """Runs each invocation as a plain function call, one at a time (so I/O counters are per invocation)."""

    def __init__(self, *, retries: int = 0, tokens: TokenIssuer | None = None) -> None:
        super().__init__(workers=1, retries=retries, tokens=tokens)
        self._lock = threading.Lock()

    def attempt(self, invocation: Invocation, store: Store, token: str | None = None) -> InvocationReport:
        with self._lock:
            before = IOCounters(**store.io.as_dict())
            fields: dict[str, Any] = {"invocation": invocation.id, "function": invocation.function, "ok": False}
            started = time.perf_counter()
            try:
                verifier = self.tokens.verifier(store) if self.tokens is not None else None
                fields["result"] = run_function(invocation.function, invocation.payload(), store, spec_or_none(store),
                                                invocation.module, token=token, verifier=verifier)
                fields["ok"] = True
            except Exception as exc:
                fields.update(error_fields(exc))
            fields["duration_s"] = fields["wall_s"] = time.perf_counter() - started
            after = store.io.as_dict()
            fields.update({k: after[k] - v for k, v in before.as_dict().items()})
        return InvocationReport.model_validate(fields)
