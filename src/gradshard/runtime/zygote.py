"""A zygote: a single-threaded process with numpy and gradshard loaded that forks one child per invocation.

This is how a warm serverless runtime starts a function: the child begins with the libraries mapped (shared
with the zygote) and nothing else, so its measured memory is the interpreter baseline plus the function's own
use. Unlike ``multiprocessing``'s fork server it never re-imports the caller's ``__main__`` module.

Protocol over a Unix socket, one connection per invocation, newline-delimited JSON:
client sends ``{"function", "module", "args", "store", "keep", "token"}``; the child answers ``{"pid": n}`` at once,
then the report payload.
The zygote exits when its stdin closes, so it never outlives the process that started it.

The zygote is started with ``python -P``: the working directory is never on its ``sys.path``, so a ``json.py`` in
the directory a driver runs from is not imported into any function. Its path is the interpreter's own:
``PYTHONPATH`` (honoured), the standard library, site-packages (editable installs included), and last the
directory gradshard itself was imported from if it is not there already. A module with functions of your own must
be importable from those (installed, or on ``PYTHONPATH``), not only from the working directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import json
import os
import select
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gradshard.errors import GradshardError
from gradshard.store.base import StoreSpec

if TYPE_CHECKING:
    from gradshard.topology.base import Invocation

_PR_SET_PDEATHSIG = 1


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _die_with_parent(parent: int, libc: ctypes.CDLL | None) -> None:
    """Have the kernel kill this child when the zygote exits (Linux ``PR_SET_PDEATHSIG``), so no function outlives
    the runtime that started it — a closed executor, a cancelled Ray task, a killed driver."""
    with contextlib.suppress(OSError, AttributeError):
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the zygote died before the request took effect
        os._exit(1)


def _child(conn: socket.socket) -> None:
    from gradshard.runtime import worker

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    with conn, conn.makefile("rwb") as f:
        while line := f.readline():  # a warm worker ("keep") serves invocations until its client hangs up
            request = json.loads(line)
            f.write(json.dumps({"pid": os.getpid()}).encode() + b"\n")
            f.flush()
            payload = worker.execute(request["function"], request["args"], request["store"], request["module"],
                                     request.get("token"))
            f.write(json.dumps(payload).encode() + b"\n")
            f.flush()
            if not request.get("keep"):
                return


def serve(path: str, preload: Sequence[str] = ()) -> None:
    """Accept connections on ``path`` and fork a child for each until stdin closes.

    The children inherit gradshard's worker and the ``preload`` modules already imported (a runtime "image"); a
    preloaded module's ``warm_up()`` runs once here, so lazy initialisation is not paid by every child.
    """
    import gradshard.runtime.worker  # noqa: F401 - preload for the children
    from gradshard.security import tokens

    if tokens.configured():  # the functions verify tokens: load and initialise Ed25519 once here, not per child
        tokens.warm_up()

    for name in preload:
        module = importlib.import_module(name)
        warm_up = getattr(module, "warm_up", None)
        if callable(warm_up):  # one-time lazy initialisation done here, not in every forked child
            warm_up()

    libc = _libc()  # loaded once here, not in every child
    # What the zygote holds now is what every child inherits: move it out of the collector's reach, so a child's
    # collections never touch (and copy) the inherited pages. The collector was off while the zygote imported (the
    # fork-server recipe of ``gc.freeze``'s documentation: imports make no garbage worth a full collection, and the
    # collections they would trigger cost a sixth of the start); it is on again from here, for the zygote and every
    # child.
    gc.freeze()
    gc.enable()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped automatically
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "accept")
    sel.register(sys.stdin, selectors.EVENT_READ, "stdin")
    while True:
        for key, _ in sel.select():
            if key.data == "stdin":
                if not sys.stdin.readline():
                    return
                continue
            conn, _ = listener.accept()
            zygote = os.getpid()
            if os.fork() == 0:
                code = 0
                try:
                    _die_with_parent(zygote, libc)
                    listener.close()
                    _child(conn)
                except BaseException:
                    code = 1
                finally:
                    os._exit(code)
            conn.close()


class Child:
    """A running child: its pid and the socket its payload arrives on."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pid = 0
        self._buf = bytearray()
        self.eof = False

    def read_line(self, timeout: float) -> bytes | None:
        """The next line, or None if none is complete within ``timeout`` (or the child closed the socket)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if self.eof or remaining <= 0 or not select.select([self.sock], [], [], remaining)[0]:
                return None
            data = self.sock.recv(1 << 16)
            if not data:
                self.eof = True
                return None
            self._buf += data
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf = bytearray(rest)
        return line

    def close(self) -> None:
        self.sock.close()


class Zygote:
    """Client side: starts the zygote process lazily and opens invocations on it.

    The zygote (and so every function) starts with this process's environment as it is then, less the variables
    named in ``unset``, plus ``env``."""

    def __init__(self, preload: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 unset: Sequence[str] = ()) -> None:
        self.preload = tuple(preload)
        self.env = dict(env or {})
        self.unset = tuple(unset)
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self.path = ""

    def ensure(self) -> str:
        """Start the zygote process unless it runs; the path of its socket."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                return self.path
            self._dir = tempfile.TemporaryDirectory(prefix="gradshard-zygote-")
            self.path = str(Path(self._dir.name) / "sock")
            self._proc = subprocess.Popen([sys.executable, "-P", "-c", self._command()], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, env=self._environment())
            assert self._proc.stdout is not None
            if self._proc.stdout.readline().strip() != b"ready":
                raise GradshardError("the function zygote process failed to start")
            return self.path

    def _environment(self) -> dict[str, str] | None:
        if not self.env and not any(name in os.environ for name in self.unset):
            return None  # inherit
        env = {k: v for k, v in os.environ.items() if k not in self.unset}
        env.update(self.env)
        return env

    def _command(self) -> str:
        """The zygote's ``-c`` program: the collector off while it imports (:func:`serve` turns it on again),
        gradshard's own location appended to ``sys.path`` if missing (never the working directory, never ahead of
        the standard library), then :func:`serve`."""
        location = str(Path(__file__).resolve().parents[2])
        return (f"import gc, sys; gc.disable(); "
                f"sys.path.append({location!r}) if {location!r} not in sys.path else None; "
                f"from gradshard.runtime.zygote import serve; serve({self.path!r}, {self.preload!r})")

    def invoke(self, invocation: Invocation, store_spec: StoreSpec, *, keep: bool = False,
               warm: Child | None = None, token: str | None = None) -> Child:
        """Start an invocation in a fresh child, or in the ``warm`` child of an earlier ``keep`` invocation.

        With ``keep`` the child stays alive after answering, ready to be passed back as ``warm``.
        """
        handle = warm
        if handle is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(self.ensure())
            handle = Child(sock)
        request = {"function": invocation.function, "module": invocation.module, "args": invocation.payload(),
                   "store": store_spec, "keep": keep, "token": token}
        handle.sock.sendall(json.dumps(request).encode() + b"\n")
        line = handle.read_line(timeout=60.0)
        if line is None:
            handle.close()
            raise GradshardError(f"the function zygote did not start an invocation of {invocation.function!r}")
        handle.pid = int(json.loads(line)["pid"])
        return handle

    def close(self) -> None:
        with self._lock:
            if self._proc is not None:
                assert self._proc.stdin is not None
                self._proc.stdin.close()
                self._proc.wait(timeout=10)
                self._proc = None
            if self._dir is not None:
                self._dir.cleanup()
                self._dir = None
