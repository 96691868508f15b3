"""SuperFed (gradshard.supernet): the elastic supernet, its subnetworks, the policies, β, and training rounds.

Training runs use tiny widths, 6 clients and 2-3 rounds on the InlineExecutor (clients run in this process).
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load as load_safetensors

from gradshard.cli.main import main
from gradshard.core.coverage import CoverageMap
from gradshard.errors import GradshardError
from gradshard.fl.client import ClientTask
from gradshard.fl.config import TrainConfig
from gradshard.fl.driver import Trainer
from gradshard.fl.plugin import PluginRound
from gradshard.format.compact import open_client_update
from gradshard.format.keys import model_key, plugin_key, update_key
from gradshard.format.round import load_manifest
from gradshard.format.update import read_flat
from gradshard.runtime.inline import InlineExecutor
from gradshard.store import LocalStore
from gradshard.supernet import distribution
from gradshard.supernet.config import SubnetSpec, SupernetConfig
from gradshard.supernet.model import ElasticResNet, Subnet, coverage, extract, macs, parameters, write_back
from gradshard.topology.base import Plan

TINY = SupernetConfig(widths=(4, 8, 8), depths=(2, 1, 1), group_size=2, family="", subnets=(
    SubnetSpec(depth=(1, 1, 1), width=(0.5, 0.25, 0.25)),
    SubnetSpec(depth=(1, 1, 1), width=(1.0, 0.5, 0.5), inner=(0.5, 1.0, 0.5)),
    # the largest is not the whole supernet: stage 0's second block is never trained, so it must never change
    SubnetSpec(depth=(1, 1, 1), width=(1.0, 1.0, 1.0))))


def tiny_run(**changes: object) -> TrainConfig:
    base: dict[str, object] = {"clients": 6, "per_round": 4, "rounds": 3, "epochs": 1, "batch_size": 64,
                               "lr": 0.05, "momentum": 0.9, "seed": 3, "supernet": TINY}
    return TrainConfig.model_validate({**base, **changes})


def run(path: Path, config: TrainConfig) -> tuple[LocalStore, list[dict[str, object]]]:
    store = LocalStore(path, fsync=False)
    return store, Trainer(store, config, InlineExecutor()).run()


def models(store: LocalStore, rounds: int) -> list[bytes]:
    return [store.get(model_key(r)) for r in range(rounds + 1)]


# --- the supernet and its subnetworks ------------------------------------------------------------------------------
@pytest.fixture
def net() -> ElasticResNet:
    torch.manual_seed(0)
    return ElasticResNet((8, 16, 16), (2, 2, 2), classes=10, in_channels=1, group_size=4)


SUBNETS = [Subnet((1, 1, 1), (4, 4, 4)), Subnet((2, 1, 2), (8, 12, 4)), Subnet((2, 2, 2), (8, 16, 16)),
           Subnet((2, 1, 2), (8, 12, 8), mids=(4, 8, 16))]


@pytest.mark.parametrize("sub", SUBNETS)
def test_extracted_subnetwork_computes_what_the_supernet_computes_on_its_slices(net: ElasticResNet,
                                                                                 sub: Subnet) -> None:
    # Prepare
    x = torch.randn(7, 1, 8, 8)

    # Execute
    small = extract(net, sub)

    # Assert
    assert small.widths == sub.channels and small.depths == sub.depth
    torch.testing.assert_close(small(x), net(x, sub), rtol=0, atol=1e-6)
    assert sum(p.numel() for p in small.parameters()) == parameters(net, sub)


def test_extraction_then_write_back_is_identity_and_write_back_touches_only_covered_elements(
        net: ElasticResNet) -> None:
    # Prepare
    sub = SUBNETS[1]
    before = {k: v.clone() for k, v in net.state_dict().items()}

    # Execute: write back the unchanged extraction, then a changed one
    write_back(net, extract(net, sub))
    unchanged = {k: v.clone() for k, v in net.state_dict().items()}
    small = extract(net, sub)
    with torch.no_grad():
        for p in small.parameters():
            p.add_(1.0)
    extents = write_back(net, small)

    # Assert
    assert all(torch.equal(unchanged[k], before[k]) for k in before)
    after = net.state_dict()
    for name, tensor in after.items():
        mask = torch.zeros_like(tensor, dtype=torch.bool)
        if name in extents:
            mask[tuple(slice(0, e) for e in extents[name])] = True
        torch.testing.assert_close(tensor[mask], before[name][mask] + 1.0, rtol=0, atol=0)
        assert torch.equal(tensor[~mask], before[name][~mask])


def test_coverage_is_leading_extents_and_omits_the_tensors_of_skipped_blocks(net: ElasticResNet) -> None:
    # Execute
    extents = coverage(net, Subnet((1, 2, 1), (4, 8, 12)))

    # Assert
    assert extents["stem.weight"] == (4, 1, 3, 3)
    assert extents["stages.0.0.conv1.weight"] == (4, 4, 3, 3)
    assert extents["stages.1.0.conv1.weight"] == (8, 4, 3, 3)
    assert extents["stages.1.0.short_conv.weight"] == (8, 4, 1, 1)
    assert extents["stages.1.1.norm2.weight"] == (8,)
    assert extents["head.weight"] == (10, 12) and extents["head.bias"] == (10,)
    assert "stages.0.1.conv1.weight" not in extents and "stages.2.1.conv2.weight" not in extents
    assert set(extents) <= set(net.state_dict())


def test_inner_widths_slice_only_the_blocks_inner_layer(net: ElasticResNet) -> None:
    # Execute
    extents = coverage(net, Subnet((1, 2, 1), (4, 8, 12), mids=(8, 4, 12)))

    # Assert
    assert extents["stages.0.0.conv1.weight"] == (8, 4, 3, 3) and extents["stages.0.0.norm1.weight"] == (8,)
    assert extents["stages.0.0.conv2.weight"] == (4, 8, 3, 3) and extents["stages.0.0.norm2.weight"] == (4,)
    assert extents["stages.1.1.conv1.weight"] == (4, 8, 3, 3) and extents["stages.1.1.conv2.weight"] == (8, 4, 3, 3)
    assert extents["stages.1.0.short_conv.weight"] == (8, 4, 1, 1)


def test_macs_are_counted_by_hand() -> None:
    # Prepare: one block per stage, 4 channels, 8x8 -> 8, 4, 2
    with torch.device("meta"):
        net = ElasticResNet((4, 4, 4), (1, 1, 1), classes=10, in_channels=1, group_size=4)
    stem = 1 * 4 * 9 * 64
    stage0 = 2 * 4 * 4 * 9 * 64
    stage1 = 4 * 4 * 1 * 16 + 2 * 4 * 4 * 9 * 16
    stage2 = 4 * 4 * 1 * 4 + 2 * 4 * 4 * 9 * 4

    # Execute / Assert
    assert macs(net, net.full) == stem + stage0 + stage1 + stage2 + 4 * 10
    narrow = Subnet((1, 1, 1), (4, 4, 4), mids=(2, 4, 4))  # stage 0's inner layer at 2 channels (group size 2)
    with torch.device("meta"):
        net2 = ElasticResNet((4, 4, 4), (1, 1, 1), classes=10, in_channels=1, group_size=2)
    assert macs(net2, narrow) == macs(net2, net2.full) - 2 * (2 * 4 * 9 * 64)


# --- distribution policies and β -----------------------------------------------------------------------------------
COHORT = [f"client-{i:04d}" for i in (0, 2, 3, 5, 7, 9)]


def test_policies_are_deterministic_and_depend_on_round_and_seed() -> None:
    # Execute
    static = distribution.assign_static(COHORT, 3)
    randoms = [distribution.assign_random(COHORT, 4, 1, r) for r in range(5)]
    again = [distribution.assign_random(COHORT, 4, 1, r) for r in range(5)]
    other_seed = [distribution.assign_random(COHORT, 4, 2, r) for r in range(5)]
    sandwich = distribution.assign_sandwich(COHORT, 4, 3, 0, [], 1, 0)

    # Assert
    assert static == {"client-0000": 0, "client-0002": 2, "client-0003": 0, "client-0005": 2, "client-0007": 1,
                      "client-0009": 0}
    assert randoms == again and randoms != other_seed and len({tuple(a.values()) for a in randoms}) > 1
    assert sandwich == distribution.assign_sandwich(COHORT, 4, 3, 0, [], 1, 0)
    assert sorted(sandwich.values()).count(3) == 1 and sorted(sandwich.values()).count(0) == 1
    assert all(v in (1, 2) for c, v in sandwich.items() if v not in (0, 3))


def test_sandwich_gives_the_largest_and_smallest_to_the_least_served_clients() -> None:
    # Prepare: everyone but client-0005 had the largest (3) before; client-0009 never had the smallest (0)
    history = [{c: 3 for c in COHORT if c != "client-0005"},
               {c: 0 for c in COHORT if c != "client-0009"},
               {"client-0005": 1, "client-0009": 2}]

    # Execute
    two = distribution.assign_sandwich(COHORT, 4, 3, 0, history, 5, 3, per_side=2)
    one = distribution.assign_sandwich(COHORT, 4, 3, 0, history, 5, 3, per_side=1)

    # Assert
    assert one["client-0005"] == 3 and one["client-0009"] == 0
    assert [c for c, i in one.items() if i == 3] == ["client-0005"]
    assert sorted(two.values()).count(3) == 2 and two["client-0005"] == 3 and two["client-0009"] == 0


def test_beta_schedule_start_end_midpoint_and_quarter_by_hand() -> None:
    # 10 rounds, share 0.8: T = 8; t = r / 8
    def cosine(r: int) -> float:
        return distribution.beta(r, 10, 0.9, 0.125, 0.8, "cosine")

    def linear(r: int) -> float:
        return distribution.beta(r, 10, 0.9, 0.125, 0.8, "linear")

    assert cosine(0) == pytest.approx(0.9) and linear(0) == pytest.approx(0.9)
    assert cosine(8) == pytest.approx(0.125) and cosine(9) == pytest.approx(0.125)
    assert linear(8) == pytest.approx(0.125) and linear(9) == pytest.approx(0.125)
    assert cosine(4) == pytest.approx((0.9 + 0.125) / 2) and linear(4) == pytest.approx((0.9 + 0.125) / 2)
    assert cosine(2) == pytest.approx(0.125 + 0.775 * (1 + math.cos(math.pi / 4)) / 2)  # 0.7866
    assert linear(2) == pytest.approx(0.9 - 0.775 / 4)  # 0.70625


def test_beta_weights_split_beta_among_the_largest_and_the_rest_among_the_others() -> None:
    weights = distribution.beta_weights({"a": 2, "b": 0, "c": 1, "d": 2}, largest=2, value=0.6)
    assert weights == pytest.approx({"a": 0.3, "d": 0.3, "b": 0.2, "c": 0.2})
    assert distribution.beta_weights({"a": 1, "b": 0}, largest=2, value=0.6) == {"a": 0.5, "b": 0.5}


# --- config --------------------------------------------------------------------------------------------------------
def test_example_config_validates_and_bad_widths_are_refused() -> None:
    # Execute
    config = TrainConfig.model_validate(tomllib.loads(Path("examples/superfed.toml").read_text()))

    # Assert
    assert config.supernet is not None and len(config.supernet.family_specs()) == 4
    with pytest.raises(ValueError, match="multiple of group_size"):
        SupernetConfig(widths=(16, 32, 64), subnets=(SubnetSpec(depth=(1, 1, 1), width=(0.3, 0.5, 0.5)),))
    with pytest.raises(ValueError, match="fedavg"):
        tiny_run(server={"name": "fedavgm"})


# --- training rounds -----------------------------------------------------------------------------------------------
def test_rounds_record_assignments_train_subnets_and_keep_uncovered_elements_bitwise(tmp_path: Path) -> None:
    # Prepare
    config = tiny_run()

    # Execute
    store, metrics = run(tmp_path, config)

    # Assert: the decisions are recorded and reach the clients' updates as coverage
    trainer = Trainer(store, config, InlineExecutor())
    plugin = trainer.plugin
    assert plugin is not None
    layout = trainer.averaged
    seen = set()
    for r in range(config.rounds):
        record = PluginRound.model_validate_json(store.get(plugin_key(r)))
        manifest = load_manifest(store, f"rounds/{r:06d}/manifest.json")
        assert record.aggregation.reducer == "coverage-mean" and record.aggregation.weighting == "server"
        assert metrics[r]["plugin"]["assignment"] == {c: o["subnet"] for c, o in record.client_options.items()}  # type: ignore[index]
        assert sorted(record.client_options) == metrics[r]["cohort"]
        union = np.zeros(layout.numel, dtype=bool)
        for entry in manifest.clients:
            index = record.client_options[entry.client]["subnet"]
            seen.add(index)
            with open_client_update(store, update_key(r, entry.client), entry.client, layout) as upd:
                assert upd.meta.coverage is not None and upd.meta.compact  # only the subnetwork's elements travel
                cov = CoverageMap(layout, upd.meta.coverage)
                assert cov.covered_elems == plugin.params[index]
            stored = load_safetensors(store.get(update_key(r, entry.client)))
            assert [v.size for v in stored.values()] == [plugin.params[index]]  # one tensor of the covered elements
            mask = cov.mask(0, layout.numel, np.empty(layout.numel, dtype=bool))
            union |= mask
        before = read_flat(store, model_key(r), layout, "model")
        after = read_flat(store, model_key(r + 1), layout, "model")
        assert np.array_equal(before[~union].view(np.uint32), after[~union].view(np.uint32))
        assert not np.array_equal(before[union], after[union])
        subnets = metrics[r]["plugin"]["subnets"]  # type: ignore[index]
        assert [s["index"] for s in subnets] == [0, 1, 2] and all(0 <= s["test_accuracy"] <= 1 for s in subnets)
    assert {plugin.largest, plugin.smallest} <= seen
    assert plugin.macs[0] < plugin.macs[1] < plugin.macs[2]


def test_sharded_m1_and_m4_give_the_same_supernet_bytes(tmp_path: Path) -> None:
    # Execute
    one, _ = run(tmp_path / "m1", tiny_run(rounds=2, aggregation={"topology": "sharded", "shards": 1}))
    four, _ = run(tmp_path / "m4", tiny_run(rounds=2, aggregation={"topology": "sharded", "shards": 4}))

    # Assert
    assert models(one, 2) == models(four, 2)
    assert models(one, 2)[1] != models(one, 2)[0]


def test_a_run_killed_mid_round_and_resumed_gives_the_same_supernet_bytes(tmp_path: Path) -> None:
    # Prepare
    config = tiny_run(rounds=3)
    reference, metrics = run(tmp_path / "once", config)
    store = LocalStore(tmp_path / "twice", fsync=False)

    # Execute: round 0 completes; round 1 opens, its decisions are recorded and one client trains; then the driver
    # "dies" and a new one continues
    first = Trainer(store, config, InlineExecutor())
    first.prepare()
    first.run_round(0)
    spec = first._open(1)
    record = first._plugin_round(spec)
    plan = first._client_plan(spec, record)
    InlineExecutor().run(Plan("clients", plan.invocations[:1]), store)
    assert isinstance(plan.invocations[0].args, ClientTask) and plan.invocations[0].args.options
    del first
    resumed = Trainer(store, config, InlineExecutor()).run()

    # Assert
    assert models(store, 3) == models(reference, 3)
    for r in range(3):
        assert store.get(plugin_key(r)) == reference.get(plugin_key(r))
        assert resumed[r]["plugin"] == metrics[r]["plugin"]


def test_without_a_plugin_no_decision_is_recorded_and_the_metrics_have_no_plugin_entry(tmp_path: Path) -> None:
    # Execute
    store, metrics = run(tmp_path, TrainConfig(clients=4, rounds=1, epochs=1, batch_size=64, seed=3))

    # Assert
    assert not store.exists(plugin_key(0))
    assert "plugin" not in metrics[0]
    assert Trainer(store, TrainConfig(clients=4, rounds=1, epochs=1, batch_size=64, seed=3),
                   InlineExecutor()).plugin is None


@pytest.mark.integration
def test_gradshard_train_runs_the_example_superfed_config(tmp_path: Path) -> None:
    # Prepare
    store = tmp_path / "store"

    # Execute
    result = CliRunner().invoke(main, ["train", "--config", "examples/superfed.toml", "--store", str(store),
                                       "--rounds", "1", "--clients", "4", "--epochs", "1"])

    # Assert
    assert result.exit_code == 0, result.output
    assert "SuperFed supernet on digits" in " ".join(result.output.split())
    round0 = PluginRound.model_validate_json((store / "rounds/000000/plugin.json").read_text())
    assert round0.plugin == "supernet" and len(round0.client_options) == 4
    metrics = json.loads((store / "metrics/000000.json").read_text())
    assert [s["label"] for s in metrics["plugin"]["subnets"]] == ["d111-w0.25", "d111-w0.5", "d222-w0.5", "d222-w1"]


@pytest.mark.parametrize("policy", ["static", "random"])
def test_static_and_random_policies_reach_the_clients_through_the_trainer(tmp_path: Path, policy: str) -> None:
    # Prepare
    config = tiny_run(rounds=1, supernet=TINY.model_copy(update={"policy": policy, "weighting": "uniform"}))

    # Execute
    store, metrics = run(tmp_path, config)

    # Assert
    record = PluginRound.model_validate_json(store.get(plugin_key(0)))
    cohort = metrics[0]["cohort"]
    assert isinstance(cohort, list)
    expected = distribution.assign_static(cohort, 3) if policy == "static" else \
        distribution.assign_random(cohort, 3, config.seed, 0)
    assert {c: o["subnet"] for c, o in record.client_options.items()} == expected
    assert record.aggregation.weighting == "uniform" and record.aggregation.weights is None


def test_a_store_whose_rounds_another_plugin_decided_is_refused(tmp_path: Path) -> None:
    # Prepare
    store, _ = run(tmp_path, tiny_run(rounds=1))
    record = PluginRound.model_validate_json(store.get(plugin_key(0)))
    store.put(plugin_key(0), record.model_copy(update={"plugin": "blockwise"}).model_dump_json().encode())

    # Execute / Assert
    with pytest.raises(GradshardError, match="written by plugin 'blockwise'"):
        Trainer(store, tiny_run(rounds=1), InlineExecutor()).plugin_record(0)
