"""Runtimes: executors that run plans, the function registry, and the reports they return.

Names load on first use, so a function worker (which imports :mod:`gradshard.runtime.worker`) does not import the
executors, psutil or the plan types it never uses; the runtime's own probe functions (``noop``, ...) register when
:mod:`gradshard.runtime.diagnostics` is imported, which a worker does on their first invocation.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "Executor": "gradshard.runtime.executor",
    "InlineExecutor": "gradshard.runtime.inline",
    "LocalExecutor": "gradshard.runtime.local",
    "InvocationReport": "gradshard.runtime.report",
    "register": "gradshard.runtime.registry",
    "register_runtime": "gradshard.runtime.registry",
}

__all__ = ["Executor", "InlineExecutor", "InvocationReport", "LocalExecutor", "register", "register_runtime"]

if TYPE_CHECKING:
    from gradshard.runtime.executor import Executor
    from gradshard.runtime.inline import InlineExecutor
    from gradshard.runtime.local import LocalExecutor
    from gradshard.runtime.registry import register, register_runtime
    from gradshard.runtime.report import InvocationReport


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gradshard.runtime' has no attribute {name!r}")
    if name in ("Executor", "InlineExecutor", "LocalExecutor"):
        importlib.import_module("gradshard.runtime.diagnostics")  # an executor runs the probe functions
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
