"""The functions an executor can run, by name."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from gradshard.aggregation import functions, tree_functions
from gradshard.errors import GradshardError
from gradshard.runtime import diagnostics
from gradshard.store import Store

Function = Callable[[dict[str, Any], Store], dict[str, Any]]

FUNCTIONS: dict[str, Function] = {
    "shard_reduce": functions.shard_reduce,
    "flat_reduce": functions.flat_reduce,
    "tree_reduce": tree_functions.tree_reduce,
    "noop": diagnostics.noop,
    "allocate": diagnostics.allocate,
    "sleep": diagnostics.sleep,
    "crash": diagnostics.crash,
}


# Runtimes ("images"): the modules a worker of a function has preloaded. Aggregation functions need numpy only;
# training functions need torch, which would add hundreds of MiB to every aggregation function's baseline.
RUNTIMES: dict[str, tuple[str, ...]] = {"numpy": (), "torch": ("torch", "gradshard.fl.client")}
FUNCTION_RUNTIME: dict[str, str] = {"train_client": "torch"}
# Store clients a runtime preloads when its functions use that kind of store (boto3 takes ~0.3 s to load).
STORE_PRELOAD: dict[str, tuple[str, ...]] = {"s3": ("gradshard.store.s3",)}


def runtime_of(function: str) -> str:
    return FUNCTION_RUNTIME.get(function, "numpy")


def preload_of(function: str, store_kind: str) -> tuple[str, ...]:
    """The modules a worker running ``function`` against a ``store_kind`` store starts with."""
    return RUNTIMES[runtime_of(function)] + STORE_PRELOAD.get(store_kind, ())


def _lazy(module: str, name: str) -> Function:
    """A function whose module is imported on first call (so workers of other runtimes never import it)."""

    def call(args: dict[str, Any], store: Store) -> dict[str, Any]:
        fn: Function = getattr(importlib.import_module(module), name)
        return fn(args, store)

    return call


FUNCTIONS["train_client"] = _lazy("gradshard.fl.client", "train_client")
FUNCTIONS["server_step"] = _lazy("gradshard.fl.server", "server_step")


def call(function: str, args: dict[str, Any], store: Store) -> dict[str, Any]:
    """Run a registered function by name."""
    try:
        fn = FUNCTIONS[function]
    except KeyError:
        raise GradshardError(f"unknown function {function!r}; known: {sorted(FUNCTIONS)}") from None
    return fn(args, store)
