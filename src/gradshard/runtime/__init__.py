"""Runtimes: executors that run plans, the function registry, and the reports they return."""

from gradshard.runtime import diagnostics  # noqa: F401 - registers the runtime's own probe functions
from gradshard.runtime.executor import Executor
from gradshard.runtime.inline import InlineExecutor
from gradshard.runtime.local import LocalExecutor
from gradshard.runtime.registry import register, register_runtime
from gradshard.runtime.report import InvocationReport

__all__ = ["Executor", "InlineExecutor", "InvocationReport", "LocalExecutor", "register", "register_runtime"]
