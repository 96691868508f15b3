"""Cost model: prices, request counts, memory rule, latency model, and the paper's published costs recomputed.

The published per-run durations and function sizes (``../shared/reference/gradsharding-results/*.json``, N = 20)
are embedded at the end of this file (``PAPER_RUNS``) so the tests run without the reference directory; a test
checks them against the files when the directory is there.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import click
import pytest
from click.testing import CliRunner

from gradshard.aggregation.driver import AggregateConfig, aggregate_round
from gradshard.cli.cost import cost, plan
from gradshard.core.zoo import get_layout, synthetic
from gradshard.cost.model import (
    MB,
    PAPER_LATENCY,
    PAPER_MEMORY_RULE,
    Aggregator,
    CostBreakdown,
    CostOptions,
    LatencyModel,
    RoundShape,
    calibrate,
    check_feasible,
    cost_of_local_run,
    count_requests,
    measured_memory_mb,
    predict_cost,
    predict_durations,
    round_cost,
    round_latency_s,
    shape_for,
    shape_from_plan,
)
from gradshard.cost.pricing import AWS_LAMBDA_X86, GCP_FUNCTIONS_GEN1, PriceSheet, load_price_sheet, price_sheet
from gradshard.demo.synthetic import make_round
from gradshard.errors import PlanError
from gradshard.format.keys import aggregate_key, manifest_key, update_key
from gradshard.format.round import ClientEntry, RoundManifest, RoundSpec
from gradshard.runtime import InlineExecutor
from gradshard.runtime.report import InvocationReport
from gradshard.store import MemoryStore
from gradshard.topology import PlanOutput, ReduceOptions, sharded_plan
from gradshard.topology.hierarchical import lifl_plan
from gradshard.topology.tree import lambda_fl_plan

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "gradsharding-results"
# Update sizes in MB (2^20 bytes): our zoo's float32 layouts, and the paper's 5 GB synthetic update.
RESNET18_MB = get_layout("resnet18").aggregated().nbytes / MB  # 42.66
VGG16_MB = get_layout("vgg16").aggregated().nbytes / MB  # 512.32
GPT2_LARGE_MB = get_layout("gpt2-large").aggregated().nbytes / MB  # 2952.69
SYNTHETIC_5GB_MB = 5120.0
PUBLISHED = {("resnet18", "sharded"): 0.70, ("resnet18", "lambda-fl"): 0.38, ("resnet18", "lifl"): 0.52,
             ("vgg16", "sharded"): 3.82, ("vgg16", "lambda-fl"): 10.28, ("vgg16", "lifl"): 13.03,
             ("gpt2_large", "sharded"): 59.29, ("synthetic_5gb", "sharded"): 85.66}


class PaperRuns(NamedTuple):
    """One architecture on one model in the paper: function memory, M, and per run (cold start?, durations)."""

    memory_mb: int
    shards: int
    runs: tuple[tuple[bool, tuple[float, ...]], ...]


def per_1000_rounds(model: str, arch: Any, *, warm_only: bool = True) -> CostBreakdown:
    """The published rule: mean over the warm runs of Σ durations × memory × $/GB-s, plus the full-round S3
    operations; per 1000 rounds."""
    paper = PAPER_RUNS[(model, arch)]
    shape = shape_for(arch, 20, paper.shards)
    costs = [round_cost(shape, paper.memory_mb, durations).per_round
             for cold, durations in paper.runs if not (cold and warm_only)]
    return CostBreakdown.mean(costs).scaled(1000)


def cli() -> click.Group:
    """A throwaway group holding the cost commands, as ``gradshard.cli.main`` registers them."""
    return click.Group(commands={"cost": cost, "plan": plan})


# --- prices -------------------------------------------------------------------------------------------------------

def test_aws_sheet_has_the_papers_prices_with_source_and_date() -> None:
    sheet = price_sheet("aws-lambda-x86")

    assert (sheet.function.gb_second, sheet.function.per_million_requests) == (0.0000166667, 0.20)
    assert (sheet.storage.put_per_1000, sheet.storage.get_per_1000) == (0.005, 0.0004)
    assert sheet.region == "us-east-1"
    assert sheet.as_of.isoformat() == "2024-06-01"
    assert sheet.sources == ("https://aws.amazon.com/lambda/pricing/", "https://aws.amazon.com/s3/pricing/")


def test_lambda_bills_configured_memory_by_the_millisecond_and_at_least_128_mb() -> None:
    sheet = AWS_LAMBDA_X86

    vgg_shard = sheet.compute_cost(835, 57.3)
    tiny = sheet.compute_cost(40, 0.0004)

    assert vgg_shard == pytest.approx(57.3 * 835 / 1024 * 0.0000166667, rel=1e-12)
    assert tiny == pytest.approx(0.001 * 128 / 1024 * 0.0000166667, rel=1e-12)


def test_gcp_bills_the_next_memory_tier_and_its_cpu_per_100_ms() -> None:
    sheet = GCP_FUNCTIONS_GEN1

    dollars = sheet.compute_cost(835, 57.31)

    assert sheet.billed_memory_mb(835) == 1024
    assert dollars == pytest.approx(57.4 * (1.0 * 0.0000025 + 1.4 * 0.0000100), rel=1e-12)


def test_a_price_sheet_round_trips_through_json_and_unknown_names_fail(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(GCP_FUNCTIONS_GEN1.model_dump_json())

    loaded = price_sheet(str(path))

    assert loaded == load_price_sheet(path) == GCP_FUNCTIONS_GEN1
    assert isinstance(loaded, PriceSheet)
    with pytest.raises(PlanError, match="unknown price sheet 'azure'"):
        price_sheet("azure")


# --- shapes and request counts ------------------------------------------------------------------------------------

def test_paper_tree_shapes_for_20_clients() -> None:
    lambda_fl = shape_for("lambda-fl", 20)
    lifl = shape_for("lifl", 20)

    assert [(a.id, a.stage, a.client_reads, a.partial_reads) for a in lambda_fl.aggregators] == [
        ("leaf-0000", 0, 5, 0), ("leaf-0001", 0, 5, 0), ("leaf-0002", 0, 5, 0), ("leaf-0003", 0, 5, 0),
        ("root", 1, 0, 4)]
    assert [a.client_reads for a in lifl.aggregators if a.stage == 0] == [3, 3, 3, 3, 3, 3, 2]
    assert [a.partial_reads for a in lifl.aggregators if a.stage == 1] == [3, 3, 1]
    assert [a.partial_reads for a in lifl.aggregators if a.stage == 2] == [3]


@pytest.mark.parametrize(("arch", "shards", "function_gets", "function_puts", "puts", "gets"), [
    ("sharded", 4, 80, 4, 84, 160),  # PUT N·M + M, GET 2·N·M
    ("lambda-fl", 1, 24, 5, 25, 44),  # 4 leaves + root: 24 GETs, 5 PUTs; clients 20 + 20
    ("lifl", 1, 30, 11, 31, 50),  # 7 + 3 + 1: 30 GETs, 11 PUTs
    ("flat", 1, 20, 1, 21, 40),
])
def test_request_counts_in_the_paper_layout_for_20_clients(arch: Any, shards: int, function_gets: int,
                                                           function_puts: int, puts: int, gets: int) -> None:
    shape = shape_for(arch, 20, shards)

    counts = count_requests(shape, "paper")

    assert (counts.function_gets, counts.function_puts, counts.puts, counts.gets) == (
        function_gets, function_puts, puts, gets)


def test_ranged_layout_one_object_per_client_ranged_reads_one_output() -> None:
    shape = shape_for("sharded", 20, 4)

    with_headers = count_requests(shape, "ranged", header_gets=2)
    offsets_known = count_requests(shape, "ranged", header_gets=0)
    tree = count_requests(shape_for("lambda-fl", 20), "ranged")

    # clients 20 PUTs; 4 parts + create, header part, complete; 20·4·(1 + 2) function GETs + 20 read-backs
    assert (with_headers.puts, with_headers.gets) == (27, 260)
    assert (offsets_known.puts, offsets_known.gets) == (27, 100)
    assert tree == count_requests(shape_for("lambda-fl", 20), "paper")


def test_clients_past_the_stream_budget_are_counted_per_window() -> None:
    # 300 clients, 4 shards of a 100 MB model: each function's range is 25 MB = 50 windows of 512 KiB
    shape = shape_for("sharded", 300, 4)

    within = count_requests(shape, "ranged", model_mb=100, max_streams=300)
    past = count_requests(shape, "ranged", model_mb=100, max_streams=256)
    unknown_size = count_requests(shape, "ranged", max_streams=256)

    # 300·4 reads of 1 stream + 2 header GETs; past the budget 44 clients × 4 functions make 49 more GETs each
    assert within.function_gets == unknown_size.function_gets == 300 * 4 * 3
    assert past.function_gets == 300 * 4 * 3 + 44 * 4 * 49


def fake_manifest(n: int, numel: int = 10_240) -> RoundManifest:
    """A validated-looking manifest for planning only (no objects behind it)."""
    layout = synthetic(numel, tensor_elems=1000)
    spec = RoundSpec.create(0, layout, chunk_elems=64)
    clients = [ClientEntry(client=f"c{i:02d}", key=update_key(0, f"c{i:02d}"), examples=1, header_sha256="0" * 64,
                           size=layout.nbytes) for i in range(n)]
    return RoundManifest(round=0, spec=spec, clients=clients)


OUTPUT = PlanOutput(manifest_key(0), aggregate_key(0), "0123456789abcdef" * 2, 0)


def test_executed_plans_have_the_analytic_shapes() -> None:
    manifest = fake_manifest(20)

    sharded = shape_from_plan(sharded_plan(manifest, "0" * 64, OUTPUT, ReduceOptions(), 4), 20)
    tree = shape_from_plan(lambda_fl_plan(manifest, "0" * 64, OUTPUT, ReduceOptions()), 20)

    assert count_requests(sharded) == count_requests(shape_for("sharded", 20, 4))
    assert count_requests(tree) == count_requests(shape_for("lambda-fl", 20))
    assert sum(a.fraction for a in sharded.aggregators) == pytest.approx(1.0)


def test_lifl_hand_offs_in_shared_memory_cost_no_request() -> None:
    nodes = [{"kind": "local", "root": f"/nonexistent/node-{j}", "fsync": False} for j in range(2)]
    lifl = lifl_plan(fake_manifest(20), "0" * 64, OUTPUT, ReduceOptions(), node_stores=nodes)

    counts = count_requests(shape_from_plan(lifl, 20))

    # per node 10 clients: 4 leaves (to shm), 2 middles; node 1's 2 middles hand off through the store
    assert lifl.params["store_handoffs"] == 2
    assert (counts.function_gets, counts.function_puts, counts.invocations) == (20 + 2, 2 + 1, 13)


# --- memory and feasibility ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("model_mb", "shards", "shard_mb", "tree_mb"), [
    (VGG16_MB, 4, 835, 1987),
    (GPT2_LARGE_MB, 4, 2665, 9309),
    (SYNTHETIC_5GB_MB, 8, 2370, 15810),
])
def test_paper_memory_rule_gives_the_deployed_function_sizes(model_mb: float, shards: int, shard_mb: int,
                                                             tree_mb: int) -> None:
    gs = PAPER_MEMORY_RULE.memory_mb(shape_for("sharded", 20, shards), model_mb)
    tree = PAPER_MEMORY_RULE.memory_mb(shape_for("lambda-fl", 20), model_mb)

    assert (gs, tree) == (shard_mb, tree_mb)


def test_trees_become_infeasible_where_their_memory_rule_exceeds_the_cap() -> None:
    tree = shape_for("lifl", 20)
    rule = PAPER_MEMORY_RULE

    below, above = rule.memory_mb(tree, 852.6), rule.memory_mb(tree, 853.0)  # 3·|θ| + 450 crosses 3008 at 852.7

    assert (below, above) == (3008, 3009)
    assert check_feasible(below, 60, 3008).feasible
    assert check_feasible(above, 60, 3008).reason == "needs 3,009 MB per function > 3,008 MB cap"
    assert not check_feasible(rule.memory_mb(tree, GPT2_LARGE_MB), 60, 3008).feasible
    assert check_feasible(rule.memory_mb(tree, GPT2_LARGE_MB), 60, 10240).feasible
    assert not check_feasible(rule.memory_mb(tree, SYNTHETIC_5GB_MB), 60, 10240).feasible


def test_feasibility_also_checks_the_platform_time_limit() -> None:
    verdict = check_feasible(1024, 901, 10240)

    assert verdict.reason == "a function runs 901 s > 900 s limit of Lambda (x86_64)"


def test_measured_memory_is_the_largest_peak_in_whole_mb() -> None:
    reports = [InvocationReport(invocation="a", function="f", ok=True, peak_rss_bytes=40 * MB + 1),
               InvocationReport(invocation="b", function="f", ok=True, peak_rss_bytes=39 * MB)]

    assert measured_memory_mb(reports) == 41
    with pytest.raises(PlanError, match="no measured peak memory"):
        measured_memory_mb([InvocationReport(invocation="a", function="f", ok=True)])


# --- latency ------------------------------------------------------------------------------------------------------

def test_latency_model_adds_requests_transfer_and_compute() -> None:
    model = LatencyModel(stream_mb_s=50, streams=2, request_latency_s=0.1, compute_mb_s=1000, fixed_s=0.5)

    seconds = model.duration_s(read_mb=1000, write_mb=100, requests=21)

    assert seconds == pytest.approx(0.5 + 21 * 0.1 / 2 + 1100 / 100 + 1000 / 1000)


def test_predicted_vgg16_shard_duration_and_round_latency() -> None:
    shape = shape_for("sharded", 20, 4)

    durations = predict_durations(shape, VGG16_MB)
    latency = round_latency_s(shape, durations, PAPER_LATENCY)

    # 20 shard objects of 128.08 MB in, one out: 21 requests, 2689.7 MB at 48 MB/s, 2561.6 MB reduced at 4800 MB/s
    expected = 21 * 0.09 + 21 * VGG16_MB / 4 / 48 + 20 * VGG16_MB / 4 / 4800
    assert durations == pytest.approx((expected,) * 4)
    assert latency == pytest.approx(expected + 0.06)


def test_tree_latency_adds_the_slowest_function_of_each_stage() -> None:
    shape = shape_for("lambda-fl", 20)

    latency = round_latency_s(shape, [1.0, 4.0, 2.0, 3.0, 5.0])

    assert latency == 9.0


def report(name: str, moved_mb: float, seconds: float, wall_s: float) -> InvocationReport:
    return InvocationReport(invocation=name, function="shard_reduce", ok=True, duration_s=seconds, wall_s=wall_s,
                            bytes_read=int(moved_mb * MB), peak_rss_bytes=50 * MB)


def test_calibration_fits_throughput_fixed_time_and_overhead_from_reports() -> None:
    reports = [report(f"r{i}", mb, 0.5 + mb / 200, 0.5 + mb / 200 + 0.02 * i) for i, mb in enumerate((100, 300, 700))]

    model = calibrate(reports)

    assert model.stream_mb_s == pytest.approx(200)
    assert model.fixed_s == pytest.approx(0.5)
    assert model.invocation_overhead_s == pytest.approx(0.02)
    assert (model.request_latency_s, model.compute_mb_s) == (0.0, None)


def test_calibration_with_one_transfer_size_goes_through_the_origin() -> None:
    reports = [report("a", 100, 2.0, 2.0), report("b", 100, 3.0, 3.0)]

    model = calibrate(reports)

    assert (model.stream_mb_s, model.fixed_s) == (pytest.approx(40.0), 0.0)


def test_analytic_model_predicts_the_published_costs_within_12_percent() -> None:
    cases = [("resnet18", "sharded", RESNET18_MB, 4), ("resnet18", "lambda-fl", RESNET18_MB, 4),
             ("resnet18", "lifl", RESNET18_MB, 4), ("vgg16", "sharded", VGG16_MB, 4),
             ("vgg16", "lambda-fl", VGG16_MB, 4), ("vgg16", "lifl", VGG16_MB, 4),
             ("gpt2_large", "sharded", GPT2_LARGE_MB, 4),
             ("synthetic_5gb", "sharded", SYNTHETIC_5GB_MB, 8)]

    predicted = {(m, a): predict_cost(shape_for(a, 20, s), size).per_1000_rounds.total for m, a, size, s in cases}

    ratios = {k: round(v / PUBLISHED[k], 2) for k, v in predicted.items()}
    assert ratios == {("resnet18", "sharded"): 0.99, ("resnet18", "lambda-fl"): 1.08,
                      ("resnet18", "lifl"): 1.07, ("vgg16", "sharded"): 0.96, ("vgg16", "lambda-fl"): 1.0,
                      ("vgg16", "lifl"): 1.12, ("gpt2_large", "sharded"): 0.97,
                      ("synthetic_5gb", "sharded"): 1.04}


# --- the published costs, recomputed from the per-run data --------------------------------------------------------

@pytest.mark.parametrize(("model", "arch", "ours"), [
    ("resnet18", "sharded", 0.694556), ("resnet18", "lambda-fl", 0.377213), ("resnet18", "lifl", 0.522901),
    ("vgg16", "sharded", 3.815090), ("vgg16", "lambda-fl", 10.275459), ("vgg16", "lifl", 13.027288),
    ("gpt2_large", "sharded", 59.285435), ("synthetic_5gb", "sharded", 85.664241),
])
def test_published_per_1000_round_costs_are_recomputed_within_a_cent(model: str, arch: str, ours: float) -> None:
    recomputed = per_1000_rounds(model, arch)

    assert recomputed.total == pytest.approx(ours, abs=1e-6)
    assert abs(recomputed.total - PUBLISHED[(model, arch)]) <= 0.01


def test_vgg16_grads_sharding_is_2_7_times_cheaper_than_lambda_fl() -> None:
    gs, lambda_fl = per_1000_rounds("vgg16", "sharded"), per_1000_rounds("vgg16", "lambda-fl")

    assert round(lambda_fl.total / gs.total, 1) == 2.7
    assert round(per_1000_rounds("resnet18", "sharded").total / per_1000_rounds("resnet18", "lambda-fl").total,
                 2) == 1.84


def test_the_published_figures_average_the_warm_runs_only() -> None:
    # with the cold first run included, λ-FL ResNet-18 and VGG-16 GradsSharding no longer round to the figures
    with_cold = {k: per_1000_rounds(*k, warm_only=False).total for k in
                 [("resnet18", "lambda-fl"), ("vgg16", "sharded"), ("vgg16", "lambda-fl")]}

    assert {k: round(v, 2) for k, v in with_cold.items()} == {
        ("resnet18", "lambda-fl"): 0.39, ("vgg16", "sharded"): 3.80, ("vgg16", "lambda-fl"): 10.25}


def test_embedded_runs_match_the_reference_files() -> None:
    if not REFERENCE.is_dir():
        pytest.skip(f"reference data not at {REFERENCE}")
    names = {"sharded": "grads_sharding", "lambda-fl": "lambda_fl", "lifl": "lifl"}

    for (model, arch), paper in PAPER_RUNS.items():
        data = json.loads((REFERENCE / f"rq3_{model}.json").read_text())[model][names[arch]]
        runs = tuple((r["cold_start"], tuple(durations_of(r))) for r in data["all_runs"])

        assert (paper.memory_mb, paper.runs) == (data["memory_mb"], runs)


def durations_of(run: dict[str, Any]) -> list[float]:
    if "shard_durations_s" in run:
        return list(run["shard_durations_s"])
    if "leaf_durations_s" in run:
        return [*run["leaf_durations_s"], run["root_duration_s"]]
    return [*run["l1_durations_s"], *run["l2_durations_s"], run["root_duration_s"]]


def test_ranged_layout_shrinks_the_small_model_penalty() -> None:
    paper = PAPER_RUNS[("resnet18", "sharded")]
    warm = [d for cold, d in paper.runs if not cold]
    shape = shape_for("sharded", 20, 4)
    lambda_fl = per_1000_rounds("resnet18", "lambda-fl").total

    def at(layout: Any, header_gets: int) -> float:
        options = CostOptions(layout=layout, header_gets=header_gets)
        return CostBreakdown.mean([round_cost(shape, paper.memory_mb, d, options).per_round for d in warm]).total * 1000

    penalties = [round(at(layout, h) - lambda_fl, 4) for layout, h in (("paper", 2), ("ranged", 2), ("ranged", 0))]

    assert penalties == [0.3173, 0.0723, 0.0083]  # 1.84×, 1.19×, 1.02× λ-FL's cost


# --- a local run, priced ------------------------------------------------------------------------------------------

def test_cost_of_local_run_prices_measured_and_predicted_side_by_side() -> None:
    plan = sharded_plan(fake_manifest(20), "0" * 64, OUTPUT, ReduceOptions(), 4)
    reports = [InvocationReport(invocation=inv.id, function=inv.function, ok=True, duration_s=2.0,
                                peak_rss_bytes=60 * MB) for inv in plan.invocations]

    priced = cost_of_local_run(plan, reports, 20, int(VGG16_MB * MB))

    assert priced.measured.memory_mb == 60
    assert priced.measured.per_round.compute == pytest.approx(4 * 2.0 * 128 / 1024 * 0.0000166667)
    assert priced.predicted.memory_mb == 835
    assert priced.predicted.per_1000_rounds.total == pytest.approx(
        predict_cost(shape_for("sharded", 20, 4), VGG16_MB).per_1000_rounds.total, rel=1e-4)


def test_cost_of_local_run_needs_every_invocation_reported() -> None:
    plan = sharded_plan(fake_manifest(3), "0" * 64, OUTPUT, ReduceOptions(), 2)
    reports = [InvocationReport(invocation="shard-0000", function="shard_reduce", ok=True, peak_rss_bytes=MB)]

    with pytest.raises(PlanError, match=r"no successful report for invocations \['shard-0001'\]"):
        cost_of_local_run(plan, reports, 3, 40_000)


def test_durations_must_match_the_functions_of_the_shape() -> None:
    shape = RoundShape("flat", 2, (Aggregator("flat", 0, 1.0, 2),))

    with pytest.raises(PlanError, match="has 1 functions, got 2 durations"):
        round_cost(shape, 512, [1.0, 2.0])


# --- the command --------------------------------------------------------------------------------------------------

def test_cost_command_exact_form_prints_one_json_object() -> None:
    args = ["cost", "--arch", "sharded", "--clients", "20", "--shards", "4", "--memory-mb", "3008",
            "--durations", "57.3,57.3,57.3,57.3", "--layout", "paper", "--json"]

    result = CliRunner().invoke(cli(), args)

    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    compute = 4 * 57.3 * 3008 / 1024 * 0.0000166667
    assert data["per_1000_rounds"]["total"] == pytest.approx(1000 * (compute + 84 * 0.005e-3 + 160 * 0.0004e-3))
    assert (data["requests"]["puts"], data["requests"]["gets"]) == (84, 160)
    assert data["per_1000_rounds"]["requests"] == 0.0


@pytest.mark.parametrize(("arch", "layout", "durations", "total"), [
    ("lambda-fl", "paper", "70,72,67,59,37", 1000 * (305 * 1987 / 1024 * 0.0000166667 + 25 * 5e-6 + 44 * 4e-7)),
    ("lifl", "ranged", ",".join(["10"] * 11), 1000 * (110 * 1987 / 1024 * 0.0000166667 + 31 * 5e-6 + 50 * 4e-7)),
    ("flat", "paper", "100", 1000 * (100 * 1987 / 1024 * 0.0000166667 + 21 * 5e-6 + 40 * 4e-7)),
])
def test_cost_command_prices_trees_and_flat(arch: str, layout: str, durations: str, total: float) -> None:
    args = ["cost", "--arch", arch, "--clients", "20", "--memory-mb", "1987", "--durations", durations, "--layout",
            layout, "--json"]

    result = CliRunner().invoke(cli(), args)

    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["per_1000_rounds"]["total"] == pytest.approx(total)


def test_cost_command_counts_request_fees_on_request() -> None:
    args = ["cost", "--arch", "lifl", "--clients", "20", "--memory-mb", "1024", "--durations", ",".join(["1"] * 11),
            "--count-request-fees", "--json"]

    result = CliRunner().invoke(cli(), args)

    assert json.loads(result.output)["per_round"]["requests"] == pytest.approx(11 * 0.20 / 1e6)


def test_cost_command_rejects_a_wrong_number_of_durations() -> None:
    args = ["cost", "--arch", "lambda-fl", "--clients", "20", "--memory-mb", "1987", "--durations", "1,2,3"]

    result = CliRunner().invoke(cli(), args)

    assert isinstance(result.exception, PlanError)
    assert "lambda-fl with N = 20, M = 1 has 5 functions, got 3 durations" in str(result.exception)


def test_cost_command_prices_a_local_runs_reports(tmp_path: Path) -> None:
    store = MemoryStore()
    make_round(store, 0, synthetic(50_000, tensor_elems=10_000), 3, seed=1)
    result = aggregate_round(store, 0, InlineExecutor(), AggregateConfig(shards=2))
    stored = tmp_path / "stored.json"  # rounds/<r>/reports.json: summary, plan, reports
    stored.write_bytes(store.get("rounds/000000/reports.json"))
    written = tmp_path / "written.json"  # what `gradshard aggregate --reports` writes: summary and reports
    written.write_text(json.dumps({"summary": result.summary(), "reports": [
        r.model_copy(update={"peak_rss_bytes": 70 * MB}).model_dump(mode="json") for r in result.reports]}))

    from_plan = CliRunner().invoke(cli(), ["cost", "--reports", str(stored), "--memory-mb", "256", "--json"])
    measured = CliRunner().invoke(cli(), ["cost", "--reports", str(written), "--layout", "ranged", "--json"])

    assert from_plan.exit_code == 0 and measured.exit_code == 0, from_plan.output + measured.output
    plan_cost, measured_cost = json.loads(from_plan.output), json.loads(measured.output)
    seconds = sum(r.duration_s for r in result.reports)
    assert (plan_cost["arch"], plan_cost["clients"], plan_cost["shards"]) == ("sharded", 3, 2)
    assert plan_cost["per_round"]["compute"] == pytest.approx(
        sum(AWS_LAMBDA_X86.compute_cost(256, r.duration_s) for r in result.reports))
    assert measured_cost["memory_mb"] == 70
    assert measured_cost["billed_memory_mb"] == 128
    assert measured_cost["requests"]["gets"] == 3 * 2 * 3 + 3
    assert math.isclose(sum(measured_cost["durations_s"]), seconds)


def test_cost_command_needs_one_source_of_durations() -> None:
    result = CliRunner().invoke(cli(), ["cost", "--clients", "20", "--memory-mb", "512"])

    assert result.exit_code == 2
    assert "give exactly one of --durations, --reports and --model-mb" in result.output


def test_cost_command_predicts_from_the_model_size() -> None:
    args = ["cost", "--arch", "sharded", "--clients", "20", "--model-mb", str(VGG16_MB), "--json"]

    result = CliRunner().invoke(cli(), args)

    data = json.loads(result.output)
    assert data["memory_mb"] == 835
    assert data["per_1000_rounds"]["total"] == pytest.approx(
        predict_cost(shape_for("sharded", 20, 4), VGG16_MB).per_1000_rounds.total)


PAPER_RUNS: dict[tuple[str, str], PaperRuns] = {
    ("resnet18", "sharded"): PaperRuns(472, 4, (
        (True, (7.190176511999994, 10.179430229000019, 8.32159271399999, 8.44306340099996)),
        (False, (5.564541306999985, 7.324420156000002, 5.734924433000003, 7.136943330000008)),
        (False, (7.768061407000005, 6.434381255000005, 5.30157885700001, 5.19736949899999)),
        (False, (8.595543728999985, 9.017827865000015, 7.702360406999986, 8.85771767)),
        (False, (7.325548845000014, 6.94719113299999, 5.995601668999996, 5.810993443000001)),
        (False, (5.749095023999985, 7.6809320309999976, 5.967664299000006, 5.830845428999993)),
        (False, (8.541964836999995, 9.348964538999951, 7.83534358, 8.46303250599999)),
        (False, (6.044530742999996, 5.589843209999998, 7.7267316730000175, 6.084862129999976)),
        (False, (6.61649005999999, 5.688799673999995, 5.475915888999992, 5.89095949099999)),
    )),
    ("resnet18", "lambda-fl"): PaperRuns(536, 1, (
        (True, (7.405465720999985, 6.832375407000001, 11.176847941999995, 7.645039389000004, 4.1749120880000135)),
        (False, (5.042267045000017, 5.452031204000008, 5.412109416999982, 5.695655738999989, 4.184425571999981)),
        (False, (5.135140669999998, 4.946510357999983, 4.652872508999991, 5.4576789669999926, 4.150439436999989)),
        (False, (6.816947991999996, 6.156823629000002, 7.514449383999988, 6.976275017000006, 4.1434202089999985)),
        (False, (5.984003635000022, 5.6765887320000274, 5.5213339900000165, 5.2640330339999934, 4.387495236000007)),
        (False, (5.297717747000036, 4.902778279000017, 4.961623464000013, 5.345839512000026, 4.1843624549999845)),
        (False, (7.138364936000016, 6.658297301000005, 5.657737338000004, 7.3835581440000055, 4.12870101499999)),
        (False, (5.632811542000013, 5.369942341000012, 5.375496922999957, 5.60570835599998, 4.285412054000005)),
        (False, (4.88237559800001, 4.859383564999973, 4.937997500999984, 5.511499919000016, 4.433869190999985)),
    )),
    ("resnet18", "lifl"): PaperRuns(536, 1, (
        (True, (3.5895892229999617, 3.9695332960000087, 3.919391169999983, 3.513968566000017, 3.8230679490000057,
                4.258559734000016, 3.271298160000015, 3.336024239999972, 3.419552115999977, 1.8531378560000462,
                3.3241926960000114)),
        (False, (4.38225903, 3.5281948410000155, 3.86130375099998, 3.600232363000032, 3.4130279990000076,
                3.412473843999976, 3.320294800000056, 3.304481074000023, 3.3439173599999776, 2.1747195709999687,
                3.483382471000027)),
        (False, (3.6867551249999906, 3.7302366650000067, 3.72351708299999, 3.7518324110000094, 3.927245613000025,
                3.8985034279999695, 3.164836744000013, 3.4344089800000006, 3.4787754799999675, 1.9053584540000088,
                3.359292731000039)),
        (False, (3.8362175139999977, 6.228959663000012, 4.030178998999986, 3.694072472000016, 4.1616098370000145,
                4.250182268000003, 2.981941570999993, 3.4766817220000235, 4.2779897400000095, 3.176642152999989,
                3.291187223999998)),
        (False, (3.64960308000002, 3.5930845980000186, 3.6079135140000176, 3.6780987500000037, 3.5925208019999673,
                3.774333465999973, 3.101815127000009, 3.764654622000023, 3.6827686559999506, 1.883713701999966,
                3.50100261700004)),
        (False, (3.6301920029999906, 3.7076574740000297, 3.7114775999999665, 3.329950182999994, 4.394305456999973,
                3.477108312999974, 2.723517592999997, 4.376047038000024, 3.4185460819999776, 1.9207302490000302,
                3.6636038120000194)),
        (False, (4.334369955, 4.068865126999981, 3.800041374999978, 4.121669729000018, 3.9064777220000337,
                3.6765423800000008, 4.532742905000077, 3.689062799999988, 3.365089562000037, 2.535610401999975,
                3.3991133699999523)),
        (False, (4.596012655000095, 3.518988161999971, 4.192406077000044, 3.7929953679999926, 4.054576875999999,
                4.5742381129999785, 3.334074691000012, 3.2993515129999764, 4.864722033000021, 1.9941184670000212,
                4.488313078000033)),
        (False, (3.6614939560000153, 3.8564327070000104, 3.7319912880000174, 4.335536084000012, 3.8885014970000498,
                3.5877671860000078, 2.9714440649999574, 3.7418744930000116, 3.550634209000009, 1.9045254330000034,
                4.1412709040000095)),
    )),
    ("vgg16", "sharded"): PaperRuns(835, 4, (
        (True, (61.81612291500001, 57.558575874999995, 57.692864485, 60.088817056)),
        (False, (60.87949488400001, 53.205502662, 58.565386964, 62.454491457)),
        (False, (51.748184537000014, 57.087447962, 55.68816602000001, 54.58318652300002)),
        (False, (61.89123295500002, 63.570604796000026, 56.022220755000006, 56.43996449400001)),
        (False, (62.685606586000006, 70.29945458899999, 66.52802522399998, 64.15588881899998)),
        (False, (70.90678520799997, 55.34060403799998, 54.40139674200003, 68.00724427900002)),
        (False, (69.91905360499999, 57.89937226699999, 54.56862315799998, 72.75580863800008)),
        (False, (70.288746468, 53.289796056, 60.49549239399994, 58.09046008499996)),
        (False, (65.07776735000004, 70.136648218, 61.28268106799999, 62.54988842)),
    )),
    ("vgg16", "lambda-fl"): PaperRuns(1987, 1, (
        (True, (70.832753677, 72.50976069700002, 67.529631018, 59.326675932, 37.035451795)),
        (False, (72.99004966800004, 67.66083970000003, 71.964644596, 62.499335108, 35.313590161000036)),
        (False, (64.87471215299996, 74.600513949, 57.90992967200003, 60.230933616000016, 40.40585327399998)),
        (False, (77.17148182999995, 82.278328552, 56.478742710000006, 77.17623811099998, 51.78900461100005)),
        (False, (83.69475443700003, 75.79712321500006, 67.80517596499999, 74.00356190499997, 32.72929271500004)),
        (False, (61.87413900199999, 57.82255108300001, 93.90736402699997, 60.12797832800004, 38.62384060599993)),
        (False, (65.33383298399997, 61.10044304400003, 63.76094466900008, 72.41897327599997, 35.26235895299999)),
        (False, (60.950296502000015, 66.697978347, 70.27319581300003, 70.16884191199995, 32.55118021100009)),
        (False, (69.25055905600016, 64.55228681400001, 60.705416111999966, 61.92921136299992, 51.83438204799995)),
    )),
    ("vgg16", "lifl"): PaperRuns(1987, 1, (
        (True, (40.415220674, 49.165882661, 49.428591968000006, 41.010618410000006, 35.17649659200001, 42.957075981,
                28.302120426999977, 40.13497672700001, 28.336947003999995, 11.773858134000022, 25.314440765)),
        (False, (36.513660875, 43.21408197200003, 65.22733092599998, 46.111747709999975, 33.80347453500002,
                38.73070795999996, 28.182204884999976, 28.788122293000015, 24.817401090999965, 26.476219745999998,
                26.410533966000003)),
        (False, (33.718668561000015, 45.54499011900003, 43.574123240000006, 37.05395063699996, 28.717193576,
                33.978558874999976, 25.414815718, 26.350995361999992, 26.403785483999968, 12.471404533999987,
                26.83533717199998)),
        (False, (46.56176439500001, 46.69993983400002, 43.30228704900003, 36.02662515899999, 40.667750505000015,
                37.986997650000035, 39.69664260299993, 29.127898394, 25.55601733499998, 19.122656938999967,
                43.297707180999964)),
        (False, (37.80639963700003, 34.72598285799995, 42.33822023799996, 43.50026405799997, 34.76274663200002,
                43.01028927999994, 42.30173634899995, 26.04283722499997, 35.96381704300006, 18.495406627999955,
                29.58373222800003)),
        (False, (37.819403557999976, 36.91436538900007, 39.75057683600005, 36.655727560999935, 38.023507515999995,
                29.088604845000077, 35.58147592, 62.88906375600004, 25.544579086, 15.426078453999935,
                30.75488111800007)),
        (False, (54.65432795600009, 37.733806830999924, 44.059578147000025, 40.624098120999975, 41.794895656999984,
                46.929704372999936, 26.714835575000052, 38.30528157599997, 49.83751037900004, 18.077756276999935,
                68.45744666199994)),
        (False, (37.24925738799993, 68.09146687099997, 31.699094097999932, 44.532549605999975, 72.97031962200003,
                38.41376520699998, 25.229325235000033, 33.60370962999991, 62.9074140780001, 11.712313344999984,
                26.456741684000008)),
        (False, (35.835424930000045, 33.235274108999874, 30.589493631999858, 35.99203374700005, 35.997596654999825,
                40.28512872700003, 29.664573020000034, 26.020679035000057, 29.31237608399988, 13.04500238300011,
                25.79649857200002)),
    )),
    ("gpt2_large", "sharded"): PaperRuns(2665, 4, (
        (True, (334.54493055800003, 316.874119153, 311.831565847, 364.815434342)),
        (False, (352.637559498, 302.0101604, 331.24856805, 335.82668217300005)),
        (False, (292.080053045, 312.0440778469999, 331.95926117199997, 341.6631639689999)),
        (False, (352.3071002910001, 342.15245630000004, 420.25190070400004, 367.24083361199996)),
        (False, (338.7067191909998, 372.2763115759999, 343.03024493600014, 331.051877911)),
        (False, (333.2016137139999, 333.9804460789999, 358.05985093000004, 358.5447256139996)),
        (False, (325.9299637099998, 341.3691434090001, 340.1251342400001, 326.00256974900003)),
        (False, (381.2169769379998, 320.268615423, 352.9132210710004, 304.3532548889998)),
        (False, (331.40220045499973, 322.224719755, 328.16337927999984, 320.7772775350004)),
    )),
    ("synthetic_5gb", "sharded"): PaperRuns(2370, 8, (
        (True, (278.1890020750001, 286.46324893999997, 275.327090927, 282.6252263260001, 274.74887802,
                252.47920660500006, 325.789610958, 294.192800553)),
        (False, (269.06504395, 288.137344832, 297.4623307579999, 270.69355612400005, 291.167132562, 252.9628815960001,
                267.998811357, 252.45789131199996)),
        (False, (254.95795424100004, 288.68045339900004, 256.81674684099994, 263.251651755, 233.3186507580001,
                260.521459349, 228.80220705299996, 248.83161626499998)),
        (False, (271.66058476499984, 281.63150785799996, 239.21100467299993, 286.65748081800007, 259.3003981400001,
                251.14270342999998, 277.77472004100014, 264.81474476099993)),
        (False, (241.98125629499987, 238.44513433999987, 262.86541931600004, 274.5719866119998, 274.2594136,
                290.99688683500017, 273.31370388999994, 248.62206289000005)),
        (False, (257.53479416899995, 263.383269336, 304.38989972800005, 283.40889379300006, 292.52000400400016,
                293.3711164059998, 302.45251252799994, 288.4697379070001)),
        (False, (301.42742962400007, 308.8945413189999, 270.9481517039999, 300.15401623799994, 296.4673610099999,
                288.6708358709998, 272.8902167829999, 273.3272540840003)),
        (False, (315.03061824500037, 300.66482640000004, 286.9867897089998, 262.81427407699994, 287.0867934170001,
                257.63835505, 282.0882775270002, 268.6226429110002)),
        (False, (302.0944662750003, 271.64010495799994, 277.5057537590001, 258.16888480199987, 302.8635481469996,
                272.5832969359999, 285.57982139700016, 273.2377853119997)),
    )),
}
