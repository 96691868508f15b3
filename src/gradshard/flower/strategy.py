"""A Flower FedAvg (Message API, ``flwr.serverapp.strategy``) whose aggregation runs through gradshard.

Each train reply carries either a reference to an update the client wrote to the store (:func:`write_reply`) or,
from an unchanged ClientApp, its ArrayRecord, which the strategy writes to the store itself. The accepted replies'
updates are then reduced by :func:`gradshard.aggregation.driver.aggregate_round` (M shard functions) and the
aggregate is read back as the new global ArrayRecord. Clients are ordered by node id, and the arithmetic is that of
Flower's ``aggregate_arrayrecords``, so the result equals ``FedAvg`` on the replies sorted by node id byte for byte.

A reply whose reference points to a missing, changed or corrupt update (or that carries no usable weight) is a
failure of that client: it is logged like Flower's error replies, left out of the round and listed in
:attr:`GradshardFedAvg.failures`; the round goes on without it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any, Literal

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from gradshard.aggregation.driver import AggregateConfig, aggregate_round
from gradshard.core.layout import ModelLayout
from gradshard.errors import GradshardError, ObjectNotFoundError, StoreError
from gradshard.flower.arrays import flatten_record, layout_of, record_arrays, to_record
from gradshard.flower.client import examples_of
from gradshard.flower.protocol import ROUND_KEY, STORE_KEY, WEIGHT_KEY, UpdateReference, client_id
from gradshard.format.keys import aggregate_key, update_key, updates_prefix
from gradshard.format.round import RoundSpec, load_spec, open_round
from gradshard.format.update import UpdateMeta, open_update, read_flat
from gradshard.format.writer import write_update
from gradshard.runtime import Executor, InlineExecutor
from gradshard.store import Store

log = logging.getLogger(__name__)


class ClientFailure(GradshardError):
    """A train reply the strategy cannot use; the client is left out of the round."""


class GradshardFedAvg(FedAvg):
    """FedAvg whose ArrayRecord average is computed by gradshard's sharded aggregation.

    Parameters beyond :class:`flwr.serverapp.strategy.FedAvg`'s (passed through as keywords):

    store : Store
        Where round ``round_offset + server_round`` lives. Clients in other processes reopen it from its spec
        (local directory or S3); a memory store serves only ClientApps that are handed it.
    shards : int or "auto" (default: "auto", one per invocation the executor runs at once)
        M, the number of shard functions; the aggregate is the same for every M.
    executor : Executor | None (default: None, an InlineExecutor)
        Runs the shard functions, e.g. ``LocalExecutor(workers=4, memory_cap_bytes=...)``.
    aggregation : AggregateConfig | None
        Further gradshard settings (window, topology, policy); ``shards``, the accumulation dtype (that of the
        model) and the weighting (the reply metric ``weighted_by_key``, as Flower's) are set by the strategy.
    round_offset : int (default: 0)
        Added to Flower's server round to name the gradshard round, so several runs can share one store.
    """

    def __init__(self, store: Store, *, shards: int | Literal["auto"] = "auto", executor: Executor | None = None,
                 aggregation: AggregateConfig | None = None, round_offset: int = 0, **fedavg: Any) -> None:
        super().__init__(**fedavg)
        self.store = store
        self.executor = executor if executor is not None else InlineExecutor()
        self.aggregation = aggregation or AggregateConfig()
        self.shards = shards
        self.round_offset = round_offset
        self.failures: dict[int, list[tuple[int, str]]] = {}  # server round -> [(node id, reason)]
        self._layouts: dict[int, ModelLayout] = {}
        try:
            self._store_spec = json.dumps(store.spec())
        except StoreError:
            self._store_spec = ""  # a memory store: only ClientApps given the store can write to it

    def summary(self) -> None:
        super().summary()
        log.info("gradshard: store %s, %s shards, executor %s, topology %s", self._store_spec or "(in-process)",
                 self.shards, type(self.executor).__name__, self.aggregation.topology)

    # --- training ------------------------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Open the gradshard round for the global model's layout, then sample and configure as FedAvg does."""
        r = self.round_offset + server_round
        layout = layout_of(record_arrays(arrays))
        self._remove_leftovers(r)
        open_round(self.store, RoundSpec.create(r, layout))
        self._layouts[r] = layout
        config[ROUND_KEY] = r
        config[WEIGHT_KEY] = self.weighted_by_key
        config[STORE_KEY] = self._store_spec
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the replies' updates with gradshard (clients by node id) and their metrics as FedAvg does."""
        r = self.round_offset + server_round
        failures = self.failures.setdefault(server_round, [])
        ordered = sorted(replies, key=lambda msg: msg.metadata.src_node_id)
        for msg in ordered:
            if msg.has_error():
                failures.append((msg.metadata.src_node_id, f"error reply: {msg.error.reason}"))
        accepted: dict[str, tuple[Message, float]] = {}
        layout = self._layouts.get(r) or load_spec(self.store, r).model_layout()
        for msg in (m for m in ordered if not m.has_error()):
            node = msg.metadata.src_node_id
            try:
                accepted[client_id(node)] = (msg, self._admit(r, layout, msg))
            except GradshardError as exc:
                failures.append((node, str(exc)))
        arrays = self._aggregate(r, layout, accepted, failures) if accepted else None
        for node, reason in failures:
            log.info("aggregate_train: node %d failed: %s", node, reason)
        if arrays is None:
            return None, None
        contents = [msg.content for msg, _ in accepted.values()]
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)

    def _admit(self, r: int, layout: ModelLayout, msg: Message) -> float:
        """Check one reply (writing its arrays to the store if it carries them); returns the client's weight."""
        content = msg.content
        client = client_id(msg.metadata.src_node_id)
        if len(content.metric_records) != 1:
            raise ClientFailure(f"the reply has {len(content.metric_records)} MetricRecords, FedAvg needs one")
        metrics = next(iter(content.metric_records.values()))
        examples = examples_of(metrics, self.weighted_by_key)
        weight = float(metrics[self.weighted_by_key])  # type: ignore[arg-type]  # checked by examples_of
        reference = UpdateReference.find(content)
        if reference is None:
            if len(content.array_records) != 1:
                raise ClientFailure("the reply carries neither one ArrayRecord nor a gradshard update reference")
            flat = flatten_record(next(iter(content.array_records.values())), layout)
            spec = load_spec(self.store, r)
            meta = UpdateMeta(client=client, round=r, examples=examples, layout_digest=layout.digest(),
                              chunk_elems=spec.chunk_elems, base_model=spec.base_model, digest=spec.digest)
            write_update(self.store, update_key(r, client), layout, flat, meta)
            return weight
        if reference.client != client or reference.key != update_key(r, client):
            raise ClientFailure(f"the reference names {reference.client!r} at {reference.key!r}, but node "
                                f"{msg.metadata.src_node_id} of round {r} writes {update_key(r, client)!r}")
        try:
            with open_update(self.store, reference.key, client, layout) as update:
                if update.sha256 != reference.header_sha256:
                    raise ClientFailure(f"its update {reference.key} changed since the client replied (header "
                                        f"sha256 {update.sha256[:12]}, the reply says {reference.header_sha256[:12]})")
        except ObjectNotFoundError:
            raise ClientFailure(f"its update {reference.key} is missing from the store") from None
        return weight

    def _aggregate(self, r: int, layout: ModelLayout, accepted: dict[str, tuple[Message, float]],
                   failures: list[tuple[int, str]]) -> ArrayRecord | None:
        """Reduce the accepted clients' updates; clients the functions reject become failures."""
        spec = load_spec(self.store, r)
        open_round(self.store, spec.model_copy(update={"cohort": sorted(accepted)}))  # only this round's replies
        config = AggregateConfig.model_validate({
            **self.aggregation.model_dump(), "shards": self.shards, "accumulate": layout.flat_dtype,
            "reducer": "mean", "weighting": "server",
            "weights": {client: weight for client, (_, weight) in accepted.items()}})
        try:
            result = aggregate_round(self.store, r, self.executor, config)
        except GradshardError as exc:
            failures.extend((msg.metadata.src_node_id, f"round {r} failed: {exc}") for msg, _ in accepted.values())
            accepted.clear()
            return None
        for client, reason in result.manifest.rejected.items():
            if client in accepted:
                failures.append((accepted.pop(client)[0].metadata.src_node_id, reason))
        return to_record(layout, read_flat(self.store, aggregate_key(r), layout, "aggregate"))

    def _remove_leftovers(self, r: int) -> None:
        """Updates already under round ``r`` (an earlier run on this store) cannot answer this round: remove them."""
        stale = self.store.list(updates_prefix(r))
        if stale:
            log.warning("round %d: removing %d updates left in the store by an earlier run", r, len(stale))
        for key in stale:
            self.store.delete(key)
