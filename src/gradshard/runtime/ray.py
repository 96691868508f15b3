"""Ray executor: every invocation is a Ray task, capped and measured on whichever node Ray places it.

Each task asks Ray for the invocation's memory as Ray's ``memory`` resource, so Ray only starts it on a node
with that much unreserved memory. Inside the task a per-worker :class:`~gradshard.runtime.local.LocalExecutor`
runs the function in a forked, capped, measured worker process, so a report from Ray carries the same figures
and the same errors (``MemoryLimitError``, ``InvocationTimeoutError``, ``WorkerCrash``) as a local one, plus the
node it ran on. With ``tokens`` the driver mints each attempt's token and sends it, with the verifier's public
configuration (key and issuer), as task arguments; the task's capped executor gives both to its workers. The store
must be reachable from every node: a local directory on one machine (or on a shared
filesystem), an object store on any cluster; an in-memory store is refused.

Import this module explicitly (``from gradshard.runtime.ray import RayExecutor``): it imports ``ray``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from gradshard.errors import StoreError
from gradshard.extras import missing_extra_error
from gradshard.runtime.executor import Executor, ProgressCallback
from gradshard.runtime.local import LocalExecutor
from gradshard.runtime.report import InvocationReport
from gradshard.security.tokens import TokenIssuer
from gradshard.store import Store, open_store
from gradshard.topology.base import Invocation, Plan
from gradshard.units import MIB

try:
    import ray
    import ray.exceptions
except ModuleNotFoundError as exc:  # the ray extra: name it instead of a bare "No module named 'ray'"
    raise missing_extra_error("ray", "the Ray executor") from exc

log = logging.getLogger(__name__)

# The peak resident set of a function that does nothing, in a worker forked from the zygote (what
# ``compare.measure_baseline`` measures): 30.5 MiB here. ``Invocation.memory_bytes`` is the need above it (the
# reducers' own FUNCTION_OVERHEAD_BYTES is already part of that need), so a task reserves the sum.
INTERPRETER_BASELINE_BYTES = 32 * MIB

# Capped executors kept per Ray worker process, by (cap, timeout, worker environment): their zygote is started once
# per worker.
_TASK_EXECUTORS: dict[tuple[int | None, float, tuple[tuple[str, str], ...]], LocalExecutor] = {}


def run_in_task(invocation: Invocation, store_spec: dict[str, Any], memory_cap_bytes: int | None,
                timeout_s: float, token: str | None = None,
                worker_env: dict[str, str] | None = None) -> dict[str, Any]:
    """The body of a Ray task: one capped attempt of ``invocation`` in a forked worker on this node."""
    env = dict(worker_env or {})
    key = (memory_cap_bytes, timeout_s, tuple(sorted(env.items())))
    executor = _TASK_EXECUTORS.get(key)
    if executor is None:
        executor = _TASK_EXECUTORS[key] = LocalExecutor(workers=1, retries=0, memory_cap_bytes=memory_cap_bytes,
                                                        timeout_s=timeout_s, worker_env=env)
    report = executor.attempt(invocation, open_store(store_spec), token)
    report.host = ray.get_runtime_context().get_node_id()
    return report.model_dump()


class RayExecutor(Executor):
    """Runs invocations as Ray tasks on a Ray cluster (or a one-machine Ray started on first use).

    ``address`` is passed to ``ray.init``: None starts a local Ray (unless one is already initialised in this
    process, which is reused), ``"auto"`` joins the cluster this machine belongs to, ``"ray://head:10001"``
    connects as a Ray client. ``init_kwargs`` go to ``ray.init`` too. :meth:`close` shuts Ray down only if this
    executor started it.
    """

    # The driver waits ``timeout_s`` plus this long for a task before cancelling it: the task enforces
    # ``timeout_s`` itself from when the function starts, the grace covers scheduling, a Ray worker's start and
    # the zygote's. Time a task spends queued for memory or CPUs counts against it.
    grace_s: float = 60.0

    def __init__(self, *, address: str | None = None, workers: int = 2, retries: int = 2,
                 memory_cap_bytes: int | None = None, timeout_s: float = 900.0,
                 init_kwargs: dict[str, Any] | None = None, tokens: TokenIssuer | None = None) -> None:
        super().__init__(workers=workers, retries=retries, memory_cap_bytes=memory_cap_bytes, timeout_s=timeout_s,
                         tokens=tokens)
        self.address = address
        self.init_kwargs = dict(init_kwargs or {})
        self._lock = threading.Lock()
        self._remote: Any = None  # ray.remote(run_in_task), made on connection
        self._started_ray = False
        self._warned_local_store = False

    def close(self) -> None:
        """Shut Ray down if this executor started it; a Ray initialised by someone else is left running."""
        with self._lock:
            if self._started_ray and ray.is_initialized():
                ray.shutdown()
            self._started_ray = False
            self._remote = None

    def run(self, plan: Plan, store: Store, on_done: ProgressCallback | None = None) -> list[InvocationReport]:
        # Connect from the calling thread, not from a pool thread of the stage: a local Ray's processes die with
        # the thread that started them (Ray sets PR_SET_PDEATHSIG), and pool threads end with each stage.
        self._connect()
        return super().run(plan, store, on_done)

    def _connect(self) -> Any:
        with self._lock:
            if not ray.is_initialized():
                ray.init(address=self.address, **self.init_kwargs)
                self._started_ray = True
            if self._remote is None:
                self._remote = ray.remote(max_retries=0)(run_in_task)
            return self._remote

    def memory_request(self, invocation: Invocation) -> int:
        """Bytes of Ray's ``memory`` resource a task reserves: the need plus the baseline, or the cap if larger."""
        need, cap = invocation.memory_bytes + INTERPRETER_BASELINE_BYTES, self.cap_of(invocation)
        return max(need, cap) if cap is not None else need

    def _store_spec(self, store: Store) -> dict[str, Any]:
        try:
            spec = store.spec()
        except StoreError as exc:
            raise StoreError(f"RayExecutor cannot use a {type(store).__name__}: Ray tasks run in other processes "
                             f"(and on other machines) and reopen the store from its spec ({exc}). Use a LocalStore "
                             "on one machine or a shared filesystem, or an S3 store on a cluster.") from exc
        return spec

    def _largest_node_memory(self, store_spec: dict[str, Any]) -> int:
        """The largest ``memory`` resource of any live node (0 if none reports one)."""
        totals = [int(node["Resources"].get("memory", 0)) for node in ray.nodes()  # type: ignore[no-untyped-call]
                  if node.get("Alive")]
        if len(totals) > 1 and store_spec.get("kind") == "local" and not self._warned_local_store:
            self._warned_local_store = True
            log.warning("the Ray cluster has %d nodes: the local store at %s must be on a filesystem they all share",
                        len(totals), store_spec.get("root"))
        return max(totals, default=0)

    def attempt(self, invocation: Invocation, store: Store, token: str | None = None) -> InvocationReport:
        spec = self._store_spec(store)
        remote = self._connect()
        request = self.memory_request(invocation)
        base: dict[str, Any] = {"invocation": invocation.id, "function": invocation.function, "ok": False,
                                "memory_cap_bytes": self.cap_of(invocation)}
        largest = self._largest_node_memory(spec)
        if request > largest:
            return InvocationReport.model_validate({
                **base, "error_type": "PlanError",
                "error": f"invocation {invocation.id} needs {request / MIB:.0f} MiB of Ray's memory resource, but "
                         f"the largest node of the Ray cluster offers {largest / MIB:.0f} MiB, so Ray would never "
                         "schedule it; use more shards, a smaller memory cap, or add a larger node"})
        started = time.perf_counter()
        env = self.tokens.worker_env() if self.tokens is not None else None
        ref = remote.options(memory=request, num_cpus=1).remote(invocation, spec, self.cap_of(invocation),
                                                                self.timeout_s, token, env)
        report = InvocationReport.model_validate(self._result(ref, invocation, base))
        report.wall_s = time.perf_counter() - started  # submission to result, scheduling included
        return report

    def _result(self, ref: Any, invocation: Invocation, base: dict[str, Any]) -> dict[str, Any]:
        """The task's report fields, or a failure's: a missed deadline cancels the task; Ray errors are reported."""
        try:
            fields: dict[str, Any] = ray.get(ref, timeout=self.timeout_s + self.grace_s)
            return fields
        except ray.exceptions.GetTimeoutError:
            ray.cancel(ref, force=True)
            return {**base, "error_type": "InvocationTimeoutError",
                    "error": f"invocation {invocation.id} returned no result from Ray within its timeout of "
                             f"{self.timeout_s:g} s + {self.grace_s:g} s grace (task cancelled)"}
        except ray.exceptions.OutOfMemoryError as exc:
            return {**base, "error_type": "MemoryLimitError",
                    "error": f"invocation {invocation.id} was killed by Ray's memory monitor: {_first_line(exc)}"}
        except ray.exceptions.RayError as exc:
            return {**base, "error_type": "WorkerCrash",
                    "error": f"Ray task of invocation {invocation.id} failed: {_describe(exc)}"}

def _first_line(exc: BaseException) -> str:
    """Ray's error messages carry whole tracebacks; the first line names the failure."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else repr(exc)


def _describe(exc: ray.exceptions.RayError) -> str:
    """A Ray failure in one line; for an exception raised inside the task, that exception."""
    cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else None
    culprit = cause if isinstance(cause, BaseException) else exc
    return f"{type(culprit).__name__}: {_first_line(culprit)}"
