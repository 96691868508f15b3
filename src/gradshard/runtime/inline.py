"""Inline executor: runs invocations in the calling process (any store, including the in-memory one).

For tests and debugging. It measures duration and I/O but neither isolates nor caps memory; use
:class:`~gradshard.runtime.local.LocalExecutor` for that.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from gradshard.runtime import registry
from gradshard.runtime.executor import Executor
from gradshard.runtime.report import InvocationReport, error_fields
from gradshard.store import IOCounters, Store
from gradshard.topology.base import Invocation


class InlineExecutor(Executor):
    """Runs each invocation as a plain function call, one at a time (so I/O counters are per invocation)."""

    def __init__(self, *, retries: int = 0) -> None:
        super().__init__(workers=1, retries=retries)
        self._lock = threading.Lock()

    def attempt(self, invocation: Invocation, store: Store) -> InvocationReport:
        with self._lock:
            before = IOCounters(**store.io.as_dict())
            fields: dict[str, Any] = {"invocation": invocation.id, "function": invocation.function, "ok": False}
            started = time.perf_counter()
            try:
                fields["result"] = registry.call(invocation.function, invocation.payload(), store,
                                                 invocation.module)
                fields["ok"] = True
            except Exception as exc:
                fields.update(error_fields(exc))
            fields["duration_s"] = fields["wall_s"] = time.perf_counter() - started
            after = store.io.as_dict()
            fields.update({k: after[k] - v for k, v in before.as_dict().items()})
        return InvocationReport.model_validate(fields)
