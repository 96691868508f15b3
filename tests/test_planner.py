"""Planner: recommendation under a memory cap and a deadline, the GradsSharding / λ-FL crossover, the sweep."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from gradshard.cli.cost import cost, plan
from gradshard.cost.model import LatencyModel
from gradshard.cost.planner import (
    SWEEP_FILES,
    CostModel,
    PlanRequest,
    crossover_mb,
    default_sweep_sizes,
    recommend,
    shard_counts,
    sweep,
    write_sweep,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def cli() -> click.Group:
    """A throwaway group holding the cost commands, as ``gradshard.cli.main`` registers them."""
    return click.Group(commands={"cost": cost, "plan": plan})


def test_a_7b_model_for_100_clients_under_10_gb_and_2_minutes_is_sharded_and_ranged() -> None:
    request = PlanRequest(params=7e9, clients=100, memory_limit_mb=10240, deadline_s=120)

    rec = recommend(request)

    assert rec.best is not None
    best = rec.best.to_dict()
    assert (best["arch"], best["layout"], best["shards"], best["memory_mb"]) == ("sharded", "ranged", 614, 581)
    assert best["latency_s"] == pytest.approx(119.566, abs=1e-3)
    assert best["per_1000_rounds"]["total"] == pytest.approx(771.190, abs=1e-3)
    rows = [(c.cost.shape.arch, c.cost.options.layout, c.feasibility.feasible) for c in rec.alternatives]
    assert rows == [("sharded", "ranged", True), ("sharded", "paper", True), ("flat", "paper", False),
                    ("lambda-fl", "paper", False), ("lifl", "paper", False)]
    assert {c.feasibility.reason for c in rec.alternatives[2:]} == {"needs 80,559 MB per function > 10,240 MB cap"}


def test_without_a_deadline_fewer_shards_are_cheaper() -> None:
    rec = recommend(PlanRequest(params=7e9, clients=100, memory_limit_mb=10240))

    assert rec.best is not None
    assert (rec.best.cost.shape.shards, rec.best.cost.options.layout) == (499, "ranged")
    assert rec.best.per_1000_total == pytest.approx(761.660, abs=1e-3)


def test_nothing_is_recommended_when_no_alternative_meets_the_deadline() -> None:
    rec = recommend(PlanRequest(params=7e9, clients=100, memory_limit_mb=10240, deadline_s=5))

    assert rec.best is None
    assert rec.to_dict()["recommended"] is None
    assert [c.feasibility.reason for c in rec.alternatives[:2]] == ["round takes 84 s > 5 s deadline",
                                                                   "round takes 66 s > 5 s deadline"]


def test_vgg16_under_the_papers_3008_mb_cap_is_sharded() -> None:
    rec = recommend(PlanRequest(params=134e6, clients=20, memory_limit_mb=3008))

    assert rec.best is not None
    assert (rec.best.cost.shape.shards, rec.best.cost.options.layout, rec.best.cost.memory_mb) == (9, "ranged", 621)
    tree = next(c for c in rec.alternatives if c.cost.shape.arch == "lambda-fl")
    assert rec.best.per_1000_total / tree.per_1000_total == pytest.approx(0.3079, abs=1e-4)


def test_shard_counts_tried_are_every_m_to_64_then_under_5_percent_apart() -> None:
    counts = shard_counts(1000)

    assert counts[:64] == list(range(1, 65))
    assert counts[-1] == 1000
    assert max(b / a for a, b in itertools.pairwise(counts[63:])) < 1.05


def test_crossover_for_50_clients_and_4_shards_in_the_paper_layout() -> None:
    # with the per-function read rate the paper measured on Lambda (48 MB/s), the crossover is near 113 MB;
    # the paper's ~500 MB needs a function to read about 10× faster (16 streams: 456 MB).
    size = {streams: crossover_mb(50, 4, "paper", model=CostModel(latency=LatencyModel(streams=streams)))
            for streams in (1, 4, 16)}

    assert size == {1: pytest.approx(113.33, abs=0.01), 4: pytest.approx(232.08, abs=0.01),
                    16: pytest.approx(456.20, abs=0.01)}
    assert 200 < size[4] < size[16] < 1000


def test_ranged_layout_moves_the_crossover_down() -> None:
    headers_read = crossover_mb(50, 4, "ranged")
    offsets_known = crossover_mb(50, 4, "ranged", model=CostModel(header_gets=0))

    assert (headers_read, offsets_known) == (pytest.approx(87.67, abs=0.01), pytest.approx(35.16, abs=0.01))


def test_no_crossover_when_grads_sharding_is_dearer_everywhere() -> None:
    assert crossover_mb(50, 4, lo_mb=1, hi_mb=50) is None


def test_sweep_marks_trees_infeasible_where_their_rule_exceeds_the_cap() -> None:
    rows = sweep([500, 1000, 5000], clients=50, shards=4, memory_limit_mb=3008)

    paper = {(r.arch, r.model_mb): (r.memory_mb, r.feasible) for r in rows if r.layout == "paper"}
    assert paper[("lambda-fl", 500)] == (1950, True)
    assert paper[("lifl", 1000)] == (3450, False)
    assert paper[("sharded", 1000)] == (1200, True)
    assert paper[("sharded", 5000)] == (4200, False)
    assert len(rows) == 2 * 4 * 3


def test_write_sweep_writes_table_and_plot(tmp_path: Path) -> None:
    rows = sweep(default_sweep_sizes()[:3], clients=20)

    paths = write_sweep(rows, tmp_path / "out", "test")

    assert {p.name for p in paths.values()} == set(SWEEP_FILES.values())
    with paths["csv"].open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(json.loads(paths["json"].read_text())) == 24
    assert table[0]["arch"] == "flat" and float(table[0]["model_mb"]) == 10.0
    assert paths["png"].read_bytes().startswith(PNG_MAGIC)


def test_plan_command_prints_the_recommendation_as_json() -> None:
    args = ["plan", "--params", "7e9", "--clients", "100", "--memory-limit", "10240", "--deadline", "120", "--json"]

    result = CliRunner().invoke(cli(), args)

    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert (data["recommended"]["arch"], data["recommended"]["shards"]) == ("sharded", 614)
    assert data["request"]["model_mb"] == pytest.approx(7e9 * 4 / 2**20)
    assert len(data["alternatives"]) == 5


def test_plan_command_prints_a_table() -> None:
    result = CliRunner().invoke(cli(), ["plan", "--params", "7e9", "--clients", "100", "--deadline", "120"])

    assert result.exit_code == 0, result.output
    assert "recommended: sharded, M = 614, 581 MB functions, ranged layout: $771.19 per 1000 rounds" in (
        result.output)


def test_plan_command_sweeps_both_layouts(tmp_path: Path) -> None:
    args = ["plan", "--sweep", "--clients", "50", "--memory-limit", "3008", "--out", str(tmp_path), "--json"]

    result = CliRunner().invoke(cli(), args)

    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["crossover_mb"] == {"paper": pytest.approx(113.33, abs=0.01), "ranged": pytest.approx(87.67, abs=0.01)}
    assert (tmp_path / SWEEP_FILES["png"]).read_bytes().startswith(PNG_MAGIC)
    assert data["points"] == 2 * 4 * len(default_sweep_sizes())


def test_plan_command_needs_params_unless_sweeping() -> None:
    result = CliRunner().invoke(cli(), ["plan", "--clients", "10"])

    assert result.exit_code == 2
    assert "give --params (or --sweep)" in result.output
