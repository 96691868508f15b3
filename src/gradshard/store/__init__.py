"""Object stores: the :class:`Store` contract, a local-directory store (default) and an in-memory store."""

from __future__ import annotations

from typing import Any

from gradshard.errors import StoreError
from gradshard.store.base import BytesLike, IOCounters, ObjectReader, Store, check_key
from gradshard.store.local import LocalStore
from gradshard.store.memory import MemoryStore

__all__ = ["BytesLike", "IOCounters", "LocalStore", "MemoryStore", "ObjectReader", "Store", "check_key",
           "open_store"]


def open_store(spec: dict[str, Any] | str) -> Store:
    """Open a store from :meth:`Store.spec` output, or from a string: a directory path or ``memory:``."""
    if isinstance(spec, str):
        return MemoryStore() if spec == "memory:" else LocalStore(spec)
    kind = spec.get("kind")
    if kind == "local":
        return LocalStore(spec["root"], fsync=bool(spec.get("fsync", True)))
    if kind == "memory":
        return MemoryStore()
    raise StoreError(f"unknown store kind {kind!r}; known: local, memory")
