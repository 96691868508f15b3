"""Federated training end to end (issue 5's "must show"): PyTorch clients as functions, rounds that survive crashes.

- digits reaches >= 0.93 test accuracy within 20 rounds with 20 non-IID clients (Dirichlet α = 0.5);
- the global model (and the server optimizer's state) after every round is bit-identical for GradsSharding with any
  M and for flat aggregation;
- a driver killed mid-round (SIGKILL, in a separate process) and started again ends with the same final model as an
  uninterrupted run, with no update lost or counted twice;
- a client that crashes, sends a bad update or misses the deadline does not stop the round;
- FedProx changes the result; partial participation samples deterministic, round-dependent cohorts.

Clients run as functions forked from the torch zygote (LocalExecutor) on a LocalStore. The executors are shared by
the tests of this module (one zygote start each).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load as load_safetensors

from gradshard.aggregation.driver import AggregateConfig
from gradshard.core.reduce import fedavg, fedavg_weights
from gradshard.errors import InvocationError
from gradshard.fl.client import ClientTask
from gradshard.fl.config import DataConfig, TrainConfig
from gradshard.fl.driver import Trainer, client_ids, sample_cohort
from gradshard.fl.server import ServerOptimizer
from gradshard.format.keys import (
    aggregate_key,
    client_data_key,
    manifest_key,
    metrics_key,
    model_key,
    round_prefix,
    spec_key,
    state_key,
    update_key,
)
from gradshard.format.round import load_manifest
from gradshard.format.update import open_update, read_flat
from gradshard.runtime import LocalExecutor
from gradshard.runtime.executor import Executor
from gradshard.runtime.report import InvocationReport
from gradshard.store import LocalStore, Store
from gradshard.topology.base import Invocation, Plan

Executors = tuple[LocalExecutor, LocalExecutor]

# Tuned and measured (seed 0): 0.838 0.894 0.916 0.930 ... 0.953 after round 20; >= 0.93 from round 4 on.
ACCEPTANCE = TrainConfig(model="mlp", data=DataConfig(name="digits", partition="dirichlet", alpha=0.5), clients=20,
                         rounds=20, epochs=5, batch_size=16, lr=0.1, momentum=0.9,
                         aggregation=AggregateConfig(topology="sharded", shards=4), seed=0)
# Short runs: 6 clients, 3 rounds, one epoch.
SHORT: dict[str, Any] = {"clients": 6, "rounds": 3, "epochs": 1, "batch_size": 16, "lr": 0.1, "momentum": 0.9}


@pytest.fixture(scope="module")
def executors(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Executors]:
    """(aggregation executor, client executor), the client one warm: its torch zygote is already running."""
    with LocalExecutor(workers=2) as aggregation, LocalExecutor(workers=2, timeout_s=120.0) as clients:
        # An invocation of train_client with empty (unvalidated) arguments starts the zygote and fails validation
        # in the worker at once.
        plan = Plan("warm-up", (Invocation("warm-up", "train_client", ClientTask.model_construct(), 0),))
        [report] = clients.run(plan, LocalStore(tmp_path_factory.mktemp("warm-up"), fsync=False))
        assert report.error_type == "ValidationError"
        yield aggregation, clients


def train(path: Path, config: TrainConfig, executors: Executors) -> tuple[LocalStore, list[dict[str, Any]]]:
    store = LocalStore(path, fsync=False)
    aggregation, clients = executors
    return store, Trainer(store, config, aggregation, clients).run()


def short(**changes: Any) -> TrainConfig:
    return TrainConfig(**{**SHORT, **changes})


def model_objects(store: LocalStore, config: TrainConfig) -> dict[str, bytes]:
    """Raw bytes of the global model after every round and of the server optimizer's state."""
    keys = [model_key(r) for r in range(config.rounds + 1)]
    keys += [state_key(r, slot) for r in range(1, config.rounds + 1) for slot in config.server.slots]
    return {key: store.get(key) for key in keys}


def test_sample_cohort_is_deterministic_sized_and_round_dependent() -> None:
    # Prepare
    by_count = TrainConfig(clients=10, per_round=3, seed=5)
    by_fraction = TrainConfig(clients=10, fraction=0.4, seed=5)

    # Execute
    cohorts = [sample_cohort(by_count, r) for r in range(6)]
    again = [sample_cohort(by_count.model_copy(), r) for r in range(6)]
    fractions = [sample_cohort(by_fraction, r) for r in range(6)]

    # Assert
    assert cohorts == again
    assert all(len(c) == 3 and len(set(c)) == 3 and c == sorted(c) for c in cohorts)
    assert all(set(c) <= set(client_ids(10)) for c in cohorts)
    assert len({tuple(c) for c in cohorts}) > 1
    assert all(len(c) == 4 for c in fractions)
    assert sample_cohort(TrainConfig(clients=7), 3) == client_ids(7)


# --- accuracy -------------------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_digits_reaches_93_percent_within_20_rounds_with_20_non_iid_clients(tmp_path: Path,
                                                                             executors: Executors) -> None:
    # Prepare
    config = ACCEPTANCE

    # Execute
    store, metrics = train(tmp_path, config, executors)

    # Assert: the clients are really non-IID (Dirichlet α = 0.5 label skew) ...
    labels = [load_safetensors(store.get(client_data_key(c)))["y"] for c in client_ids(config.clients)]
    shares = [np.bincount(y, minlength=10) / len(y) for y in labels]
    global_share = np.bincount(np.concatenate(labels), minlength=10) / sum(len(y) for y in labels)
    skew = [0.5 * np.abs(s - global_share).sum() for s in shares]  # total variation distance to the global mix
    assert np.median(skew) > 0.3, skew  # measured 0.43 (an IID split of the same data: 0.13)
    # ... every round aggregated all 20 of them ...
    accuracy = [m["test_accuracy"] for m in metrics]
    print("accuracy per round:", " ".join(f"{a:.4f}" for a in accuracy))
    print("seconds per round:", " ".join(f"{m['wall_seconds']:.2f}" for m in metrics))
    assert [m["round"] for m in metrics] == list(range(20))
    assert all(m["aggregated"] == client_ids(20) and not m["failed"] and not m["rejected"] for m in metrics)
    # ... and the final model (the strongest reading: not just the best round) has >= 93 % test accuracy.
    assert accuracy[-1] >= 0.93, accuracy
    assert max(accuracy) >= 0.93


# --- bit identity across topologies ---------------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize("server", [ServerOptimizer(name="fedavg"),
                                    ServerOptimizer(name="fedavgm", lr=1.0, momentum=0.9),
                                    ServerOptimizer(name="fedadam", lr=0.01)], ids=lambda s: s.name)
def test_global_model_after_every_round_is_bit_identical_for_sharded_and_flat(
        tmp_path: Path, executors: Executors, server: ServerOptimizer) -> None:
    # Prepare
    aggregations = {"flat": AggregateConfig(topology="flat")}
    aggregations |= {f"sharded-M{m}": AggregateConfig(topology="sharded", shards=m, window_bytes=4096)
                     for m in (1, 3, 4)}
    configs = {name: short(server=server, aggregation=agg) for name, agg in aggregations.items()}

    # Execute
    stores = {name: train(tmp_path / name, config, executors)[0] for name, config in configs.items()}

    # Assert: models/<r> for every r and server/<r>/<slot> are the same bytes; the model does move
    reference = model_objects(stores["flat"], configs["flat"])
    layout = Trainer(stores["flat"], configs["flat"], *executors).averaged
    assert len(reference) == 4 + 3 * len(server.slots)
    assert reference[model_key(0)] != reference[model_key(1)] != reference[model_key(3)]
    for name, store in stores.items():
        objects = model_objects(store, configs[name])
        for key, blob in reference.items():
            assert objects[key] == blob, f"{name}: {key} differs from flat"
        for r in range(3):
            a, b = (read_flat(s, aggregate_key(r), layout) for s in (store, stores["flat"]))
            assert a.tobytes() == b.tobytes(), f"{name}: aggregate of round {r}"


# --- a driver killed mid-round --------------------------------------------------------------------------------------
DRIVER = """
import sys
from gradshard.fl.driver import Trainer
from gradshard.fl.config import TrainConfig
from gradshard.runtime import LocalExecutor
from gradshard.store import LocalStore

config = TrainConfig.model_validate_json(sys.argv[2])
with LocalExecutor(workers=2) as aggregation, LocalExecutor(workers=2, timeout_s=config.deadline_s) as clients:
    Trainer(LocalStore(sys.argv[1], fsync=False), config, aggregation, clients).run()
"""
# Partial participation (4 of 8), FedAdam state, GradsSharding with M = 3: everything a restart must get right.
KILL_CONFIG = TrainConfig(clients=8, fraction=0.5, rounds=4, epochs=2, batch_size=16, lr=0.1, momentum=0.9,
                          server=ServerOptimizer(name="fedadam", lr=0.01),
                          aggregation=AggregateConfig(topology="sharded", shards=3), seed=3)


def start_driver(path: Path, config: TrainConfig, *, stderr: int = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    """The driver in its own process (and process group, which its zygote and workers join)."""
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(path), config.model_dump_json()],
                            start_new_session=True, stderr=stderr)


def wait_until(proc: subprocess.Popen[bytes], condition: Callable[[], bool], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the driver ended (rc {proc.returncode}) before the kill point")
        if time.monotonic() > deadline:
            raise AssertionError("the kill point was not reached in time")
        time.sleep(0.002)


def kill(proc: subprocess.Popen[bytes], *, group: bool) -> None:
    """SIGKILL the driver alone (its functions run on, as serverless ones would) or its whole process group."""
    if group:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.kill()
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def drain(pgid: int, timeout: float = 30.0) -> None:
    """Wait for the killed driver's orphaned workers (same process group) to finish; kill what is left."""
    deadline = time.monotonic() + timeout
    with contextlib.suppress(ProcessLookupError):
        while time.monotonic() < deadline:
            os.killpg(pgid, 0)
            time.sleep(0.05)
        os.killpg(pgid, signal.SIGKILL)


def finish(path: Path, config: TrainConfig) -> None:
    """Start the driver again (a new process) and let it run to the end."""
    proc = start_driver(path, config, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-3000:]


def phase(store: LocalStore, k: int) -> str:
    """Where round k stood when the driver died."""
    if store.exists(metrics_key(k)):
        return "done"
    if store.exists(model_key(k + 1)):
        return "evaluate"
    if store.exists(aggregate_key(k)):
        return "server step"
    updates = len(store.list(f"{round_prefix(k)}/updates/"))
    return f"clients ({updates} update(s))" if store.exists(spec_key(k)) else "before the round"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, executors: Executors) -> LocalStore:
    """The reference: KILL_CONFIG run without interruption (in this process)."""
    return train(tmp_path_factory.mktemp("uninterrupted"), KILL_CONFIG, executors)[0]


def assert_same_run(store: LocalStore, reference: LocalStore, config: TrainConfig) -> list[dict[str, Any]]:
    """Same models and state after every round; every round's updates counted once each; metrics for every round."""
    assert model_objects(store, config) == model_objects(reference, config)
    metrics = [json.loads(store.get(metrics_key(r))) for r in range(config.rounds)]
    for r, m in enumerate(metrics):
        expected = json.loads(reference.get(metrics_key(r)))
        cohort = sample_cohort(config, r)
        assert m["cohort"] == expected["cohort"] == cohort
        clients = [c.client for c in load_manifest(store, manifest_key(r)).clients]
        assert clients == sorted(set(clients)) == cohort, f"round {r} manifest lists {clients}"
        updates = store.list(f"{round_prefix(r)}/updates/")
        assert updates == [update_key(r, c) for c in cohort]
        assert m["aggregated"] == cohort and not m["failed"] and not m["rejected"]
        assert m["test_accuracy"] == expected["test_accuracy"]
        assert m["client_loss"] == expected["client_loss"] is not None
    return metrics


@pytest.mark.integration
def test_driver_killed_during_training_and_after_aggregation_ends_with_the_same_model(
        tmp_path: Path, uninterrupted: LocalStore) -> None:
    # Prepare
    config, store = KILL_CONFIG, LocalStore(tmp_path, fsync=False)
    phases = []

    # Execute: kill 1 — the whole process group (driver, zygote, workers) as soon as round 1 has an update
    proc = start_driver(tmp_path, config)
    wait_until(proc, lambda: bool(store.list(f"{round_prefix(1)}/updates/")))
    kill(proc, group=True)
    phases.append(phase(store, 1))
    # kill 2 — the driver alone (its functions outlive it) once round 2's aggregate is published
    proc = start_driver(tmp_path, config)
    wait_until(proc, lambda: store.exists(aggregate_key(2)))
    kill(proc, group=False)
    phases.append(phase(store, 2))
    drain(proc.pid)
    finish(tmp_path, config)

    # Assert
    print("killed in:", phases)
    assert phases[0].startswith("clients") and phases[0] != f"clients ({config.sample_size()} update(s))"
    assert phases[1] == "server step"
    metrics = assert_same_run(store, uninterrupted, config)
    assert [m["resumed"] for m in metrics] == [False, True, True, False]


def kill_point(store: LocalStore, rng: random.Random,
               config: TrainConfig) -> tuple[int, str, Callable[[], bool], float]:
    """A random moment inside a random round k: a step of the round to wait for, then a random extra delay."""
    k = rng.randrange(config.rounds)
    updates = rng.randrange(1, config.sample_size())
    points: list[tuple[str, Callable[[], bool], float]] = [
        (f"round {k} opened", lambda: store.exists(spec_key(k)), 0.05),
        (f"round {k} has {updates} update(s)",
         lambda: len(store.list(f"{round_prefix(k)}/updates/")) >= updates, 0.02),
        (f"round {k} aggregated", lambda: store.exists(aggregate_key(k)), 0.03),
        (f"model {k + 1} published", lambda: store.exists(model_key(k + 1)), 0.01),
    ]
    name, condition, spread = rng.choice(points)
    return k, name, condition, rng.uniform(0.0, spread)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("seed", range(8))
def test_driver_killed_at_a_random_point_ends_with_the_same_model(tmp_path: Path, uninterrupted: LocalStore,
                                                                  seed: int) -> None:
    # Prepare
    rng = random.Random(seed)
    config, store = KILL_CONFIG, LocalStore(tmp_path, fsync=False)
    k, name, condition, delay = kill_point(store, rng, config)
    group = rng.random() < 0.5

    # Execute
    proc = start_driver(tmp_path, config)
    wait_until(proc, condition)
    time.sleep(delay)
    kill(proc, group=group)
    where = phase(store, k)
    drain(proc.pid)
    finish(tmp_path, config)

    # Assert
    print(f"killed {delay * 1000:.0f} ms after {name} ({'group' if group else 'driver only'}): round {k} at {where}")
    assert_same_run(store, uninterrupted, config)


@contextlib.contextmanager
def deadline(clients: LocalExecutor, seconds: float) -> Iterator[None]:
    """The warm client executor with a per-invocation timeout of ``seconds`` and no retries (a late client is not
    tried again after the deadline).

    A fresh executor would do, except that LocalExecutor counts its zygote's cold start (importing torch, ~2-3 s
    here) against the timeout of the first invocations, so with a 1 s deadline the first clients would be late.
    """
    saved = clients.timeout_s, clients.retries
    clients.timeout_s, clients.retries = seconds, 0
    try:
        yield
    finally:
        clients.timeout_s, clients.retries = saved


# --- faults ----------------------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_crashed_bad_and_late_clients_do_not_stop_the_round(tmp_path: Path, executors: Executors) -> None:
    # Prepare: client 3 crashes, 4 sends NaN, 5 sleeps past the 1 s deadline (every round); 1 sends NaN in round 1
    config = short(rounds=2, deadline_s=1.0, faults={"client-0003": "crash", "client-0004": "nan",
                                                      "client-0005": "sleep:30", "1/client-0001": "nan"})
    store = LocalStore(tmp_path, fsync=False)
    with deadline(executors[1], config.deadline_s):
        trainer = Trainer(store, config, *executors)

        # Execute
        started = time.perf_counter()
        metrics = trainer.run()
        elapsed = time.perf_counter() - started

    # Assert: failed = no update arrived (crash, deadline); rejected = an update arrived and was refused (NaN)
    first, second = metrics
    assert sorted(first["failed"]) == ["client-0003", "client-0005"]
    assert first["failed"]["client-0003"].startswith("WorkerCrash")
    assert first["failed"]["client-0005"].startswith("InvocationTimeoutError")
    assert list(first["rejected"]) == ["client-0004"] and "non-finite" in first["rejected"]["client-0004"]
    assert first["aggregated"] == ["client-0000", "client-0001", "client-0002"]
    assert sorted(second["rejected"]) == ["client-0001", "client-0004"]
    assert second["aggregated"] == ["client-0000", "client-0002"]
    assert not store.exists(update_key(0, "client-0003")) and not store.exists(update_key(0, "client-0005"))
    assert elapsed < 20  # the late client was cut at the deadline, not waited for (30 s)
    # the aggregate is FedAvg of exactly the accepted updates
    layout = trainer.averaged
    accepted = first["aggregated"]
    examples = []
    for c in accepted:
        with open_update(store, update_key(0, c), c, layout) as upd:
            examples.append(upd.meta.examples)
    expected = fedavg([read_flat(store, update_key(0, c), layout) for c in accepted], fedavg_weights(examples),
                      config.aggregation.accumulate)
    assert read_flat(store, aggregate_key(0), layout).tobytes() == expected.astype(np.float32).tobytes()
    # and training proceeds
    assert len({store.get(model_key(r)) for r in range(3)}) == 3
    assert second["test_accuracy"] > trainer.evaluate(0)[1]


@pytest.mark.integration
@pytest.mark.parametrize("k", [0, 1])
def test_a_round_without_enough_updates_keeps_the_model_and_training_continues(tmp_path: Path, executors: Executors,
                                                                               k: int) -> None:
    # Prepare: round k gets one valid update but needs two; FedAvgM, so there is server state to carry over
    config = short(clients=3, rounds=3, min_clients=2, faults={f"{k}/client-0000": "crash", f"{k}/client-0001": "nan"},
                   server=ServerOptimizer(name="fedavgm", lr=1.0, momentum=0.9))

    # Execute
    store, metrics = train(tmp_path, config, executors)

    # Assert: round k changed nothing (the state after round 0 is the zeros it starts from); later rounds train
    assert metrics[k]["aggregated"] == [] and "(round)" in metrics[k]["rejected"]
    assert "client-0000" in metrics[k]["failed"]
    layout = Trainer(store, config, *executors).averaged
    assert read_flat(store, model_key(k + 1), layout).tobytes() == read_flat(store, model_key(k), layout).tobytes()
    state = read_flat(store, state_key(k + 1, "v"), layout)
    before = read_flat(store, state_key(k, "v"), layout) if k else np.zeros_like(state)
    assert state.tobytes() == before.tobytes()
    assert all(m["aggregated"] == client_ids(3) for r, m in enumerate(metrics) if r != k)
    assert len({store.get(model_key(r)) for r in range(4)}) == 4  # (headers differ by round; data by training)
    assert len({read_flat(store, model_key(r), layout).tobytes() for r in range(4)}) == 3


class Faulty(Executor):
    """Runs invocations on ``inner`` but fails every one of ``function`` (an infrastructure fault); counts calls."""

    def __init__(self, inner: LocalExecutor, function: str = "") -> None:
        super().__init__(workers=inner.workers, retries=0)
        self.inner, self.function = inner, function
        self.calls: list[str] = []

    def attempt(self, invocation: Invocation, store: Store) -> InvocationReport:
        self.calls.append(invocation.function)
        if invocation.function == self.function:
            return InvocationReport(invocation=invocation.id, function=invocation.function, ok=False,
                                    error_type="WorkerCrash", error="injected fault")
        return self.inner.attempt(invocation, store)


@pytest.mark.integration
def test_a_failed_server_step_stops_the_driver_and_a_restart_loses_nothing(tmp_path: Path,
                                                                             executors: Executors) -> None:
    # Prepare: client 5 always crashes; the server step of the first run fails (after round 0 is aggregated)
    config = short(rounds=2, faults={"client-0005": "crash"}, server=ServerOptimizer(name="fedadam", lr=0.01))
    reference, expected = train(tmp_path / "reference", config, executors)
    store = LocalStore(tmp_path / "run", fsync=False)
    aggregation, clients = executors

    # Execute
    with pytest.raises(InvocationError, match="server step of round 0"):
        Trainer(store, config, Faulty(aggregation, "server_step"), clients).run()
    stopped_at = (store.exists(aggregate_key(0)), store.exists(model_key(1)), store.exists(metrics_key(0)))
    counting = Faulty(clients)
    metrics = Trainer(store, config, aggregation, counting).run()

    # Assert: the round was not dropped (nor its model kept), and its clients were not trained again
    assert stopped_at == (True, False, False)
    assert model_objects(store, config) == model_objects(reference, config)
    assert counting.calls == ["train_client"] * 6  # round 1 only
    assert metrics[0]["resumed"] and not metrics[1]["resumed"]
    for got, want in zip(metrics, expected, strict=True):
        assert got["aggregated"] == want["aggregated"] == client_ids(5)
        assert sorted(got["failed"]) == sorted(want["failed"]) == ["client-0005"]
        assert got["client_loss"] == want["client_loss"] is not None
        assert got["test_accuracy"] == want["test_accuracy"]


# --- FedProx and partial participation ------------------------------------------------------------------------------
@pytest.mark.integration
def test_fedprox_runs_and_pulls_client_updates_towards_the_global_model(tmp_path: Path,
                                                                        executors: Executors) -> None:
    # Prepare
    configs = {mu: short(clients=4, rounds=2, epochs=3, mu=mu) for mu in (0.0, 1.0)}

    # Execute
    runs = {mu: train(tmp_path / f"mu{mu}", config, executors) for mu, config in configs.items()}

    # Assert: a different model; every client's round-0 update is shorter with the proximal term
    (plain, plain_metrics), (prox, prox_metrics) = runs[0.0], runs[1.0]
    assert plain.get(model_key(0)) == prox.get(model_key(0))
    assert plain.get(model_key(2)) != prox.get(model_key(2))
    layout = Trainer(plain, configs[0.0], *executors).averaged
    for c in client_ids(4):
        norm = {mu: float(np.linalg.norm(read_flat(store, update_key(0, c), layout))) for mu, (store, _) in
                runs.items()}
        assert 0 < norm[1.0] < norm[0.0], (c, norm)
    assert all(m["aggregated"] == client_ids(4) for m in prox_metrics)
    assert prox_metrics[-1]["test_accuracy"] > 0.3 and plain_metrics[-1]["test_accuracy"] > 0.3


@pytest.mark.integration
def test_partial_participation_samples_the_same_cohorts_after_a_restart(tmp_path: Path,
                                                                        executors: Executors) -> None:
    # Prepare
    config = short(clients=10, per_round=3, rounds=3)
    aggregation, clients = executors

    # Execute: one uninterrupted run; one that stops after round 0 and continues with a new driver
    reference, metrics = train(tmp_path / "once", config, executors)
    restarted = LocalStore(tmp_path / "twice", fsync=False)
    first = Trainer(restarted, config, aggregation, clients)
    first.prepare()
    first.run_round(0)
    resumed = Trainer(restarted, config, aggregation, clients).run()

    # Assert
    cohorts = [m["cohort"] for m in metrics]
    assert cohorts == [sample_cohort(config, r) for r in range(3)] == [m["cohort"] for m in resumed]
    assert all(len(c) == 3 for c in cohorts) and len({tuple(c) for c in cohorts}) > 1
    for r, cohort in enumerate(cohorts):
        assert reference.list(f"{round_prefix(r)}/updates/") == [update_key(r, c) for c in cohort]
        assert metrics[r]["aggregated"] == cohort
    assert model_objects(restarted, config) == model_objects(reference, config)
