"""Server optimizers (FedAvg, FedAvgM, FedAdam) applied shard by shard: the formulas, the state, the bit identity.

Everything here runs in-process on a MemoryStore: ``apply_window`` and ``server_step`` are called directly, and the
driver's own sharded server step runs on the inline executor.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from gradshard.core.layout import ModelLayout
from gradshard.core.shards import ShardPlan
from gradshard.core.zoo import synthetic
from gradshard.errors import GradshardError
from gradshard.fl.config import TrainConfig
from gradshard.fl.driver import Trainer
from gradshard.fl.server import STATE_SLOTS, ServerOptimizer, ServerStepArgs, apply_window, server_step
from gradshard.format.keys import aggregate_key, model_key, state_key
from gradshard.format.update import UpdateMeta, read_flat
from gradshard.format.writer import ObjectUpload, write_update
from gradshard.runtime import InlineExecutor
from gradshard.store import MemoryStore, Store

F32 = npt.NDArray[np.float32]
NUMEL, CHUNK = 1000, 16  # 63 chunks, the last one partial
OPTIMIZERS = {
    "fedavg": ServerOptimizer(name="fedavg", lr=0.7),
    "fedavgm": ServerOptimizer(name="fedavgm", lr=0.7, momentum=0.9),
    "fedadam": ServerOptimizer(name="fedadam", lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3),
}


# --- references -------------------------------------------------------------------------------------------------
def reference_step(opt: ServerOptimizer, theta: npt.NDArray[np.float64], delta: npt.NDArray[np.float64],
                   state: dict[str, npt.NDArray[np.float64]]) -> tuple[npt.NDArray[np.float64],
                                                                        dict[str, npt.NDArray[np.float64]]]:
    """The optimizers as written in Reddi et al., in float64, returning new arrays."""
    if opt.name == "fedavg":
        return theta + opt.lr * delta, {}
    if opt.name == "fedavgm":
        v = opt.momentum * state["v"] + delta
        return theta + opt.lr * v, {"v": v}
    m = opt.beta1 * state["m"] + (1 - opt.beta1) * delta
    v = opt.beta2 * state["v"] + (1 - opt.beta2) * delta**2
    return theta + opt.lr * m / (np.sqrt(v) + opt.tau), {"m": m, "v": v}


def reference_run(opt: ServerOptimizer, theta0: F32, deltas: list[F32]) -> list[tuple[npt.NDArray[np.float64],
                                                                                     dict[str, Any]]]:
    """(θ_r, state_r) after each of the rounds, the state starting from zeros."""
    theta = theta0.astype(np.float64)
    state = {slot: np.zeros(theta.shape) for slot in opt.slots}
    out = []
    for delta in deltas:
        theta, state = reference_step(opt, theta, delta.astype(np.float64), state)
        out.append((theta, state))
    return out


def assert_close(actual: npt.NDArray[Any], expected: npt.NDArray[np.float64], what: str) -> None:
    """float32 against the float64 reference: relative error, plus an absolute floor scaled to the array (elements
    that are the difference of nearly equal terms, e.g. a momentum that changes sign, carry their terms' error)."""
    assert actual.dtype == np.float32, what
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6 * float(np.abs(expected).max()), err_msg=what)


# --- helpers ----------------------------------------------------------------------------------------------------
def _layout() -> ModelLayout:
    return synthetic(NUMEL, tensor_elems=300)  # several tensors, boundaries not on chunks


def _meta(layout: ModelLayout, r: int, kind: str = "model") -> UpdateMeta:
    return UpdateMeta(client="server", round=r, examples=1, layout_digest=layout.digest(), chunk_elems=CHUNK,
                      kind=kind)


def _random_rounds(rounds: int, seed: int = 0) -> tuple[F32, list[F32]]:
    """An initial model and per-round deltas over several orders of magnitude (so every operation rounds)."""
    rng = np.random.default_rng(seed)
    theta0 = rng.standard_normal(NUMEL).astype(np.float32)
    deltas = [(rng.standard_normal(NUMEL) * 10.0 ** rng.uniform(-4, 0, NUMEL)).astype(np.float32)
              for _ in range(rounds)]
    return theta0, deltas


def server_round(store: Store, layout: ModelLayout, opt: ServerOptimizer, r: int, ranges: list[tuple[int, int]],
                 window_elems: int) -> None:
    """models/<r> + aggregate of round r -> models/<r+1> and server/<r+1>/<slot>, one server_step per range."""
    pending = {slot: ObjectUpload.begin(store, state_key(r + 1, slot), layout, _meta(layout, r + 1))
               for slot in opt.slots}
    pending["model"] = ObjectUpload.begin(store, model_key(r + 1), layout, _meta(layout, r + 1))
    results = []
    for start, stop in ranges:
        args = {"layout": layout.to_json(), "start": start, "stop": stop, "window_elems": window_elems,
                "optimizer": opt.model_dump(), "model_key": model_key(r), "delta_key": aggregate_key(r),
                "state_keys": {slot: state_key(r, slot) if r > 0 else "" for slot in opt.slots},
                "model_out": pending["model"].target(),
                "state_out": {slot: pending[slot].target() for slot in opt.slots}}
        results.append(server_step(ServerStepArgs.model_validate(args), store))
    for name, obj in pending.items():
        merged = {i: h for res in results for i, h in res.checksums[name].items()}
        obj.commit(merged)


def run_server(opt: ServerOptimizer, theta0: F32, deltas: list[F32], shards: int, window_elems: int,
               store: Store | None = None) -> Store:
    """All rounds' server steps on a store holding θ_0 and every round's aggregate."""
    store = store or MemoryStore()
    layout = _layout()
    write_update(store, model_key(0), layout, theta0, _meta(layout, 0))
    ranges = list(ShardPlan.contiguous(NUMEL, shards, align=CHUNK).ranges)
    for r, delta in enumerate(deltas):
        write_update(store, aggregate_key(r), layout, delta, _meta(layout, r, kind="aggregate"))
        server_round(store, layout, opt, r, ranges, window_elems)
    return store


def _objects(store: Store, opt: ServerOptimizer, rounds: int) -> dict[str, bytes]:
    keys = [model_key(r) for r in range(rounds + 1)]
    keys += [state_key(r, slot) for r in range(1, rounds + 1) for slot in opt.slots]
    return {key: store.get(key) for key in keys}


# --- apply_window -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_apply_window_updates_theta_and_state_in_place_as_the_formula(name: str) -> None:
    # Prepare
    opt = OPTIMIZERS[name]
    theta0, deltas = _random_rounds(1, seed=1)
    theta = theta0.copy()
    state = {slot: np.zeros(NUMEL, dtype=np.float32) for slot in opt.slots}
    expected_theta, expected_state = reference_step(opt, theta0.astype(np.float64), deltas[0].astype(np.float64),
                                                    {slot: np.zeros(NUMEL) for slot in opt.slots})

    # Execute
    apply_window(opt, theta, deltas[0], state)

    # Assert
    assert theta.dtype == np.float32
    np.testing.assert_allclose(theta, expected_theta, rtol=1e-6, atol=1e-7)
    assert sorted(state) == sorted(STATE_SLOTS[name])
    for slot, value in state.items():
        assert value.dtype == np.float32
        np.testing.assert_allclose(value, expected_state[slot], rtol=1e-6, atol=1e-12)


def test_first_fedadam_step_from_zero_state_has_the_closed_form() -> None:
    # Prepare: with m = v = 0, m' = (1-β1)Δ, v' = (1-β2)Δ², so θ' = θ + η(1-β1)Δ / ((1-β2)^½|Δ| + τ)
    opt = ServerOptimizer(name="fedadam", lr=0.5, beta1=0.9, beta2=0.99, tau=1e-3)
    delta = np.array([0.1, -0.1, 0.0, 2.0], dtype=np.float32)
    theta = np.ones(4, dtype=np.float32)
    state = {"m": np.zeros(4, np.float32), "v": np.zeros(4, np.float32)}

    # Execute
    apply_window(opt, theta, delta, state)

    # Assert
    d = delta.astype(np.float64)
    expected = 1 + 0.5 * 0.1 * d / (np.sqrt(0.01) * np.abs(d) + 1e-3)
    np.testing.assert_allclose(theta, expected, rtol=1e-6)
    assert theta[2] == 1.0  # a zero delta leaves the weight alone
    np.testing.assert_allclose(state["m"], 0.1 * d, rtol=1e-6)
    np.testing.assert_allclose(state["v"], 0.01 * d**2, rtol=1e-5)


# --- server_step over several rounds ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_server_step_matches_the_numpy_reference_over_several_rounds(name: str) -> None:
    # Prepare
    opt = OPTIMIZERS[name]
    rounds = 6
    theta0, deltas = _random_rounds(rounds, seed=2)
    layout = _layout()

    # Execute
    store = run_server(opt, theta0, deltas, shards=3, window_elems=40)

    # Assert: every round's model and state against the float64 reference (float32 rounding only)
    for r, (theta, state) in enumerate(reference_run(opt, theta0, deltas), start=1):
        assert_close(read_flat(store, model_key(r), layout), theta, f"model after round {r}")
        assert sorted(state) == sorted(opt.slots)
        for slot, value in state.items():
            assert_close(read_flat(store, state_key(r, slot), layout), value, f"state {slot} after round {r}")


def test_fedavg_with_server_lr_one_adds_the_aggregate_exactly() -> None:
    # Prepare
    theta0, deltas = _random_rounds(3, seed=3)

    # Execute
    store = run_server(ServerOptimizer(name="fedavg", lr=1.0), theta0, deltas, shards=4, window_elems=7)

    # Assert: θ_r = θ_{r-1} + Δ_r in float32, bit for bit
    expected = theta0.copy()
    for r, delta in enumerate(deltas, start=1):
        expected = expected + delta
        assert read_flat(store, model_key(r), _layout()).tobytes() == expected.tobytes()


def test_fedavgm_with_zero_momentum_is_fedavg() -> None:
    # Prepare
    theta0, deltas = _random_rounds(4, seed=4)

    # Execute
    momentum = run_server(ServerOptimizer(name="fedavgm", lr=0.7, momentum=0.0), theta0, deltas, 2, 64)
    plain = run_server(ServerOptimizer(name="fedavg", lr=0.7), theta0, deltas, 2, 64)

    # Assert
    for r in range(1, 5):
        assert momentum.get(model_key(r)) == plain.get(model_key(r))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_starts_from_zeros_in_round_zero(name: str) -> None:
    # Prepare: a store whose round-0 state keys would be read if the step did not start from zeros
    opt = OPTIMIZERS[name]
    theta0, deltas = _random_rounds(1, seed=5)

    # Execute
    store = run_server(opt, theta0, deltas, shards=2, window_elems=50)

    # Assert: no state of round 0 exists, and the first state equals the reference started from zeros
    assert not store.list("server/000000/")
    theta, state = reference_run(opt, theta0, deltas)[0]
    np.testing.assert_allclose(read_flat(store, model_key(1), _layout()), theta, rtol=1e-6, atol=1e-7)
    for slot in opt.slots:
        np.testing.assert_allclose(read_flat(store, state_key(1, slot), _layout()), state[slot], rtol=1e-6,
                                   atol=1e-12)
    if name == "fedavgm":  # v_1 = Δ_0 exactly
        assert read_flat(store, state_key(1, "v"), _layout()).tobytes() == deltas[0].tobytes()


# --- windows and shards --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize(("shards", "window_elems"), [(1, 5), (1, 16), (2, 1000), (3, 7), (4, 16), (7, 100),
                                                      (63, 3)])
def test_windowed_and_sharded_steps_are_bit_identical_to_one_window(name: str, shards: int,
                                                                     window_elems: int) -> None:
    # Prepare
    opt = OPTIMIZERS[name]
    theta0, deltas = _random_rounds(4, seed=6)
    whole = _objects(run_server(opt, theta0, deltas, shards=1, window_elems=NUMEL), opt, 4)

    # Execute
    split = _objects(run_server(opt, theta0, deltas, shards=shards, window_elems=window_elems), opt, 4)

    # Assert: every model and every state object, header and data, is the same bytes
    assert sorted(split) == sorted(whole)
    for key, blob in whole.items():
        assert split[key] == blob, key


def test_one_window_equals_apply_window_on_the_whole_vector() -> None:
    # Prepare: the whole-model, whole-vector computation in memory
    opt = OPTIMIZERS["fedadam"]
    theta0, deltas = _random_rounds(3, seed=7)
    theta = theta0.copy()
    state = {slot: np.zeros(NUMEL, dtype=np.float32) for slot in opt.slots}
    for delta in deltas:
        apply_window(opt, theta, delta, state)

    # Execute
    store = run_server(opt, theta0, deltas, shards=5, window_elems=11)

    # Assert
    layout = _layout()
    assert read_flat(store, model_key(3), layout).tobytes() == theta.tobytes()
    for slot in opt.slots:
        assert read_flat(store, state_key(3, slot), layout).tobytes() == state[slot].tobytes()


def test_a_range_not_on_chunk_boundaries_is_refused() -> None:
    # Prepare
    opt = OPTIMIZERS["fedavg"]
    theta0, deltas = _random_rounds(1, seed=8)
    store = MemoryStore()
    layout = _layout()
    write_update(store, model_key(0), layout, theta0, _meta(layout, 0))
    write_update(store, aggregate_key(0), layout, deltas[0], _meta(layout, 0, kind="aggregate"))

    # Execute / Assert
    with pytest.raises(GradshardError, match="chunk-aligned"):
        server_round(store, layout, opt, 0, [(0, CHUNK + 1), (CHUNK + 1, NUMEL)], 64)
    assert not store.exists(model_key(1))


# --- the driver's server step, shard by shard on the inline executor -----------------------------------------------
@pytest.fixture(scope="module")
def trainer_rounds() -> tuple[F32, list[F32]]:
    rng = np.random.default_rng(9)
    numel = Trainer(MemoryStore(), TrainConfig(), InlineExecutor()).averaged.numel
    theta0 = rng.standard_normal(numel).astype(np.float32) * 0.1
    return theta0, [(rng.standard_normal(numel) * 0.01).astype(np.float32) for _ in range(3)]


def _driver_server_steps(opt: ServerOptimizer, shards: int, theta0: F32, deltas: list[F32]) -> tuple[Trainer, Store]:
    store = MemoryStore()
    trainer = Trainer(store, TrainConfig(server=opt), InlineExecutor())
    meta = trainer._model_meta
    write_update(store, model_key(0), trainer.averaged, theta0, meta(0))
    for r, delta in enumerate(deltas):
        write_update(store, aggregate_key(r), trainer.averaged, delta, meta(r))
        trainer._server_step(r, shards)
    return trainer, store


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_driver_server_step_is_the_same_bytes_for_every_m_and_matches_the_reference(
        name: str, trainer_rounds: tuple[F32, list[F32]]) -> None:
    # Prepare
    opt = OPTIMIZERS[name]
    theta0, deltas = trainer_rounds

    # Execute: the MLP's 9,610 parameters in chunks of 128 elements, cut into M = 1, 3, 4 and 76 (one per chunk)
    runs = {m: _driver_server_steps(opt, m, theta0, deltas) for m in (1, 3, 4, 76)}

    # Assert
    trainer, one = runs[1]
    keys = [model_key(r) for r in range(1, 4)] + [state_key(r, s) for r in range(1, 4) for s in opt.slots]
    for m, (_, store) in runs.items():
        for key in keys:
            assert store.get(key) == one.get(key), f"M={m}: {key}"
        assert sorted(store.list("server/")) == sorted(k for k in keys if k.startswith("server/"))
    for r, (theta, state) in enumerate(reference_run(opt, theta0, deltas), start=1):
        assert_close(read_flat(one, model_key(r), trainer.averaged), theta, f"model after round {r}")
        for slot in opt.slots:
            assert_close(read_flat(one, state_key(r, slot), trainer.averaged), state[slot], f"{slot} after round {r}")
