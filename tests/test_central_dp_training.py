"""Central DP in a training run (issue 13): the trainer turns [privacy.central] into each round's release, with the
run's sampler; a run stopped after a release and resumed counts it once and ends with the same model bytes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from safetensors.numpy import load

from gradshard.aggregation.driver import AggregateConfig
from gradshard.errors import GradshardError
from gradshard.fl.config import TrainConfig
from gradshard.fl.driver import Trainer, sample_cohort
from gradshard.format.keys import CONFIG_KEY, aggregate_key, manifest_key, metrics_key, model_key, state_key
from gradshard.privacy.accountant import Release, epsilon
from gradshard.privacy.config import CentralDP, PrivacyConfig
from gradshard.privacy.ledger import PrivacyLedger
from gradshard.runtime import InlineExecutor, LocalExecutor
from gradshard.store import LocalStore, MemoryStore


def config(tmp_path: Path, **changes: object) -> TrainConfig:
    central = CentralDP(noise_multiplier=0.8, clip=1.0, key_file=str(tmp_path / "dp.key"))
    settings: dict[str, object] = {
        "clients": 8, "per_round": 4, "rounds": 2, "epochs": 1, "batch_size": 16, "lr": 0.1, "momentum": 0.9,
        "aggregation": AggregateConfig(shards=3, weighting="uniform"), "privacy": PrivacyConfig(central=central)}
    settings.update(changes)
    return TrainConfig.model_validate(settings)


def test_example_weighting_is_refused_for_central_dp(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="weighting = 'uniform'"):
        config(tmp_path, aggregation=AggregateConfig(shards=3))


def test_poisson_sampling_draws_each_client_independently_and_reproducibly(tmp_path: Path) -> None:
    c = config(tmp_path, clients=200, per_round=20, sampling="poisson")
    sizes = [len(sample_cohort(c, r)) for r in range(40)]
    assert sample_cohort(c, 3) == sample_cohort(c, 3)
    assert len(set(sizes)) > 3  # not a fixed size
    assert 14 < sum(sizes) / len(sizes) < 26  # mean 20 = 200 · 0.1 (std of the mean ≈ 0.67)


def test_a_run_resumed_after_a_release_counts_it_once_and_gives_the_same_model(tmp_path: Path) -> None:
    # Prepare
    c = config(tmp_path)
    with LocalExecutor(workers=2) as aggregation, LocalExecutor(workers=2, timeout_s=120.0) as clients:
        once = LocalStore(tmp_path / "once", fsync=False)
        metrics = Trainer(once, c, aggregation, clients).run()

        # Execute: the same run, stopped after round 1 was released (its ledger entry written) but before the
        # aggregate was published, then resumed
        twice = LocalStore(tmp_path / "twice", fsync=False)
        Trainer(twice, c, aggregation, clients).run()
        for key in (aggregate_key(1), model_key(2), metrics_key(1), manifest_key(1)):
            twice.delete(key)
        for slot in c.server.slots:
            twice.delete(state_key(2, slot))
        resumed = Trainer(twice, c, aggregation, clients).run()

    # Assert: two releases in each ledger; ε is the accountant's for fixed-size sampling (4 of 8) after each round
    for store in (once, twice):
        assert [e.round for e in PrivacyLedger(store).entries()] == [0, 1]
    for r, m in enumerate(metrics):
        assert m["aggregated"] and m["central_dp"]["sigma"] == pytest.approx(0.8 * 1.0 / 4)
        assert m["central_dp"]["epsilon"] == pytest.approx(epsilon(
            [Release(noise_multiplier=0.8, sampler="fixed", population=8, sampled=4, steps=r + 1)], 1e-5))
    assert resumed[1]["central_dp"] == metrics[1]["central_dp"]
    assert once.get(model_key(2)) == twice.get(model_key(2))


BATCHNORM_TASK = '''
import torch
from sklearn.datasets import load_breast_cancer

from gradshard.fl.data import from_arrays, stratified_split
from gradshard.fl.task import Task


def data():
    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    train, test = stratified_split(y, 0.25, seed=0)
    return from_arrays(x[train], y[train], 2), from_arrays(x[test], y[test], 2)


def model():
    return torch.nn.Sequential(torch.nn.Linear(30, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


task = Task(model=model, data=data, name="bn")
'''


def test_integer_buffers_are_never_clipped_or_noised(tmp_path: Path) -> None:
    # Prepare: a model with BatchNorm (its num_batches_tracked is int64)
    (tmp_path / "bn_task.py").write_text(BATCHNORM_TASK)
    c = config(tmp_path, clients=4, per_round=4, rounds=1)
    store = LocalStore(tmp_path / "run", fsync=False)

    # Execute
    with LocalExecutor(workers=2) as aggregation, LocalExecutor(workers=2, timeout_s=120.0) as clients:
        trainer = Trainer(store, c, aggregation, clients, task=f"{tmp_path / 'bn_task.py'}:task")
        metrics = trainer.run()

    # Assert: the counter is a kept buffer (not in the aggregated, noised layout) and the server's copy is untouched;
    # the float running statistics are data-dependent, so they are aggregated (clipped and noised) with the weights
    names = {t.name: t.dtype for t in trainer.layout}
    assert names["1.num_batches_tracked"] == "int64"
    assert "1.num_batches_tracked" not in {t.name for t in trainer.averaged}
    assert "1.running_mean" in {t.name for t in trainer.averaged}
    assert metrics[0]["central_dp"] is not None and metrics[0]["aggregated"]
    kept = load(store.get("models/kept.safetensors"))  # the server's initial value: clients trained 1 round
    assert kept["1.num_batches_tracked"].dtype == np.int64 and int(kept["1.num_batches_tracked"][()]) == 0


def test_a_run_stored_before_the_privacy_options_existed_still_resumes(tmp_path: Path) -> None:
    store = MemoryStore()
    c = TrainConfig(clients=4, rounds=1, epochs=1)
    Trainer(store, c, InlineExecutor()).prepare()
    old = json.loads(store.get(CONFIG_KEY))
    for newer in ("sampling", "privacy", "keys_dir", "supernet"):
        old.pop(newer, None)
    store.put(CONFIG_KEY, json.dumps(old).encode())
    Trainer(store, c, InlineExecutor()).prepare()  # the missing fields are their defaults: the same run
    with pytest.raises(GradshardError, match="differs in sampling"):
        Trainer(store, c.model_copy(update={"sampling": "poisson"}), InlineExecutor()).prepare()
