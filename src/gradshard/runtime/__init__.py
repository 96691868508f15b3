"""Runtimes: executors that run plans, the functions they run, and the reports they return."""

from gradshard.runtime.executor import Executor
from gradshard.runtime.inline import InlineExecutor
from gradshard.runtime.local import LocalExecutor
from gradshard.runtime.report import InvocationReport

__all__ = ["Executor", "InlineExecutor", "InvocationReport", "LocalExecutor"]
