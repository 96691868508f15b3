"""Diagnostic functions of the runtime itself: a no-op (the interpreter baseline), memory, sleep and crash probes."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from gradshard.store import Store


def noop(raw_args: dict[str, Any], store: Store) -> dict[str, Any]:
    """Does nothing; its report measures the interpreter baseline of a function."""
    return {}


def allocate(raw_args: dict[str, Any], store: Store) -> dict[str, Any]:
    """Touches ``bytes`` of memory; used to check that memory caps are enforced."""
    block = np.ones(int(raw_args["bytes"]), dtype=np.uint8)
    return {"sum": int(block[:: 4096].sum())}


def sleep(raw_args: dict[str, Any], store: Store) -> dict[str, Any]:
    """Sleeps ``seconds``; used to test timeouts (and concurrency)."""
    time.sleep(float(raw_args["seconds"]))
    return {}


def crash(raw_args: dict[str, Any], store: Store) -> dict[str, Any]:
    """Exits the process at once with status 3, without a report; used to test crash handling."""
    os._exit(3)
