"""The typed invocation contracts of the aggregation functions: one pydantic model per function's arguments and
one per result, used by the producer (a topology's plan), the consumer (the function), the driver that merges
results and the cost model that reads plans. Each model travels as JSON (processes, Ray tasks, Lambda events).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, FieldSerializationInfo, field_serializer

from gradshard.core.reduce import ACCUMULATE_DTYPES
from gradshard.format.writer import OutputTarget
from gradshard.store.base import StoreSpec

__all__ = ["OutputTarget"]  # re-exported: part of these contracts, defined with the writer

Accumulate = Literal["float32", "float64"]
Weighting = Literal["examples", "uniform", "server"]
assert set(ACCUMULATE_DTYPES) == {"float32", "float64"}


class Contract(BaseModel):
    """Base of every function's arguments and results: validated, immutable, no unknown fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class RoundRef(Contract):
    """The validated round a function reads: its manifest, pinned by the manifest's sha256."""

    manifest_key: str
    manifest_sha256: str


class NoiseSpec(Contract):
    """Gaussian noise added to every element of the aggregate (central DP): ``σ · z_j``, where ``z_j`` is a pure
    function of the round's secret ``key`` and the element index (:mod:`gradshard.privacy.noise`).

    The key travels with the invocation only: plans written to reports show it as ``<redacted>``."""

    sigma: float = Field(ge=0, allow_inf_nan=False)
    key: str = Field(pattern=r"^[0-9a-f]{32,128}$")

    @field_serializer("key")
    def _redact(self, key: str, info: FieldSerializationInfo) -> str:
        return "<redacted>" if isinstance(info.context, dict) and info.context.get("redact") else key


class ReduceSettings(Contract):
    """How a reducing function reduces (the plan's :class:`~gradshard.topology.common.ReduceOptions`)."""

    window_bytes: int = Field(ge=1)
    accumulate: Accumulate = "float32"
    weighting: Weighting = "examples"
    reducer: str = "mean"
    parallel_reads: int = Field(default=1, ge=1)
    noise: NoiseSpec | None = None


class RangeArgs(Contract):
    """A phase-1 function's arguments: the round and the chunk-aligned elements ``[start, stop)`` it reads of every
    client (``client_norms``, ``pairwise_distances``)."""

    round: RoundRef
    start: int = Field(ge=0)
    stop: int = Field(ge=1)


class ShardReduceArgs(Contract):
    """``shard_reduce``: reduce elements ``[start, stop)`` across every client of the round."""

    round: RoundRef
    output: OutputTarget
    settings: ReduceSettings
    start: int = Field(ge=0)
    stop: int = Field(ge=1)


class FlatReduceArgs(Contract):
    """``flat_reduce``: the single-aggregator reference over whole updates."""

    round: RoundRef
    output: OutputTarget
    settings: ReduceSettings


class ReduceResult(Contract):
    """What a reducing function returns: the digest of every output chunk it wrote, and what it read."""

    checksums: dict[int, str]
    clients: int = Field(ge=0)
    window_elems: int = Field(ge=0)
    bytes_read_per_client: dict[str, int] = Field(default_factory=dict)


Via = Literal["store", "shm"]


class PartialRef(Contract):
    """A tree node's partial sum: its key and whether it sits in the object store or its node's shared memory."""

    key: str
    via: Via = "store"


class TreeReduceArgs(Contract):
    """``tree_reduce``: fold clients and children's partials; ``output`` None makes this node the root."""

    round: RoundRef
    settings: ReduceSettings
    clients: tuple[str, ...] = ()
    partials: tuple[PartialRef, ...] = ()
    output: PartialRef | None = None
    target: OutputTarget | None = None  # the root's aggregate upload
    node_store: StoreSpec | None = None
    wait_s: float = Field(default=0.0, ge=0)


class TreeReduceResult(Contract):
    """A tree node's partial weight and hand-offs; the root also returns its output chunks' digests."""

    clients: int = Field(ge=0)
    partials: int = Field(ge=0)
    weight: float
    shm: dict[str, int] = Field(default_factory=dict)
    checksums: dict[int, str] = Field(default_factory=dict)
