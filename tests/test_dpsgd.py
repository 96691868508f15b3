"""Client DP-SGD (Opacus) and the per-client privacy ledger (issue 13, client side).

- DP-SGD changes a client's update, and the same seed gives the same bytes twice;
- the round's ε is ``accountant.epsilon`` of (z, q, steps, δ) recomputed here, and ≈ Opacus's own RDP accountant;
- the composed ε after T rounds is one release of T·steps; re-accounting a round (a resumed driver) records it once;
- clipping is real: huge noise gives chance accuracy, and a tiny clip bounds the update's norm;
- ``max_epsilon`` keeps a client out before it trains; BatchNorm, custom train and FedProx are refused;
- the CLI flags and ``[privacy.client]`` map onto ``TrainConfig.privacy.client``.

Everything runs in this process (InlineExecutor, MemoryStore) on digits with an MLP and 4 clients.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

pytest.importorskip("opacus")

from opacus.accountants import RDPAccountant

from gradshard.cli.train import _round_line, train_config
from gradshard.fl.builtin import builtin_ref
from gradshard.fl.client import ClientResult, ClientTask, load_arrays, train_client
from gradshard.fl.config import DataConfig, TrainConfig
from gradshard.fl.data import Dataset, from_arrays
from gradshard.fl.driver import RoundMetrics, Trainer, client_ids
from gradshard.fl.task import Scores, Task, TaskError, TrainContext, default_train, load_task
from gradshard.format.keys import client_data_key, metrics_key, update_key
from gradshard.format.update import open_update, read_flat
from gradshard.privacy import client_ledger
from gradshard.privacy.accountant import Release, epsilon
from gradshard.privacy.config import ClientDP, PrivacyConfig
from gradshard.privacy.dpsgd import train_private
from gradshard.runtime import InlineExecutor
from gradshard.store import MemoryStore

Z, CLIP, DELTA, BATCH = 1.1, 1.0, 1e-5, 16


def _config(rounds: int = 2, **dp: Any) -> TrainConfig:
    client = ClientDP(**{"noise_multiplier": Z, "max_grad_norm": CLIP, "delta": DELTA, **dp})
    return TrainConfig(model="mlp", data=DataConfig(name="digits", partition="iid"), clients=4, rounds=rounds,
                       epochs=1, batch_size=BATCH, lr=0.1, momentum=0.0, seed=0,
                       privacy=PrivacyConfig(client=client))


def _first_task(trainer: Trainer) -> ClientTask:
    trainer.prepare()
    task = trainer._client_plan(trainer._open(0)).invocations[0].args
    assert isinstance(task, ClientTask)
    return task


def _examples(store: MemoryStore, client: str) -> int:
    return len(load_arrays(store, client_data_key(client))["y"])


def _release(examples: int, steps_per_round: int = 1, rounds: int = 1, z: float = Z) -> Release:
    """The release derived here from first principles: Poisson rate 1/⌈n/b⌉, ⌈n/b⌉ steps an epoch."""
    batches = math.ceil(examples / BATCH)
    return Release(noise_multiplier=z, sampler="poisson", sample_rate=1 / batches,
                   steps=batches * steps_per_round * rounds)


# --- one client ----------------------------------------------------------------------------------------------------
def test_dpsgd_changes_the_update_and_the_same_seed_gives_the_same_bytes() -> None:
    store = MemoryStore()
    task = _first_task(Trainer(store, _config(), InlineExecutor()))
    key = update_key(0, task.client)

    train_client(task, store)
    first = store.get(key)
    train_client(task, store)
    second = store.get(key)
    train_client(task.model_copy(update={"dp": None}), store)
    plain = store.get(key)

    assert first == second
    assert first != plain


def test_round_epsilon_is_the_accountants_and_agrees_with_opacus() -> None:
    store = MemoryStore()
    task = _first_task(Trainer(store, _config(), InlineExecutor()))

    result = train_client(task, store)

    expected = _release(_examples(store, task.client))
    assert result.release == expected
    assert result.delta == DELTA
    assert result.epsilon == epsilon([expected], DELTA)
    opacus = RDPAccountant()
    opacus.history = [(Z, expected.sample_rate, expected.steps)]
    assert result.epsilon == pytest.approx(opacus.get_epsilon(DELTA), rel=2e-3)
    assert ClientResult.model_validate_json(result.model_dump_json()) == result  # crosses a function boundary


# --- across rounds ---------------------------------------------------------------------------------------------------
def test_composed_epsilon_after_t_rounds_is_one_release_of_all_steps() -> None:
    store = MemoryStore()
    rounds = 3

    history = Trainer(store, _config(rounds=rounds), InlineExecutor()).run()

    for client in client_ids(4):
        n = _examples(store, client)
        for t, m in enumerate(history):
            privacy = m["client_privacy"]
            assert privacy["round_epsilon"][client] == pytest.approx(epsilon([_release(n)], DELTA))
            assert privacy["epsilon"][client] == pytest.approx(epsilon([_release(n, rounds=t + 1)], DELTA), rel=1e-9)
        stored = client_ledger.load_ledger(store, client, DELTA)
        assert sorted(stored.rounds) == list(range(rounds))
        assert stored.epsilon == pytest.approx(epsilon([_release(n, rounds=rounds)], DELTA), rel=1e-9)
    last = history[-1]["client_privacy"]
    assert last["max_epsilon"] == max(last["epsilon"].values())
    assert history[0]["client_privacy"]["epsilon"] != last["epsilon"]  # composition grows


def test_a_resumed_round_is_accounted_once() -> None:
    store = MemoryStore()
    Trainer(store, _config(rounds=2), InlineExecutor()).run()
    before = {c: client_ledger.load_ledger(store, c, DELTA) for c in client_ids(4)}
    store.delete(metrics_key(1))  # the driver died after round 1's accounting, before its metrics

    history = Trainer(store, _config(rounds=2), InlineExecutor()).run()

    assert history[1]["resumed"]
    for client in client_ids(4):
        after = client_ledger.load_ledger(store, client, DELTA)
        assert sorted(after.rounds) == [0, 1]
        assert after == before[client]
    entry = before["client-0000"].rounds[1]
    client_ledger.record_release(store, "client-0000", 1, entry.release, DELTA)  # re-recording replaces
    assert client_ledger.load_ledger(store, "client-0000", DELTA) == before["client-0000"]


def test_max_epsilon_keeps_a_client_out_before_it_trains() -> None:
    scratch, store = MemoryStore(), MemoryStore()
    Trainer(scratch, _config(rounds=2), InlineExecutor()).prepare()  # the same data partition, to size the budget
    sizes = {c: _examples(scratch, c) for c in client_ids(4)}
    one = max(epsilon([_release(n)], DELTA) for n in sizes.values())
    two = min(epsilon([_release(n, rounds=2)], DELTA) for n in sizes.values())
    assert one < two
    budget = (one + two) / 2

    history = Trainer(store, _config(rounds=2, max_epsilon=budget), InlineExecutor()).run()

    assert len(history[0]["aggregated"]) == 4
    assert history[1]["cohort"] == [] and history[1]["aggregated"] == []
    excluded = history[1]["client_privacy"]["excluded"]
    assert sorted(excluded) == client_ids(4)
    assert all("max_epsilon" in why for why in excluded.values())
    for client in client_ids(4):
        assert not store.exists(update_key(1, client))  # never trained: released nothing
        stored = client_ledger.load_ledger(store, client, DELTA)
        assert sorted(stored.rounds) == [0] and 1 in stored.excluded
        assert stored.epsilon <= budget


# --- clipping and noise are real ---------------------------------------------------------------------------------
def _digits() -> tuple[Task, Dataset, Dataset]:
    task = load_task(builtin_ref("mlp", "digits", 0.2, 0))
    assert task.data is not None
    train, test = task.data()
    return task, train, test


def _context(epochs: int = 1, momentum: float = 0.0) -> TrainContext:
    return TrainContext(round=0, client="c", epochs=epochs, batch_size=BATCH, lr=0.1, momentum=momentum, mu=0.0,
                        seed=3)


def test_huge_noise_gives_chance_accuracy() -> None:
    task, train, test = _digits()
    noisy, plain = task.build(), task.build()
    plain.load_state_dict(noisy.state_dict())

    train_private(task, noisy, train, _context(epochs=2), ClientDP(noise_multiplier=1000.0, max_grad_norm=1.0))
    default_train(task, plain, train, _context(epochs=2))

    assert task.score(noisy, test).accuracy < 0.25
    assert task.score(plain, test).accuracy > 0.8


def test_tiny_clip_bounds_the_update_norm() -> None:
    """SGD without momentum: Δ = -lr Σ_t (Σ_{i∈B_t} clip(g_i) + noise) / E|B|, so ‖Δ‖ ≤ lr·C·Σ_t|B_t| / E|B| plus the
    noise, and Σ_t |B_t| ≤ steps · n. The same loop with an unreachable clip goes far past that bound."""
    task, train, _ = _digits()
    data = from_arrays(train.x[:160], train.y[:160], train.num_classes)
    clip = 1e-3

    def update_norm(max_grad_norm: float) -> tuple[float, Release]:
        model = task.build()
        start = np.concatenate([p.detach().numpy().ravel() for p in model.parameters()])
        fit = train_private(task, model, data, _context(), ClientDP(noise_multiplier=1e-6, max_grad_norm=max_grad_norm))
        end = np.concatenate([p.detach().numpy().ravel() for p in model.parameters()])
        return float(np.linalg.norm(end - start)), fit.release

    clipped, release = update_norm(clip)
    unclipped, _ = update_norm(1e6)

    expected_batch = int(len(data) * release.sample_rate)
    bound = 0.1 * clip * release.steps * len(data) / expected_batch * (1 + 1e-3)
    assert clipped <= bound
    assert unclipped > 10 * bound


# --- refused -------------------------------------------------------------------------------------------------------
def _small_data() -> tuple[Dataset, Dataset]:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 8)).astype(np.float32), rng.integers(0, 2, 40)
    return from_arrays(x[:32], y[:32], 2), from_arrays(x[32:], y[32:], 2)


def _batchnorm_model() -> Any:
    from torch import nn

    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))


def _linear_model() -> Any:
    from torch import nn

    return nn.Sequential(nn.Linear(8, 2))


def _own_train(model: Any, data: Dataset, context: TrainContext) -> Scores:
    return Scores(0.0, 0.0)


BATCHNORM_TASK = Task(model=_batchnorm_model, data=_small_data, name="bn")
OWN_TRAIN_TASK = Task(model=_linear_model, data=_small_data, train=_own_train, name="own-train")


def _small_config(**extra: Any) -> TrainConfig:
    return TrainConfig(clients=2, rounds=1, epochs=1, batch_size=8,
                       privacy=PrivacyConfig(client=ClientDP(noise_multiplier=1.0, max_grad_norm=1.0)), **extra)


def test_batchnorm_is_refused_with_the_fix_named() -> None:
    with pytest.raises(TaskError, match=r"BatchNorm.*GroupNorm.*ModuleValidator\.fix"):
        Trainer(MemoryStore(), _small_config(), InlineExecutor(), task=BATCHNORM_TASK)
    train, _ = _small_data()
    with pytest.raises(TaskError, match="GroupNorm"):  # and in the client function itself
        train_private(BATCHNORM_TASK, _batchnorm_model(), train, _context(), ClientDP(noise_multiplier=1.0,
                                                                                      max_grad_norm=1.0))


def test_custom_train_and_fedprox_are_refused() -> None:
    with pytest.raises(TaskError, match="own train"):
        Trainer(MemoryStore(), _small_config(), InlineExecutor(), task=OWN_TRAIN_TASK)
    with pytest.raises(TaskError, match="FedProx"):
        Trainer(MemoryStore(), _small_config(mu=0.1), InlineExecutor())


# --- the CLI -------------------------------------------------------------------------------------------------------
def test_cli_flags_and_toml_map_onto_privacy_client() -> None:
    flags = {"dp_noise_multiplier": 1.3, "dp_max_grad_norm": 0.5, "dp_delta": 1e-6}
    config = train_config({}, flags, "test")
    assert config.privacy.client == ClientDP(noise_multiplier=1.3, max_grad_norm=0.5, delta=1e-6)

    toml = {"privacy": {"client": {"noise_multiplier": 2.0, "max_grad_norm": 1.0, "max_epsilon": 8.0}}}
    merged = train_config(toml, {"dp_delta": 1e-4}, "test")
    assert merged.privacy.client == ClientDP(noise_multiplier=2.0, max_grad_norm=1.0, delta=1e-4, max_epsilon=8.0)
    assert train_config({}, {}, "test").privacy.client is None


def test_round_line_shows_round_and_composed_epsilon() -> None:
    privacy = client_ledger.ClientPrivacyRound(delta=1e-5, round_epsilon={"a": 0.5, "b": 0.7},
                                               epsilon={"a": 1.0, "b": 1.4}, max_epsilon=1.4,
                                               excluded={"c": "privacy budget: ..."})
    m = RoundMetrics(round=1, cohort=["a", "b"], aggregated=["a", "b"], rejected={}, failed={}, test_loss=1.0,
                     test_accuracy=0.5, client_loss=None, client_seconds=0, aggregate_seconds=0, server_seconds=0,
                     wall_seconds=0, client_privacy=privacy)

    line = _round_line(m, 3)

    assert "ε this round 0.500–0.700, composed 1.000–1.400" in line and "max composed ε 1.400" in line
    assert "c left out (privacy budget" in line
    assert "client_privacy" not in RoundMetrics(**{**m.__dict__, "client_privacy": None}).to_dict()
    assert m.to_dict()["client_privacy"]["max_epsilon"] == 1.4


def test_update_metadata_carries_the_release() -> None:
    store = MemoryStore()
    trainer = Trainer(store, _config(), InlineExecutor())
    task = _first_task(trainer)

    result = train_client(task, store)

    assert np.isfinite(read_flat(store, update_key(0, task.client), trainer.averaged, task.client)).all()
    with open_update(store, update_key(0, task.client), task.client, trainer.averaged) as upd:
        assert client_ledger.release_from_extra(upd.meta.extra) == (result.release, DELTA)


def test_merging_equal_releases_composes_exactly() -> None:
    a = Release(noise_multiplier=1.1, sampler="poisson", sample_rate=1 / 23, steps=23)
    b = Release(noise_multiplier=2.0, sampler="poisson", sample_rate=1 / 23, steps=46)

    merged = client_ledger.merged((a, b, a, a))

    assert merged == (a.model_copy(update={"steps": 69}), b)
    assert client_ledger.composed_epsilon((a, b, a, a), DELTA) == pytest.approx(epsilon([a, b, a, a], DELTA), rel=1e-9)


@pytest.mark.parametrize("extra", [
    {"dp_noise_multiplier": "1.0"},  # fields missing
    {"dp_noise_multiplier": "x", "dp_sample_rate": "0.1", "dp_steps": "3", "dp_delta": "1e-5"},
    {"dp_noise_multiplier": "1.0", "dp_sample_rate": "7", "dp_steps": "3", "dp_delta": "1e-5"},
    {"dp_noise_multiplier": "1.0", "dp_sample_rate": "0.1", "dp_steps": "-1", "dp_delta": "1e-5"},
    {"dp_noise_multiplier": "1.0", "dp_sample_rate": "0.1", "dp_steps": "3", "dp_delta": "2"},
])
def test_a_malformed_release_in_an_update_is_refused_by_name(extra: dict[str, str]) -> None:
    from gradshard.errors import PrivacyError

    with pytest.raises(PrivacyError, match="DP-SGD"):
        client_ledger.release_from_extra(extra)


def test_a_hostile_ledger_object_is_refused_with_a_message() -> None:
    from gradshard.errors import PrivacyError

    store = MemoryStore()
    store.put(client_ledger.ledger_key("c"), b"{not json")
    with pytest.raises(PrivacyError, match="not valid"):
        client_ledger.load_ledger(store, "c", DELTA)
    store.put(client_ledger.ledger_key("c"), b" " * (client_ledger.MAX_LEDGER_BYTES + 1))
    with pytest.raises(PrivacyError, match="larger than"):
        client_ledger.load_ledger(store, "c", DELTA)
