"""Block-wise training through the trainer (gradshard.blockwise): only the active stage travels, is aggregated and
changes; memory budgets assign stages, sit clients out and cap their functions.

References are built independently: dense numpy deltas with zeros outside the block, the weighted mean computed in
float64, bytes read from the objects' own header lengths and the block's element count.
"""

from __future__ import annotations

import itertools
import json
import struct
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gradshard import AggregateConfig, aggregate_round
from gradshard.blockwise.blocks import split_sequential
from gradshard.blockwise.config import BlockwiseConfig
from gradshard.blockwise.model import BlockwiseModel, final_state
from gradshard.cli.main import main
from gradshard.core.checksum import ChunkGrid
from gradshard.core.coverage import CoverageMap, covered_chunks
from gradshard.core.layout import ModelLayout, TensorSpec
from gradshard.errors import GradshardError
from gradshard.fl.config import TrainConfig
from gradshard.fl.data import Dataset, make_synthetic
from gradshard.fl.driver import Trainer
from gradshard.fl.plugin import PluginRound
from gradshard.fl.task import Task, TaskError
from gradshard.format.compact import write_compact_update
from gradshard.format.keys import aggregate_key, manifest_key, model_key, plugin_key, update_key
from gradshard.format.round import RoundSpec, open_round
from gradshard.format.update import UpdateMeta, read_flat
from gradshard.runtime import InlineExecutor, LocalExecutor
from gradshard.store import LocalStore, MemoryStore
from gradshard.topology.sharded import split_ranges

CHUNK = 16


# --- one round with an active block: the coverage contract ---------------------------------------------------------
def block_round(store: MemoryStore, rng: np.random.Generator) -> tuple[ModelLayout, dict[str, np.ndarray],
                                                                        dict[str, int], tuple[int, int]]:
    """A layout whose tensors ``blk.*`` are the active block [lo, hi); three clients upload only the block."""
    layout = ModelLayout([TensorSpec("stem.weight", (7, 9), "float32"), TensorSpec("blk.conv", (5, 3, 3, 2), "float32"),
                          TensorSpec("blk.bias", (5,), "float32"), TensorSpec("tail.weight", (11, 6), "float32"),
                          TensorSpec("heads.0.weight", (10, 3), "float32")])
    lo, hi = 63, 63 + 90 + 5
    examples = {"client-a": 3, "client-b": 10, "client-c": 6}
    deltas = {}
    open_round(store, RoundSpec.create(0, layout, chunk_elems=CHUNK))
    for client, n in examples.items():
        dense = np.zeros(layout.numel, dtype=np.float32)
        dense[lo:hi] = rng.normal(size=hi - lo).astype(np.float32)
        deltas[client] = dense
        meta = UpdateMeta(client=client, round=0, examples=n, layout_digest=layout.digest(), chunk_elems=CHUNK)
        write_compact_update(store, update_key(0, client), layout, {"blk.conv": (5, 3, 3, 2), "blk.bias": (5,)},
                             dense[lo:hi], meta)
    return layout, deltas, examples, (lo, hi)


def test_an_active_block_round_reads_only_the_block_and_equals_fedavg_with_zero_deltas_outside() -> None:
    results: dict[int, bytes] = {}
    for m in (1, 2, 4, 8):
        # Prepare
        store = MemoryStore()
        layout, deltas, examples, (lo, hi) = block_round(store, np.random.default_rng(7))

        # Execute
        result = aggregate_round(store, 0, InlineExecutor(), AggregateConfig(reducer="coverage-mean", shards=m))

        # Assert: the aggregate is FedAvg of the dense deltas (zeros outside the block), bitwise 0 outside
        flat = read_flat(store, aggregate_key(0), layout, "aggregate")
        weights = np.array([examples[c] for c in sorted(examples)], dtype=np.float64)
        expected = sum(w * deltas[c].astype(np.float64) for w, c in zip(weights, sorted(examples), strict=True))
        np.testing.assert_allclose(flat, expected / weights.sum(), rtol=1e-6, atol=1e-7)
        assert flat[:lo].tobytes() == bytes(4 * lo) and flat[hi:].tobytes() == bytes(4 * (layout.numel - hi))
        results[m] = store.get(aggregate_key(0))
        # the shards cover exactly the block's chunks
        covered = (lo // CHUNK * CHUNK, min(-(-hi // CHUNK) * CHUNK, layout.numel))
        ranges = sorted((inv.args.start, inv.args.stop) for inv in result.plan.invocations)  # type: ignore[attr-defined]
        assert ranges[0][0] == covered[0] and ranges[-1][1] == covered[1]
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
        assert result.plan.params["covered"] == [list(covered)]
        # bytes read: every client's block once; every shard function reads the manifest and each client's header
        headers = sum(8 + struct.unpack("<Q", store.get_range(update_key(0, c), 0, 8))[0] for c in examples)
        read = sum(rep.bytes_read for rep in result.reports)
        assert read == len(examples) * (hi - lo) * 4 + len(ranges) * (headers + store.size(manifest_key(0)))
    assert len(set(results.values())) == 1  # the same bytes for every M


# --- the block-wise model -------------------------------------------------------------------------------------------
def body() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def test_output_modules_are_extra_slots_dropped_from_the_final_model_and_start_from_the_classifier() -> None:
    # Prepare
    net = body()
    split = split_sequential(net, [0, 2, 7])

    # Execute
    model = BlockwiseModel(net, split, torch.zeros(2, 1, 6, 6))

    # Assert
    state = model.state_dict()
    assert [k for k in state if k.startswith("heads.")] == ["heads.0.2.weight", "heads.0.2.bias"]
    assert list(state)[: len(net.state_dict())] == list(net.state_dict())
    fresh = body()
    fresh.load_state_dict(final_state(state))  # strict: the user's model, nothing more
    torch.testing.assert_close(state["heads.0.2.weight"], net[6].weight)
    x = torch.randn(5, 1, 6, 6)
    torch.testing.assert_close(model(x), net(x))
    assert model.stage_tensors(0, co_adapt=1) == ["0.weight", "0.bias", "heads.0.2.weight", "heads.0.2.bias"]
    assert model.stage_tensors(1, co_adapt=1) == ["0.weight", "0.bias", "2.weight", "2.bias", "6.weight", "6.bias"]
    assert model.stage_tensors(1, co_adapt=0) == ["2.weight", "2.bias", "6.weight", "6.bias"]


def test_a_model_that_is_not_sequential_is_refused_with_the_fix() -> None:
    # Prepare
    config = TrainConfig.model_validate({"model": "mlp", "clients": 2, "rounds": 1, "blockwise": {"blocks": 2}})

    # Execute / Assert
    with pytest.raises(TaskError, match=r"nn\.Sequential.*convnet"):
        Trainer(MemoryStore(), config, InlineExecutor())


def test_bad_blockwise_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="one per stage"):
        BlockwiseConfig(blocks=4, lambda_x=(0.1, 0.2))
    with pytest.raises(ValueError, match="add up to 1"):
        BlockwiseConfig(tiers=({"fraction": 0.5, "memory_mib": 100},))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one round per stage"):
        TrainConfig.model_validate({"model": "convnet", "rounds": 2, "blockwise": {"blocks": 4, "schedule": "pace"}})
    with pytest.raises(ValueError, match="fedavg"):
        TrainConfig.model_validate({"model": "convnet", "server": {"name": "fedadam"}, "blockwise": {}})
    with pytest.raises(ValueError, match="one"):
        TrainConfig.model_validate({"model": "convnet", "blockwise": {}, "supernet": {}})
    with pytest.raises(ValueError, match="'sharded' or 'flat'"):
        TrainConfig.model_validate({"model": "convnet", "blockwise": {}, "aggregation": {"topology": "lambda-fl"}})
    with pytest.raises(ValueError, match="does not have"):
        TrainConfig.model_validate({"model": "convnet", "clients": 2, "blockwise": {"budgets_mib": {"client-0007": 9}}})


# --- training rounds -----------------------------------------------------------------------------------------------
def tiny(**changes: object) -> TrainConfig:
    base: dict[str, object] = {
        "model": "convnet", "clients": 6, "per_round": 6, "rounds": 4, "epochs": 1, "batch_size": 32, "lr": 0.05,
        "seed": 2, "data": {"partition": "iid"},
        "blockwise": {"blocks": 4, "stage_memory_mib": [100, 200, 300, 400],
                      "tiers": [{"fraction": 0.5, "memory_mib": 250}, {"fraction": 0.5, "memory_mib": 4000}],
                      "budgets_mib": {"client-0000": 50}}}
    return TrainConfig.model_validate({**base, **changes})


def stage_bytes(trainer: Trainer, r: int, names: set[str]) -> tuple[bytes, bytes]:
    """The bytes of models/<r> inside ``names`` and outside them."""
    flat = read_flat(trainer.store, model_key(r), trainer.averaged, "model")
    inside = np.zeros(trainer.averaged.numel, dtype=bool)
    for slot in trainer.averaged.slots:
        if slot.spec.name in names:
            inside[slot.start : slot.stop] = True
    return flat[inside].tobytes(), flat[~inside].tobytes()


def test_tiers_train_different_stages_in_one_round_and_everything_else_stays_bit_for_bit(tmp_path: Path) -> None:
    # Prepare
    store = LocalStore(tmp_path, fsync=False)
    trainer = Trainer(store, tiny(), InlineExecutor())

    # Execute
    history = trainer.run()

    # Assert: round r trains stage r for the big tier; the small tier (250 MiB) affords stages 0 and 1 only;
    # client-0000 (50 MiB) affords none, sits out and is never invoked
    model = trainer.task.build()
    assert isinstance(model, BlockwiseModel)
    for r in range(4):
        record = PluginRound.model_validate_json(store.get(plugin_key(r)))
        small = {c: o["stage"] for c, o in record.client_options.items() if c in ("client-0001", "client-0002")}
        big = {c: o["stage"] for c, o in record.client_options.items() if c >= "client-0003"}
        assert set(big.values()) == {r} and set(small.values()) == {min(r, 1)}
        assert "client-0000" in record.idle and "below every stage" in record.idle["client-0000"]
        assert not store.exists(update_key(r, "client-0000"))
        assert record.memory["client-0001"] == 250 << 20 and record.memory["client-0003"] == 4000 << 20
        trained = set(model.stage_tensors(r, 1)) | set(model.stage_tensors(min(r, 1), 1))
        before, after = stage_bytes(trainer, r, trained), stage_bytes(trainer, r + 1, trained)
        assert after[1] == before[1]  # every element outside the trained stages: the same bytes
        assert after[0] != before[0]
        assert history[r]["plugin"]["stage"] == r and len(history[r]["plugin"]["stage_accuracy"]) == 4
        assert history[r]["aggregated"] == sorted(record.client_options)


def test_one_shard_and_four_shards_train_the_same_models(tmp_path: Path) -> None:
    # Execute
    runs = []
    for m in (1, 4):
        store = LocalStore(tmp_path / str(m), fsync=False)
        Trainer(store, tiny(rounds=2, aggregation={"shards": m}), InlineExecutor()).run()
        runs.append([store.get(model_key(r)) for r in range(3)])

    # Assert
    assert runs[0] == runs[1]


def test_a_killed_run_resumes_to_the_same_models(tmp_path: Path) -> None:
    # Prepare
    whole = LocalStore(tmp_path / "whole", fsync=False)
    Trainer(whole, tiny(rounds=3), InlineExecutor()).run()
    part = LocalStore(tmp_path / "part", fsync=False)
    Trainer(part, tiny(rounds=1), InlineExecutor()).run()

    # Execute
    Trainer(part, tiny(rounds=3), InlineExecutor()).run()

    # Assert
    assert [part.get(model_key(r)) for r in range(4)] == [whole.get(model_key(r)) for r in range(4)]


@pytest.mark.integration
def test_gradshard_train_runs_the_example_blockwise_config(tmp_path: Path) -> None:
    # Prepare
    store = tmp_path / "store"
    config = TrainConfig.model_validate(tomllib.loads(Path("examples/blockwise.toml").read_text()))
    assert config.blockwise is not None and config.blockwise.stages == 4

    # Execute
    result = CliRunner().invoke(main, ["train", "--config", "examples/blockwise.toml", "--store", str(store),
                                       "--rounds", "2", "--clients", "4", "--epochs", "1"])

    # Assert
    assert result.exit_code == 0, result.output
    assert "block-wise (4 stages, round-robin) convnet on digits" in " ".join(result.output.split())
    for r in range(2):
        record = PluginRound.model_validate_json((store / f"rounds/00000{r}/plugin.json").read_text())
        assert record.plugin == "blockwise" and {o["stage"] for o in record.client_options.values()} == {r}
        metrics = json.loads((store / f"metrics/00000{r}.json").read_text())
        assert metrics["plugin"]["stage"] == r


# --- memory: measured needs and caps that bite (worker processes) --------------------------------------------------
@pytest.mark.integration
def test_measured_stage_memory_sits_out_a_client_too_small_and_caps_the_others(tmp_path: Path) -> None:
    # Prepare: half the clients with 64 MiB (below any torch process), half with 4 GiB
    config = tiny(rounds=1, clients=4, per_round=4, blockwise={
        "blocks": 2, "tiers": [{"fraction": 0.5, "memory_mib": 64}, {"fraction": 0.5, "memory_mib": 4096}]})
    store = LocalStore(tmp_path, fsync=False)

    # Execute
    with LocalExecutor(workers=2) as executor:
        metrics = Trainer(store, config, executor).run()

    # Assert
    stages = json.loads(store.get("blockwise/stages.json"))
    assert stages["how"].startswith("measured") and len(stages["need_bytes"]) == 2
    assert all(64 << 20 < need < 4096 << 20 for need in stages["need_bytes"])
    record = PluginRound.model_validate_json(store.get(plugin_key(0)))
    assert set(record.idle) == {"client-0000", "client-0001"}
    assert metrics[0]["aggregated"] == ["client-0002", "client-0003"] and not metrics[0]["failed"]
    reports = json.loads(store.get("rounds/000000/client_reports.json"))["reports"]
    assert {rep["memory_cap_bytes"] for rep in reports} == {4096 << 20}


@pytest.mark.integration
def test_a_client_given_a_stage_over_its_budget_fails_with_a_memory_error(tmp_path: Path) -> None:
    # Prepare: the stages are declared tiny, so a 100 MiB client is given one, but a torch process alone is more
    config = tiny(rounds=1, clients=2, per_round=2, stop_when_all_fail=False, blockwise={
        "blocks": 2, "stage_memory_mib": [1, 1], "tiers": [{"fraction": 1.0, "memory_mib": 100}]})
    store = LocalStore(tmp_path, fsync=False)

    # Execute
    with LocalExecutor(workers=2) as executor:
        trainer = Trainer(store, config, executor)
        trainer.prepare()
        metrics = trainer.run_round(0)

    # Assert
    assert set(metrics.failed) == {"client-0000", "client-0001"}
    assert all(why.startswith("MemoryLimitError") and "cap 100.0 MiB" in why for why in metrics.failed.values())
    unchanged = [read_flat(store, model_key(r), trainer.averaged, "model").tobytes() for r in (0, 1)]
    assert unchanged[0] == unchanged[1]


# --- any user's sequential model ------------------------------------------------------------------------------------
def user_model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def user_data() -> tuple[Dataset, Dataset]:
    return make_synthetic(300, features=12, classes=3, seed=4)


USER_TASK = Task(model=user_model, data=user_data, name="user-mlp")


def test_a_users_own_sequential_task_trains_block_wise_and_its_final_model_loads_into_the_users_model(
        tmp_path: Path) -> None:
    # Prepare
    config = TrainConfig.model_validate({"clients": 3, "rounds": 3, "epochs": 1, "seed": 5,
                                         "blockwise": {"blocks": 3, "balance": "parameters"}})
    store = LocalStore(tmp_path, fsync=False)

    # Execute
    trainer = Trainer(store, config, InlineExecutor(), task=USER_TASK)
    history = trainer.run()

    # Assert: three stages, one per round; the heads are extra slots the user's model does not have
    assert [m["plugin"]["stage"] for m in history] == [0, 1, 2]
    final = final_state(trainer.load_model(3).state_dict())
    mine = user_model()
    mine.load_state_dict(final)  # strict
    assert history[-1]["test_accuracy"] > 1 / 3


def bn_model() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                         nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))


def bn_data() -> tuple[Dataset, Dataset]:
    from gradshard.fl.builtin import shape_for
    from gradshard.fl.data import load_digits

    train, test = load_digits(test_fraction=0.2, seed=0)
    return shape_for("cnn", train), shape_for("cnn", test)


BN_TASK = Task(model=bn_model, data=bn_data, name="user-bn")


def test_batchnorm_statistics_train_with_their_block_and_stay_frozen_with_the_others(tmp_path: Path) -> None:
    # Prepare
    config = TrainConfig.model_validate({"clients": 2, "rounds": 1, "epochs": 1, "seed": 1,
                                         "blockwise": {"bounds": [0, 3, 9]}})
    store = LocalStore(tmp_path, fsync=False)

    # Execute
    trainer = Trainer(store, config, InlineExecutor(), task=BN_TASK)
    trainer.run()

    # Assert: stage 0 moved block 0's running statistics and nothing of block 1
    before, after = trainer.load_model(0).state_dict(), trainer.load_model(1).state_dict()
    assert not torch.equal(before["1.running_mean"], after["1.running_mean"])
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("3.", "4.", "8.")))


# --- the coverage contract's ranges, as properties ----------------------------------------------------------------
@st.composite
def layouts_and_coverages(draw: st.DrawFn) -> tuple[ModelLayout, list[dict[str, tuple[int, ...]]], int]:
    shapes = draw(st.lists(st.lists(st.integers(1, 6), min_size=1, max_size=3), min_size=1, max_size=6))
    layout = ModelLayout([TensorSpec(f"t{i}", tuple(s), "float32") for i, s in enumerate(shapes)])
    maps = []
    for _ in range(draw(st.integers(1, 3))):
        chosen = draw(st.lists(st.sampled_from(range(len(shapes))), unique=True, max_size=len(shapes)))
        maps.append({f"t{i}": tuple(draw(st.integers(0, d)) for d in shapes[i]) for i in chosen})
    return layout, maps, draw(st.integers(1, 40))


@given(layouts_and_coverages(), st.integers(1, 9))
@settings(max_examples=200, deadline=None)
def test_covered_chunks_hold_every_covered_element_and_the_shards_tile_them(
        case: tuple[ModelLayout, list[dict[str, tuple[int, ...]]], int], m: int) -> None:
    # Prepare
    layout, coverages, chunk = case
    grid = ChunkGrid(layout.numel, chunk)
    maps = [CoverageMap(layout, c) for c in coverages]

    # Execute
    ranges = covered_chunks(maps, grid)
    shards = split_ranges(ranges, m, chunk) if ranges else []

    # Assert: a mask of every covered element, built independently, lies inside the ranges
    covered = np.zeros(layout.numel, dtype=bool)
    for cov in coverages:
        for slot in layout.slots:
            if slot.spec.name in cov:
                box = np.zeros(slot.spec.shape, dtype=bool)
                box[tuple(slice(0, e) for e in cov[slot.spec.name])] = True
                covered[slot.start : slot.stop] |= box.reshape(-1)
    inside = np.zeros(layout.numel, dtype=bool)
    for lo, hi in ranges:
        assert lo % chunk == 0 and (hi % chunk == 0 or hi == layout.numel)
        inside[lo:hi] = True
    assert not (covered & ~inside).any()
    assert all(a[1] < b[0] for a, b in itertools.pairwise(ranges))  # disjoint, merged, sorted
    tiled = [i for lo, hi in shards for i in range(lo, hi)]
    assert tiled == [i for lo, hi in ranges for i in range(lo, hi)]
    assert all(lo % chunk == 0 for lo, _ in shards)


@pytest.mark.parametrize("blob", [b"not json", b'{"need_bytes": [1, -5, 3, 4], "how": "x"}',
                                  b'{"need_bytes": [1, 2], "how": "x"}', b'{"need_bytes": "many", "how": "x"}',
                                  b"[" * 100_000])
def test_a_hostile_stage_needs_record_is_an_error_that_names_it(blob: bytes) -> None:
    # Prepare
    from gradshard.blockwise.plugin import read_needs

    # Execute / Assert
    with pytest.raises(GradshardError, match=r"blockwise/stages\.json.*delete it"):
        read_needs(blob, 4)


def test_an_altered_plugin_record_is_an_error_that_names_it(tmp_path: Path) -> None:
    # Prepare
    store = LocalStore(tmp_path, fsync=False)
    Trainer(store, tiny(rounds=1), InlineExecutor()).run()
    store.put(plugin_key(0), b'{"plugin": "blockwise", "round": 0, "client_options": 7}')

    # Execute / Assert
    with pytest.raises(GradshardError, match=r"rounds/000000/plugin\.json is not a valid record"):
        Trainer(store, tiny(rounds=1), InlineExecutor()).plugin_record(0)


def test_later_output_modules_are_copies_of_the_last_block_reloaded_when_their_stage_trains(tmp_path: Path) -> None:
    # Prepare: digits convnet, heads copied from the last block (NeuLite's output modules)
    config = tiny(rounds=2, blockwise={"blocks": 4, "head_init": "later"})
    store = LocalStore(tmp_path, fsync=False)
    trainer = Trainer(store, config, InlineExecutor())

    # Execute
    history = trainer.run()

    # Assert: every head has the last block's tensors; a later round's model still holds heads of that shape
    model = trainer.load_model(2)
    assert isinstance(model, BlockwiseModel) and model.later == [True, True, True]
    tail = nn.Sequential(*[list(model.body.children())[i] for i in model.split.children(3)])
    assert [v.shape for v in model.heads[0].state_dict().values()] == [v.shape for v in tail.state_dict().values()]
    assert model.reload_head(0)
    assert all(torch.equal(a, b) for a, b in zip(model.heads[0].state_dict().values(), tail.state_dict().values(),
                                                 strict=True))
    assert history[1]["plugin"]["stage"] == 1 and len(history[1]["aggregated"]) == 6


def test_the_pace_schedule_freezes_each_stage_after_its_share_of_rounds(tmp_path: Path) -> None:
    # Prepare: 5 rounds, 2 stages, pace 3 + 2
    config = tiny(rounds=5, clients=2, per_round=2, blockwise={"blocks": 2, "schedule": "pace", "pace": [3, 2]})
    store = LocalStore(tmp_path, fsync=False)

    # Execute
    history = Trainer(store, config, InlineExecutor()).run()

    # Assert: the stage of every round is recorded as data and the clients trained it
    records = [PluginRound.model_validate_json(store.get(plugin_key(r))) for r in range(5)]
    assert [rec.notes["stage"] for rec in records] == [0, 0, 0, 1, 1]
    assert [sorted({o["stage"] for o in rec.client_options.values()}) for rec in records] == [[0]] * 3 + [[1]] * 2
    assert [m["plugin"]["stage"] for m in history] == [0, 0, 0, 1, 1]


def test_building_the_block_wise_model_moves_no_normalisation_statistics() -> None:
    # Prepare
    net = bn_model()
    before = {k: v.clone() for k, v in net.state_dict().items()}

    # Execute: the split by memory and the output modules run the model on a batch to learn shapes
    from gradshard.blockwise.task import make_split

    sample = torch.randn(4, 1, 8, 8)
    model = BlockwiseModel(net, make_split(net, BlockwiseConfig(blocks=2), sample), sample, later=True)

    # Assert: every buffer as initialised (BatchNorm in train mode would have moved them), modes restored
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert net.training and all(m.training for m in model.modules())
