"""The functions an executor can run: registered by the packages that own them, typed at both ends.

A function is ``fn(args, store) -> result`` where ``args`` and ``result`` are pydantic models. The package that
defines a function registers it (``register("shard_reduce", shard_reduce, args=ShardReduceArgs,
result=ReduceResult)``), naming the *runtime* its workers need: ``numpy`` (aggregation: nothing heavy preloaded)
or a runtime the package registers itself (training registers ``torch``). The runtime names no domain module:
an invocation travels as (function name, the module that registers it, JSON arguments), and a worker that does
not know the function yet imports that module — only modules under a registered package prefix (``gradshard.``
by default), so an event cannot make a worker import arbitrary code.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel

from gradshard.errors import GradshardError
from gradshard.store import Store

ArgsT = TypeVar("ArgsT", bound=BaseModel)
ResultT = TypeVar("ResultT", bound=BaseModel)


@dataclass(frozen=True)
class Runtime:
    """A worker "image": the modules a worker of this runtime starts with (imported once in its zygote)."""

    name: str
    preload: tuple[str, ...] = ()


@dataclass(frozen=True)
class FunctionSpec:
    """A registered function: its callable, argument and result models, runtime and defining module."""

    name: str
    fn: Callable[[Any, Store], BaseModel]
    args: type[BaseModel]
    result: type[BaseModel]
    runtime: str
    module: str
    scope: Callable[[Any], dict[str, Any]] | None = None  # what an invocation token of it is scoped to


_RUNTIMES: dict[str, Runtime] = {"numpy": Runtime("numpy")}
_FUNCTIONS: dict[str, FunctionSpec] = {}
# Packages whose modules a worker may import to find a function it was asked to run.
_TRUSTED_PREFIXES: list[str] = ["gradshard."]
# Store clients a runtime preloads when its functions use that kind of store (boto3 takes ~0.3 s to load).
STORE_PRELOAD: dict[str, tuple[str, ...]] = {"s3": ("gradshard.store.s3",)}


def register_runtime(name: str, preload: tuple[str, ...] = ()) -> Runtime:
    """Declare a runtime (idempotent for the same preload list)."""
    runtime = Runtime(name, tuple(preload))
    known = _RUNTIMES.get(name)
    if known is not None and known != runtime:
        raise GradshardError(f"runtime {name!r} is already registered with preload {known.preload}")
    _RUNTIMES[name] = runtime
    return runtime


def trust_package(prefix: str) -> None:
    """Let workers import modules under ``prefix`` (e.g. ``"my_tasks."``) to find the functions they register."""
    if not prefix.endswith(".") or prefix == ".":
        raise GradshardError(f"a package prefix ends with '.', got {prefix!r}")
    if prefix not in _TRUSTED_PREFIXES:
        _TRUSTED_PREFIXES.append(prefix)


def register(name: str, fn: Callable[[ArgsT, Store], ResultT], *, args: type[ArgsT], result: type[ResultT],
             runtime: str = "numpy", scope: Callable[[ArgsT], dict[str, Any]] | None = None) -> FunctionSpec:
    """Register ``fn`` under ``name``. Registering the same function again is a no-op; another one is refused.

    ``scope`` derives, from an invocation's arguments, what its invocation token is scoped to (JSON: e.g. the
    round and the element range); the driver signs it and the function compares it exactly. None: ``{}``."""
    if runtime not in _RUNTIMES:
        raise GradshardError(f"function {name!r} names runtime {runtime!r}, which is not registered; known: "
                             f"{sorted(_RUNTIMES)} (register_runtime first)")
    spec = FunctionSpec(name, fn, args, result, runtime, fn.__module__, scope)
    known = _FUNCTIONS.get(name)
    if known is not None and (known.fn is not fn or known.args is not args or known.result is not result):
        raise GradshardError(f"function name {name!r} is already registered by {known.module}")
    _FUNCTIONS[name] = spec
    return spec


def known_functions() -> list[str]:
    return sorted(_FUNCTIONS)


def find(name: str) -> FunctionSpec | None:
    """The registered function ``name``, or None."""
    return _FUNCTIONS.get(name)


def spec_of(name: str) -> FunctionSpec:
    """The registered function ``name``; raises naming the known ones."""
    try:
        return _FUNCTIONS[name]
    except KeyError:
        raise GradshardError(f"unknown function {name!r}; known: {known_functions()}") from None


def resolve(name: str, module: str = "") -> FunctionSpec:
    """The function ``name``, importing ``module`` first if it is not registered yet (workers do this)."""
    if name not in _FUNCTIONS and module:
        if not any(module.startswith(prefix) for prefix in _TRUSTED_PREFIXES):
            raise GradshardError(f"refusing to import {module!r} for function {name!r}: not in a trusted package "
                                 f"({', '.join(_TRUSTED_PREFIXES)}); see gradshard.runtime.registry.trust_package")
        importlib.import_module(module)
    return spec_of(name)


def runtime_of(function: str) -> Runtime:
    return _RUNTIMES[spec_of(function).runtime]


def preload_of(function: str, store_kind: str, module: str = "") -> tuple[str, ...]:
    """The modules a worker running ``function`` against a ``store_kind`` store starts with."""
    spec = resolve(function, module)
    return (*_RUNTIMES[spec.runtime].preload, spec.module, *STORE_PRELOAD.get(store_kind, ()))


def validate_args(function: str, args: BaseModel | dict[str, Any]) -> BaseModel:
    """``args`` as the function's argument model: a dict is validated (the function must be registered); a model
    is checked against the registered one when the function is known here."""
    spec = _FUNCTIONS.get(function)
    if isinstance(args, BaseModel):
        if spec is not None and not isinstance(args, spec.args):
            raise GradshardError(f"function {function!r} takes {spec.args.__name__}, got {type(args).__name__}")
        return args
    return spec_of(function).args.model_validate(args)


def scope_of(function: str, args: BaseModel) -> dict[str, Any]:
    """The token scope of ``function(args)`` as its registration derives it (``{}`` if it declares none)."""
    spec = spec_of(function)
    return {} if spec.scope is None else dict(spec.scope(args))


Authorize = Callable[[dict[str, Any]], None]  # called with the invocation's scope; raises to refuse it


def call(function: str, args: dict[str, Any], store: Store, module: str = "",
         authorize: Authorize | None = None) -> dict[str, Any]:
    """Run a function on JSON arguments (as a worker receives them) and return its JSON result.

    ``authorize`` (a verified token's remaining checks) sees the scope derived from the parsed arguments and
    runs before the function does."""
    spec = resolve(function, module)
    parsed = spec.args.model_validate(args)  # a ValidationError is reported as such (and never retried)
    if authorize is not None:
        authorize(scope_of(function, parsed))
    result = spec.fn(parsed, store)
    if not isinstance(result, spec.result):
        raise GradshardError(f"function {function!r} returned {type(result).__name__}, not {spec.result.__name__}")
    return result.model_dump(mode="json")


def parse_result(function: str, result: dict[str, Any], model: type[ResultT]) -> ResultT:
    """A report's JSON result as ``model`` (which must be the function's registered result model)."""
    spec = spec_of(function)
    if spec.result is not model:
        raise GradshardError(f"function {function!r} returns {spec.result.__name__}, not {model.__name__}")
    return model.model_validate(result)
