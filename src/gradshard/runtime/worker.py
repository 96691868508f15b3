"""The body of a function worker process: open the store, run the function, send back a report payload.

Imported by the fork server before any worker starts, so a worker begins with numpy and gradshard loaded — like
a warm serverless runtime — and its measured memory is the function's own plus that shared baseline.
"""

from __future__ import annotations

import resource
import time
from multiprocessing.connection import Connection
from typing import Any

from gradshard.runtime import registry
from gradshard.runtime.report import error_fields
from gradshard.store import open_store


def execute(function: str, args: dict[str, Any], store_spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``function`` and return the payload of a report (never raises for the function's own failure)."""
    payload: dict[str, Any] = {"ok": False}
    start = time.perf_counter()
    store = None
    try:
        store = open_store(store_spec)
        payload["result"] = registry.call(function, args, store)
        payload["ok"] = True
    except BaseException as exc:  # report every failure, including MemoryError and KeyboardInterrupt
        payload.update(error_fields(exc))
    payload["duration_s"] = time.perf_counter() - start
    payload["io"] = store.io.as_dict() if store is not None else {}
    payload["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return payload


def main(function: str, args: dict[str, Any], store_spec: dict[str, Any], conn: Connection) -> None:
    """Process entry point: execute and send the payload over ``conn``."""
    try:
        conn.send(execute(function, args, store_spec))
    finally:
        conn.close()
