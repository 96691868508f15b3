"""Secure aggregation in training (``[secure_aggregation]``, gradshard.fl.secure): the clients agree keys, upload
masked updates and reveal shares as client functions; the server's aggregate is the survivors' quantized mean."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from gradshard.aggregation.driver import AggregateConfig
from gradshard.fl.client import load_arrays
from gradshard.fl.config import DataConfig, TrainConfig
from gradshard.fl.driver import Trainer
from gradshard.fl.secure import SecureAggregationConfig, read_secret
from gradshard.format.keys import aggregate_key, client_data_key, model_key, update_key
from gradshard.format.update import read_flat, read_header
from gradshard.runtime import InlineExecutor
from gradshard.security.secagg import SecAggClient
from gradshard.store import MemoryStore, S3Store

CLIENTS = [f"client-{i:04d}" for i in range(4)]
BITS, CLIP = 16, 8.0


def _config(tmp_path: Path, **overrides: object) -> TrainConfig:
    settings: dict[str, object] = dict(model="mlp", data=DataConfig(name="digits", partition="iid"), clients=4,
                                       rounds=1, epochs=1, batch_size=32, lr=0.1, seed=0, keys_dir=str(tmp_path),
                                       secure_aggregation=SecureAggregationConfig(bits=BITS, clip=CLIP))
    settings.update(overrides)
    return TrainConfig(**settings)  # type: ignore[arg-type]


def _expected_mean(tmp_path: Path, survivors: list[str], agreed: list[str], weighted: bool = True) -> np.ndarray:
    """The survivors' quantized mean from their plain deltas (a plain run of the same seeds) and their own
    rounding streams: Σ qᵢ mod 2³², read as int32, ÷ (2^bits · Σ wᵢ), rounded once to float32, where wᵢ is the
    client's example count ÷ the largest of the agreeing clients' (weighted) or 1."""
    plain = MemoryStore()
    trainer = Trainer(plain, TrainConfig(model="mlp", data=DataConfig(name="digits", partition="iid"), clients=4,
                                         rounds=1, epochs=1, batch_size=32, lr=0.1, seed=0,
                                         aggregation=AggregateConfig(weighting="uniform")), InlineExecutor())
    trainer.run()
    counts = {c: len(load_arrays(plain, client_data_key(c))["y"]) for c in agreed}
    weights = {c: counts[c] / max(counts.values()) if weighted else 1.0 for c in agreed}
    total = np.zeros(trainer.averaged.numel, dtype=np.uint32)
    threshold = SecureAggregationConfig().threshold_for(len(agreed))
    for client in survivors:
        delta = read_flat(plain, update_key(0, client), trainer.averaged)
        agent = SecAggClient(client, 0, agreed, threshold, read_secret(str(tmp_path / f"{client}.secagg")))
        total += agent.quantized(delta, bits=BITS, clip=CLIP, weight=weights[client])
    out = np.empty(len(total), dtype=np.float32)
    denominator = math.fsum(weights[c] for c in survivors) if weighted else len(survivors)
    np.divide(total.view(np.int32), float(2**BITS) * denominator, out=out, dtype=np.float64, casting="unsafe")
    return out


@pytest.mark.parametrize("weighting", ["examples", "uniform"])
def test_a_secure_round_aggregates_exactly_the_clients_quantized_mean(tmp_path: Path, weighting: str) -> None:
    # Execute: one secure round of 4 clients, sharded in 3, weighted by example counts or not
    store = MemoryStore()
    trainer = Trainer(store, _config(tmp_path, aggregation=AggregateConfig(shards=3, weighting=weighting)),
                      InlineExecutor())
    history = trainer.run()

    # Assert: every client counted; no update in the store is plain; the aggregate is the expected bytes
    assert history[0]["aggregated"] == CLIENTS
    for client in CLIENTS:
        with store.open_reader(update_key(0, client)) as reader:
            assert read_header(reader, "u", client).metadata["gradshard.encoding"] == "secagg"
    aggregate = read_flat(store, aggregate_key(0), trainer.averaged)
    assert aggregate.tobytes() == _expected_mean(tmp_path, CLIENTS, CLIENTS, weighting == "examples").tobytes()


def test_a_client_that_fails_after_the_key_agreement_is_unmasked_out(tmp_path: Path) -> None:
    # Prepare / Execute: client-0002 fails at masking (its update is NaN, which cannot be quantized)
    store = MemoryStore()
    trainer = Trainer(store, _config(tmp_path, faults={"0/client-0002": "nan"}), InlineExecutor())
    history = trainer.run()

    # Assert: the three survivors' exact mean, client-0002's masks removed through the others' reveals
    survivors = [c for c in CLIENTS if c != "client-0002"]
    assert history[0]["aggregated"] == survivors and "client-0002" in history[0]["failed"]
    aggregate = read_flat(store, aggregate_key(0), trainer.averaged)
    assert aggregate.tobytes() == _expected_mean(tmp_path, survivors, CLIENTS).tobytes()


def test_the_same_secure_run_gives_the_same_model_for_every_m(tmp_path: Path) -> None:
    one, four = MemoryStore(), MemoryStore()
    Trainer(one, _config(tmp_path, rounds=2, aggregation=AggregateConfig(shards=1)), InlineExecutor()).run()
    Trainer(four, _config(tmp_path, rounds=2, aggregation=AggregateConfig(shards=4)), InlineExecutor()).run()
    assert one.get(model_key(2)) == four.get(model_key(2))


@pytest.mark.parametrize(("overrides", "message"), [
    ({"secure_aggregation": None, "aggregation": AggregateConfig(reducer="secagg:16", weighting="uniform")},
     r"\[secure_aggregation\] table"),
    ({"compression": "int8"}, "compression must be 'none'"),
    ({"aggregation": AggregateConfig(reducer="median")}, "reducer must stay 'mean'"),
    ({"supernet": {}}, r"\[supernet\] and \[secure_aggregation\]"),
])
def test_a_secure_run_refuses_what_cannot_be_masked(tmp_path: Path, overrides: dict[str, object],
                                                     message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        _config(tmp_path, **overrides)


def test_a_secure_round_restarted_midway_ends_with_the_same_model(tmp_path: Path) -> None:
    # Prepare: a finished secure round, then undo part of it as a crash would have left it: one client's masked
    # update, two reveals and shares they need (fewer reveals than the threshold are left), the aggregate and
    # everything after it
    from gradshard.aggregation.secure import reveal_key, share_key
    from gradshard.format.keys import manifest_key, metrics_key, reports_key

    store = MemoryStore()
    Trainer(store, _config(tmp_path), InlineExecutor()).run()
    finished = store.get(model_key(1))
    for key in (update_key(0, "client-0001"), reveal_key(0, "client-0002"), reveal_key(0, "client-0003"),
                share_key(0, "client-0000", "client-0002"), share_key(0, "client-0001", "client-0003"),
                aggregate_key(0), manifest_key(0), reports_key(0), model_key(1), metrics_key(0)):
        store.delete(key)

    # Execute: a new trainer on the same store and keys
    Trainer(store, _config(tmp_path), InlineExecutor()).run()

    # Assert: the client retrained and masked the same words, the round unmasked to the same model
    assert store.get(model_key(1)) == finished


def test_a_client_whose_key_advert_is_malformed_is_left_out_and_the_others_agree(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a hostile client-0003 advertises keys that are not X25519 keys (its function is replaced to do so)
    import dataclasses
    import json

    from gradshard.fl import secure
    from gradshard.runtime import registry
    from gradshard.store import Store

    def hostile(step: secure.SecAggStep, store: Store) -> secure.SecAggStepResult:
        if step.client != "client-0003":
            return secure.secagg_advertise(step, store)
        store.put(secure.advert_key(step.round, step.client),
                  json.dumps({"mask_key": "zz", "share_key": "00" * 31}).encode())
        return secure.SecAggStepResult(written=1)

    spec = registry.spec_of("secagg_advertise")
    monkeypatch.setitem(registry._FUNCTIONS, "secagg_advertise", dataclasses.replace(spec, fn=hostile))

    # Execute
    history = Trainer(MemoryStore(), _config(tmp_path), InlineExecutor()).run()

    # Assert: the three others agreed and aggregated; client-0003's training step names why it could not mask
    assert history[0]["aggregated"] == CLIENTS[:3]
    assert "key directory" in history[0]["failed"]["client-0003"]


def test_presigned_clients_run_the_protocol_through_their_urls_only(tmp_path: Path, s3_store: S3Store) -> None:
    # Execute: clients (and their protocol steps) that reach only what the driver presigned, and the same run on a
    # memory store with the same secrets
    config = _config(tmp_path, rounds=2)
    Trainer(s3_store, config, InlineExecutor(), presigned_clients=True).run()
    local = MemoryStore()
    Trainer(local, config, InlineExecutor()).run()

    # Assert: the same model bytes; the protocol's records went through the URLs into the bucket
    assert s3_store.get(model_key(2)) == local.get(model_key(2))
    assert len(s3_store.list("rounds/000001/secagg/reveal/")) == 4


def test_an_altered_record_of_survivors_stops_the_restarted_round_naming_it(tmp_path: Path) -> None:
    # Prepare: a round that recorded its survivors, then a restart after someone rewrote the record
    from gradshard.errors import GradshardError
    from gradshard.fl.secure import survivors_key
    from gradshard.format.keys import metrics_key

    store = MemoryStore()
    Trainer(store, _config(tmp_path), InlineExecutor()).run()
    for key in (aggregate_key(0), model_key(1), metrics_key(0)):
        store.delete(key)
    store.put(survivors_key(0), b'["client-0000", "someone-else"]')

    # Execute / Assert
    with pytest.raises(GradshardError, match=r"survivors\.json is not the round's record of survivors"):
        Trainer(store, _config(tmp_path), InlineExecutor()).run()
