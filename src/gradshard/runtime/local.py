"""Local executor: every invocation is a fresh worker process with a memory cap, a timeout and measurements.

Workers are forked from a zygote process that has preloaded numpy and gradshard (like a warm function runtime).
With ``warm=True`` a worker stays alive after an invocation that has a ``warm_key`` and runs that key's next
invocation (LIFL's warm aggregators reused across rounds); its peak memory is measured per invocation.
The parent samples the worker's resident set every few milliseconds and kills it the moment it passes the cap;
the worker reports the kernel's peak (``VmHWM``, reset when each invocation starts) at the end, so a spike
between samples still fails the invocation. Either way the report says ``MemoryLimitError`` with the peak and
the cap — a cap is never ignored.

With ``tokens`` the workers are configured like deployed functions: their environment carries the issuer's public
key and name (``GRADSHARD_TOKEN_PUBLIC_KEY``, ``GRADSHARD_TOKEN_ISSUER``), so they refuse any invocation without a
valid token. The token settings of this process's own environment are never inherited by the workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterable
from typing import Any

import psutil

from gradshard.errors import GradshardError
from gradshard.runtime.executor import Executor
from gradshard.runtime.registry import preload_of
from gradshard.runtime.report import InvocationReport
from gradshard.runtime.zygote import Child, Zygote
from gradshard.security.tokens import ISSUER_ENV, PUBLIC_KEY_ENV, TokenIssuer
from gradshard.store import Store
from gradshard.topology.base import Invocation
from gradshard.units import MIB

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class ResidentProbe:
    """A process's resident set, read cheaply enough to poll every few milliseconds.

    On Linux one descriptor of ``/proc/<pid>/statm`` is kept open and re-read with ``pread`` (about 1.5 µs a
    read, against about 25 µs for a ``psutil.Process`` lookup each time); elsewhere psutil. Reads 0 once the
    process is gone."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            self._fd: int | None = os.open(f"/proc/{pid}/statm", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._fd = None

    def read(self) -> int:
        if self._fd is None:
            try:
                return int(psutil.Process(self.pid).memory_info().rss)
            except psutil.Error:
                return 0
        try:
            fields = os.pread(self._fd, 128, 0).split()
            return int(fields[1]) * _PAGE
        except (OSError, IndexError, ValueError):  # ESRCH once the process has exited
            return 0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


def _start_quietly(zygote: Zygote) -> None:
    """Start a zygote ahead of its first invocation; a failure is left for that invocation to report."""
    with contextlib.suppress(Exception):
        zygote.ensure()


class LocalExecutor(Executor):
    """Runs invocations as memory-capped worker processes on this machine. Call :meth:`close` when done.

    ``tokens`` mints a token per attempt and configures the workers to verify it; ``worker_env`` configures the
    workers' verifier without minting here (an executor inside a Ray task forwards tokens minted by the driver).
    """

    def __init__(self, *, workers: int = 2, retries: int = 2, memory_cap_bytes: int | None = None,
                 timeout_s: float = 900.0, poll_s: float = 0.005, warm: bool = False,
                 tokens: TokenIssuer | None = None, worker_env: dict[str, str] | None = None) -> None:
        super().__init__(workers=workers, retries=retries, memory_cap_bytes=memory_cap_bytes, timeout_s=timeout_s,
                         tokens=tokens)
        self.worker_env = tokens.worker_env() if tokens is not None else dict(worker_env or {})
        self.poll_s = poll_s
        self.warm = warm
        self._zygotes: dict[tuple[str, ...], Zygote] = {}  # one per set of preloaded modules, started on first use
        self._idle: dict[str, Child] = {}  # warm workers waiting for their aggregator's next invocation
        self._idle_lock = threading.Lock()

    def close(self) -> None:
        """Stop the warm workers and the zygote process (which also stops by itself when this process exits)."""
        with self._idle_lock:
            for child in self._idle.values():
                child.close()
            self._idle.clear()
        for zygote in self._zygotes.values():
            zygote.close()

    def prestart(self, functions: Iterable[str], store: Store, *, wait: bool = False) -> None:
        """Start the zygotes of ``functions``: on background threads, or with ``wait`` here (raising if one fails
        or a function is not registered)."""
        for function in functions:
            try:
                zygote = self._zygote_for(preload_of(function, str(store.spec().get("kind"))))
            except GradshardError:  # not registered here: its first invocation says so
                if wait:
                    raise
                continue
            if wait:
                zygote.ensure()
            else:
                threading.Thread(target=_start_quietly, args=(zygote,), daemon=True, name="zygote-start").start()

    def _zygote(self, invocation: Invocation, store: Store) -> Zygote:
        return self._zygote_for(preload_of(invocation.function, str(store.spec().get("kind")), invocation.module))

    def _zygote_for(self, preload: tuple[str, ...]) -> Zygote:
        with self._idle_lock:
            if preload not in self._zygotes:
                self._zygotes[preload] = Zygote(preload, self.worker_env, unset=(PUBLIC_KEY_ENV, ISSUER_ENV))
            return self._zygotes[preload]

    def _start(self, invocation: Invocation, store: Store, token: str | None) -> tuple[Child, str | None, bool]:
        """A child running ``invocation``: the warm worker of its ``warm_key`` if one is idle, else a fresh one."""
        key = invocation.warm_key if self.warm else None
        with self._idle_lock:
            idle = self._idle.pop(key, None) if key is not None else None
        zygote = self._zygote(invocation, store)
        if idle is not None:
            try:
                child = zygote.invoke(invocation, store.spec(), keep=True, warm=idle, token=token)
                return child, key, True
            except (GradshardError, OSError):  # the warm worker died meanwhile: start a fresh one
                idle.close()
        child = zygote.invoke(invocation, store.spec(), keep=key is not None, token=token)
        return child, key, False

    def attempt(self, invocation: Invocation, store: Store, token: str | None = None) -> InvocationReport:
        started = time.perf_counter()
        child, key, reused = self._start(invocation, store, token)
        running_since = time.perf_counter()  # the timeout does not count a runtime's cold start
        cap = self.cap_of(invocation)
        peak, payload, failure = 0, None, None
        resident = ResidentProbe(child.pid)
        try:
            while True:
                line = child.read_line(self.poll_s)
                if line is not None:
                    payload = json.loads(line)
                    break
                if child.eof:
                    break
                peak = max(peak, resident.read())
                if cap is not None and peak > cap:
                    failure = ("MemoryLimitError", f"invocation {invocation.id} exceeded its memory cap: resident "
                               f"{peak / MIB:.1f} MiB > cap {cap / MIB:.1f} MiB (killed)")
                    break
                if time.perf_counter() - running_since > self.timeout_s:
                    failure = ("InvocationTimeoutError", f"invocation {invocation.id} ran past its timeout of "
                               f"{self.timeout_s:g} s (killed)")
                    break
        finally:
            resident.close()
            if payload is None:
                _kill(child.pid)
            if payload is not None and key is not None:
                with self._idle_lock:
                    self._idle[key] = child
            else:
                child.close()
        report = self._report(invocation, payload, failure, peak, time.perf_counter() - started)
        report.warm = reused
        return report

    def _report(self, invocation: Invocation, payload: dict[str, Any] | None, failure: tuple[str, str] | None,
                peak: int, wall: float) -> InvocationReport:
        cap = self.cap_of(invocation)
        fields: dict[str, Any] = {"invocation": invocation.id, "function": invocation.function,
                                  "memory_cap_bytes": cap, "duration_s": wall, "wall_s": wall,
                                  "ok": False}
        if failure is not None:
            fields.update(error_type=failure[0], error=failure[1], peak_rss_bytes=peak)
        elif payload is None:
            fields.update(error_type="WorkerCrash", peak_rss_bytes=peak,
                          error=f"worker of invocation {invocation.id} died without a result")
        else:
            io = payload.pop("io", {})
            peak = max(peak, int(payload.pop("peak_rss_bytes", 0)))
            fields.update(payload, **io, peak_rss_bytes=peak)
            if fields["ok"] and cap is not None and peak > cap:
                fields.update(ok=False, error_type="MemoryLimitError",
                              error=f"invocation {invocation.id} exceeded its memory cap: peak resident "
                                    f"{peak / MIB:.1f} MiB > cap {cap / MIB:.1f} MiB")
        return InvocationReport.model_validate(fields)
