"""gradshard: serverless federated learning whose aggregation is sharded across memory-capped functions.

The curated public API is importable from here (``from gradshard import aggregate_round, AggregateConfig``).
Names are loaded on first use, so ``import gradshard`` stays cheap: a function worker that imports the package
does not pay for torch (training) or boto3 (S3) unless it uses them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "aggregate_round": "gradshard.aggregation.driver",
    "AggregateConfig": "gradshard.aggregation.driver",
    "AggregateResult": "gradshard.aggregation.driver",
    "RoundSpec": "gradshard.format.round",
    "open_round": "gradshard.format.round",
    "prepare_round": "gradshard.format.round",
    "UpdateMeta": "gradshard.format.update",
    "write_update": "gradshard.format.writer",
    "read_flat": "gradshard.format.update",
    "update_key": "gradshard.format.keys",
    "aggregate_key": "gradshard.format.keys",
    "open_store": "gradshard.store",
    "Store": "gradshard.store",
    "LocalStore": "gradshard.store",
    "MemoryStore": "gradshard.store",
    "S3Store": "gradshard.store",
    "Executor": "gradshard.runtime",
    "LocalExecutor": "gradshard.runtime",
    "InlineExecutor": "gradshard.runtime",
    "get_layout": "gradshard.core.zoo",
    "ModelLayout": "gradshard.core.layout",
    "TensorSpec": "gradshard.core.layout",
    "Trainer": "gradshard.fl.driver",
    "TrainConfig": "gradshard.fl.config",
    "GradshardError": "gradshard.errors",
}

__all__ = [
    "AggregateConfig",
    "AggregateResult",
    "Executor",
    "GradshardError",
    "InlineExecutor",
    "LocalExecutor",
    "LocalStore",
    "MemoryStore",
    "ModelLayout",
    "RoundSpec",
    "S3Store",
    "Store",
    "TensorSpec",
    "TrainConfig",
    "Trainer",
    "UpdateMeta",
    "__version__",
    "aggregate_key",
    "aggregate_round",
    "get_layout",
    "open_round",
    "open_store",
    "prepare_round",
    "read_flat",
    "update_key",
    "write_update",
]

if TYPE_CHECKING:
    from gradshard.aggregation.driver import AggregateConfig, AggregateResult, aggregate_round
    from gradshard.core.layout import ModelLayout, TensorSpec
    from gradshard.core.zoo import get_layout
    from gradshard.errors import GradshardError
    from gradshard.fl.config import TrainConfig
    from gradshard.fl.driver import Trainer
    from gradshard.format.keys import aggregate_key, update_key
    from gradshard.format.round import RoundSpec, open_round, prepare_round
    from gradshard.format.update import UpdateMeta, read_flat
    from gradshard.format.writer import write_update
    from gradshard.runtime import Executor, InlineExecutor, LocalExecutor
    from gradshard.store import LocalStore, MemoryStore, S3Store, Store, open_store


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gradshard' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
