"""Simulated Byzantine clients (gradshard.fl.attacks): what they upload, checked against the honest run's bytes, and
a robust round that keeps them out."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from gradshard.aggregation.driver import AggregateConfig
from gradshard.errors import GradshardError
from gradshard.fl.attacks import parse_attack, poison_labels, poison_update
from gradshard.fl.client import ClientTask
from gradshard.fl.config import DataConfig, TrainConfig
from gradshard.fl.driver import Trainer
from gradshard.fl.task import TaskRef
from gradshard.format.keys import manifest_key, root_update_key, selection_key, trust_key, update_key
from gradshard.format.round import load_manifest, load_spec
from gradshard.format.update import read_flat
from gradshard.runtime import InlineExecutor
from gradshard.store import MemoryStore


def test_attacks_are_parsed_and_bad_ones_refused_naming_the_kinds() -> None:
    assert parse_attack("scale:100").value == 100 and parse_attack("noise:0.5").value == 0.5
    assert parse_attack("label-flip").on_data and not parse_attack("sign-flip").on_data
    for text, message in [("scale", "unknown attack"), ("scale:0", "factor"), ("noise:-1", "σ > 0"),
                          ("noise:inf", "σ > 0"), ("sign-flip:2", "unknown attack"), ("backdoor", "known: sign-flip")]:
        with pytest.raises(GradshardError, match=message):
            parse_attack(text)


def test_update_attacks_change_the_delta_as_documented() -> None:
    delta = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    flipped, scaled, noisy, noisy_again, labels = (delta.copy() for _ in range(5))

    poison_update(parse_attack("sign-flip"), flipped, seed=1)
    poison_update(parse_attack("scale:100"), scaled, seed=1)
    poison_update(parse_attack("noise:2"), noisy, seed=1)
    poison_update(parse_attack("noise:2"), noisy_again, seed=1)
    poison_update(parse_attack("label-flip"), labels, seed=1)

    assert np.array_equal(flipped, -delta) and np.array_equal(scaled, delta * np.float32(100))
    assert np.array_equal(noisy, noisy_again) and 1.8 < float(np.std(noisy - delta)) < 2.2
    assert np.array_equal(labels, delta)
    assert poison_labels(parse_attack("label-flip"), np.array([0, 3, 9]), 10).tolist() == [9, 6, 0]


def test_a_config_naming_an_unknown_client_or_attack_is_refused() -> None:
    with pytest.raises(ValidationError, match="client-0009"):
        TrainConfig(clients=4, attacks={"client-0009": "sign-flip"})
    with pytest.raises(ValidationError, match="unknown attack"):
        TrainConfig(clients=4, attacks={"client-0001": "flip"})


def _run(attacks: dict[str, str], reducer: str = "mean", rounds: int = 1) -> MemoryStore:
    config = TrainConfig(model="mlp", data=DataConfig(name="digits", partition="iid"), clients=7, rounds=rounds,
                         epochs=1, batch_size=32, lr=0.1, seed=0, attacks=attacks,
                         aggregation=AggregateConfig(reducer=reducer, weighting="uniform"))
    store = MemoryStore()
    Trainer(store, config, InlineExecutor()).run()
    return store


def test_an_attacker_uploads_its_honest_update_poisoned_and_krum_leaves_it_out() -> None:
    # Prepare / Execute: the same seeded round, honest, then with client-0001 sign-flipping and client-0002 scaling
    honest = _run({})
    attacked = _run({"client-0001": "sign-flip", "client-0002": "scale:100"}, reducer="krum:2")

    # Assert: the attackers' uploads are exactly their honest updates, poisoned; everyone else's are unchanged
    def update(store: MemoryStore, client: str) -> Any:
        return read_flat(store, update_key(0, client), load_spec(store, 0).model_layout(), client)

    assert np.array_equal(update(attacked, "client-0001"), -update(honest, "client-0001"))
    assert np.array_equal(update(attacked, "client-0002"), update(honest, "client-0002") * np.float32(100))
    assert np.array_equal(update(attacked, "client-0003"), update(honest, "client-0003"))
    selected = json.loads(attacked.get(selection_key(0)))["selected"]
    assert selected and not {"client-0001", "client-0002"} & set(selected)


def test_fltrust_training_trains_the_root_update_every_round_and_distrusts_a_sign_flipper() -> None:
    # Execute: two rounds, client-0001 uploads its update reversed
    store = _run({"client-0001": "sign-flip"}, reducer="fltrust", rounds=2)

    # Assert: a root update per round (not a client: never in the updates), trust 0 for the attacker
    for r in range(2):
        assert store.exists(root_update_key(r)) and not store.exists(update_key(r, "server-root"))
        record = json.loads(store.get(trust_key(r)))
        assert record["trust"][record["clients"].index("client-0001")] == 0
        assert all(t > 0 for c, t in zip(record["clients"], record["trust"], strict=True) if c != "client-0001")
        assert load_manifest(store, manifest_key(r)).rejected["client-0001"].startswith("FLTrust trust 0")


def test_a_client_task_writes_only_its_update_or_the_root_update() -> None:
    fields: dict[str, Any] = {"round": 0, "task": TaskRef(target="gradshard.fl.builtin:mlp"), "model_key": "m",
                              "model_sha256": "", "chunk_elems": 64}
    with pytest.raises(ValidationError, match="its own update or the round's root update"):
        ClientTask(client="client-0000", output_key="models/000001.safetensors", **fields)
    assert ClientTask(client="server-root", output_key=root_update_key(0), **fields).output_key
