"""The functions an executor can run, by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gradshard.errors import GradshardError
from gradshard.runtime import functions, tree_functions
from gradshard.store import Store

Function = Callable[[dict[str, Any], Store], dict[str, Any]]

FUNCTIONS: dict[str, Function] = {
    "shard_reduce": functions.shard_reduce,
    "flat_reduce": functions.flat_reduce,
    "tree_reduce": tree_functions.tree_reduce,
    "noop": functions.noop,
    "allocate": functions.allocate,
    "sleep": functions.sleep,
    "crash": functions.crash,
}


def call(function: str, args: dict[str, Any], store: Store) -> dict[str, Any]:
    """Run a registered function by name."""
    try:
        fn = FUNCTIONS[function]
    except KeyError:
        raise GradshardError(f"unknown function {function!r}; known: {sorted(FUNCTIONS)}") from None
    return fn(args, store)
