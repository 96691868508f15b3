"""The body of a function worker process: open the store, run the function, return a report payload.

Imported by the fork server before any worker starts, so a worker begins with numpy and gradshard loaded — like
a warm serverless runtime — and its measured memory is the function's own plus that shared baseline.
"""

from __future__ import annotations

import contextlib
import resource
import time
from typing import Any

from gradshard.runtime import registry
from gradshard.runtime.failure import error_fields
from gradshard.security.tokens import TokenVerifier
from gradshard.store import Store, StoreSpec, open_store


def _reset_peak() -> None:
    """Reset the kernel's resident high-water mark, so a warm worker measures each invocation on its own."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_bytes() -> int:
    """Peak resident set since the last reset (VmHWM), or the process's lifetime peak where /proc has none."""
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_function(function: str, args: dict[str, Any], store: Store, store_spec: StoreSpec | None, module: str = "",
                 *, token: str | None = None, verifier: TokenVerifier | None = None) -> dict[str, Any]:
    """Run ``function`` on JSON ``args``; with a ``verifier``, only after its token passed every check.

    The token's signature, issuer, audience and times are checked before the arguments are even parsed; its
    scope, argument and store digests and its single use right after, before the function runs."""
    if verifier is None:
        return registry.call(function, args, store, module)
    claims = verifier.decode(token, function)
    return registry.call(function, args, store, module, authorize=lambda scope: verifier.authorize(
        claims, scope=scope, args=args, store_spec=store_spec))


def execute(function: str, args: dict[str, Any], store_spec: dict[str, Any], module: str = "",
            token: str | None = None) -> dict[str, Any]:
    """Run ``function`` and return the payload of a report (never raises for the function's own failure).

    A function whose environment names a token key (``GRADSHARD_TOKEN_PUBLIC_KEY``) refuses any invocation
    without a valid ``token``; the invocation's store records the consumed token ids."""
    _reset_peak()
    payload: dict[str, Any] = {"ok": False}
    start = time.perf_counter()
    store = None
    try:
        store = open_store(store_spec)
        verifier = TokenVerifier.from_env(store)
        payload["result"] = run_function(function, args, store, store_spec, module, token=token, verifier=verifier)
        payload["ok"] = True
    except BaseException as exc:  # report every failure, including MemoryError and KeyboardInterrupt
        payload.update(error_fields(exc))
    payload["duration_s"] = time.perf_counter() - start
    payload["io"] = store.io.as_dict() if store is not None else {}
    payload["peak_rss_bytes"] = _peak_bytes()
    return payload
