"""Error feedback for top-k updates (``TrainConfig.error_feedback``): each client adds what its earlier uploads left
out before choosing its top k, keeps the rest as its residual in the store, and carries it into the next round it
trains in only if the round's aggregate counted its update."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from gradshard.aggregation.driver import AggregateConfig
from gradshard.core.layout import ModelLayout
from gradshard.fl.client import ClientTask
from gradshard.fl.config import DataConfig, TrainConfig
from gradshard.fl.driver import Trainer
from gradshard.fl.task import TaskRef
from gradshard.format.compact import open_client_update
from gradshard.format.keys import model_key, residual_key, residual_prefix, update_key
from gradshard.format.sparse import k_of, top_k
from gradshard.format.update import read_flat
from gradshard.runtime import InlineExecutor
from gradshard.store import MemoryStore, S3Store, Store

CLIENTS = [f"client-{i:04d}" for i in range(3)]


def _config(rounds: int, **overrides: object) -> TrainConfig:
    settings: dict[str, object] = dict(model="mlp", data=DataConfig(name="digits", partition="iid"), clients=3,
                                       rounds=rounds, epochs=1, batch_size=32, lr=0.1, seed=0,
                                       compression="topk:0.05", aggregation=AggregateConfig(shards=2))
    settings.update(overrides)
    return TrainConfig(**settings)  # type: ignore[arg-type]


def _sent(store: Store, r: int, client: str, layout: ModelLayout) -> np.ndarray:
    """The densified top-k update a client uploaded in round r."""
    out = np.zeros(layout.numel, dtype=np.float32)
    with open_client_update(store, update_key(r, client), client, layout) as reader:
        reader.read_verified(0, layout.numel, out)
    return out


def test_a_residual_holds_exactly_what_the_top_k_upload_left_out() -> None:
    # Prepare / Execute: two rounds of top-k 5 % with error feedback; keep every residual (none is dropped before
    # round 1 ends, and round 1's residuals are the last)
    store = MemoryStore()
    trainer = Trainer(store, _config(2), InlineExecutor())
    trainer.run()
    layout = trainer.averaged
    k = k_of(0.05, layout.numel)

    for client in CLIENTS:
        # Assert: round 1's vector (its delta plus round 0's residual) = sent + residual, the sent part is its top k,
        # and the residual is +0.0 exactly where it sent
        sent = _sent(store, 1, client, layout)
        residual = read_flat(store, residual_key(1, client), layout)
        whole = sent + residual
        chosen = top_k(whole, k)
        outside = np.ones(layout.numel, dtype=bool)
        outside[chosen] = False
        assert np.array_equal(sent[chosen], whole[chosen]) and not np.any(sent[outside])
        assert np.all(residual[chosen] == 0.0)
        assert np.count_nonzero(residual) > layout.numel // 2  # most of the update is still carried
        # round 0's residual was dropped once round 1 counted the client; round 1's is the only one left
        assert store.list(residual_prefix(client)) == [residual_key(1, client)]


def test_the_carried_residual_changes_what_later_rounds_send() -> None:
    # Execute: the same run with and without error feedback
    with_ef, without = MemoryStore(), MemoryStore()
    Trainer(with_ef, _config(2), InlineExecutor()).run()
    Trainer(without, _config(2, error_feedback=False), InlineExecutor()).run()

    # Assert: round 0 (nothing carried yet) is the same bytes, round 1 is not; without it no residual is written
    assert with_ef.get(update_key(0, CLIENTS[0])) == without.get(update_key(0, CLIENTS[0]))
    assert with_ef.get(model_key(1)) == without.get(model_key(1))
    assert with_ef.get(update_key(1, CLIENTS[0])) != without.get(update_key(1, CLIENTS[0]))
    assert not without.list("clients/")


def test_a_client_whose_update_was_not_counted_carries_its_older_residual() -> None:
    # Prepare / Execute: client-0001 fails in round 1 (a NaN it cannot sparsify), so round 1 does not count it
    store = MemoryStore()
    trainer = Trainer(store, _config(2, faults={"1/client-0001": "nan"}), InlineExecutor())
    history = trainer.run()

    # Assert: it keeps round 0's residual, the others only round 1's; round 2 would carry accordingly
    assert "client-0001" in history[1]["failed"]
    assert store.list(residual_prefix("client-0001")) == [residual_key(0, "client-0001")]
    assert trainer._residual_round("client-0001", 2) == 0
    assert trainer._residual_round("client-0000", 2) == 1
    assert trainer._residual_round("client-0000", 1) is None  # its round-0 residual is gone: never read again


def test_a_task_carries_only_an_earlier_rounds_residual_of_a_top_k_update() -> None:
    base = dict(client="c", task=TaskRef(target="m:t"), model_key="models/000002.safetensors",
                model_sha256="x", chunk_elems=8, compression="topk:0.1")
    ClientTask(round=2, residual_from=1, residual_out=True, **base)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="earlier round"):
        ClientTask(round=2, residual_from=2, **base)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="error feedback is for top-k"):
        ClientTask(round=2, residual_out=True, **{**base, "compression": "int8"})  # type: ignore[arg-type]


def test_presigned_clients_read_and_write_their_residuals_through_their_urls(s3_store: S3Store) -> None:
    # Execute: clients that can reach only what the driver presigned for them, and the same run on a memory store
    config = _config(2)
    Trainer(s3_store, config, InlineExecutor(), presigned_clients=True).run()
    local = MemoryStore()
    Trainer(local, config, InlineExecutor()).run()

    # Assert: the same model bytes, and the residuals were written through the URLs
    assert s3_store.get(model_key(2)) == local.get(model_key(2))
    assert s3_store.list(residual_prefix(CLIENTS[0])) == [residual_key(1, CLIENTS[0])]
