"""Object stores: the :class:`Store` contract, a local-directory store (default) and an in-memory store."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from gradshard.errors import StoreError
from gradshard.store.base import (
    STALE_UPLOAD_S,
    BytesLike,
    IOCounters,
    ObjectReader,
    StaleUpload,
    Store,
    StoreSpec,
    check_key,
)
from gradshard.store.local import LocalStore
from gradshard.store.memory import MemoryStore

if TYPE_CHECKING:
    from gradshard.store.s3 import S3Store

__all__ = ["STALE_UPLOAD_S", "BytesLike", "IOCounters", "LocalStore", "MemoryStore", "ObjectReader", "S3Store",
           "StaleUpload", "Store", "StoreSpec", "check_key", "open_store"]


def __getattr__(name: str) -> Any:
    """``S3Store`` loads on first use: a worker on a local store never imports the S3 client code."""
    if name == "S3Store":
        value = importlib.import_module("gradshard.store.s3").S3Store
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gradshard.store' has no attribute {name!r}")


def open_store(spec: dict[str, Any] | str) -> Store:
    """Open a store from :meth:`Store.spec` output, or from a string: a directory, ``s3://bucket/prefix``
    (endpoint and credentials from the AWS environment) or ``memory:``."""
    if isinstance(spec, str):
        if spec.startswith("s3://"):
            from gradshard.store.s3 import S3Store, parse_url

            return S3Store(*parse_url(spec))
        return MemoryStore() if spec == "memory:" else LocalStore(spec)
    kind = spec.get("kind")
    if kind == "local":
        return LocalStore(spec["root"], fsync=bool(spec.get("fsync", True)),
                          sync_ranges=bool(spec.get("sync_ranges", True)))
    if kind == "memory":
        return MemoryStore()
    if kind == "s3":
        from gradshard.store.s3 import S3Store

        options = {k: v for k, v in spec.items() if k not in ("kind", "bucket", "prefix")}
        return S3Store(spec["bucket"], spec.get("prefix", ""), **options)
    raise StoreError(f"unknown store kind {kind!r}; known: local, memory, s3")
