"""``gradshard aggregate``, ``gradshard inspect`` and ``gradshard compare``: one round's aggregation."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from pydantic import ValidationError
from rich.progress import TaskID

from gradshard.aggregation.driver import AggregateConfig
from gradshard.cli.common import (
    HELP_OPTIONS,
    SCOPED_TOKENS_HELP,
    SHARDS,
    ExitCode,
    console,
    make_executor,
    open_cli_store,
    progress_bar,
    run_aggregate,
    write_atomic,
    write_json,
)
from gradshard.cli.console import compare_table, reports_table, untrusted
from gradshard.cli.plots import compare_png
from gradshard.cost.model import CostOptions, LocalRunCost, cost_of_local_run
from gradshard.errors import PlanError
from gradshard.extras import require_extra
from gradshard.format.layouts import load_layout
from gradshard.format.update import inspect_update
from gradshard.privacy.config import CentralDPRound
from gradshard.store import LocalStore
from gradshard.topology.names import TOPOLOGIES
from gradshard.units import MIB

if TYPE_CHECKING:
    from gradshard.aggregation.compare import CompareEvent


def _aggregate_options(f: Any) -> Any:
    options = [
        click.option("--topology", type=click.Choice(list(TOPOLOGIES)), default="sharded", show_default=True,
                     help="sharded (GradsSharding), flat (one aggregator), lambda-fl (tree), lifl (hierarchical)."),
        click.option("--group-size", type=click.IntRange(min=1), default=None,
                     help="λ-FL clients per leaf (default ⌈√N⌉)."),
        click.option("--branching", type=click.IntRange(min=2), default=None,
                     help="LIFL branching (default max(2, ⌈N^(1/3)⌉))."),
        click.option("--nodes", type=click.IntRange(min=1), default=2, show_default=True,
                     help="LIFL nodes to place aggregators on."),
        click.option("--warm/--cold", default=False, show_default=True,
                     help="Keep workers of aggregators with a warm key (LIFL) alive across rounds."),
        click.option("--shards", "-M", type=SHARDS, default="auto", show_default=True,
                     help="Number of shard functions M; auto: one per worker."),
        click.option("--memory-mb", type=click.FloatRange(min=1), default=None,
                     help="Memory cap of every function, MiB (measured resident set; exceeding it fails)."),
        click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
                     help="Invocations running at once."),
        click.option("--window-kb", type=click.IntRange(min=1), default=512, show_default=True,
                     help="Elements each shard function holds per client at a time, in KiB of input."),
        click.option("--accumulate", type=click.Choice(["float32", "float64"]), default="float32",
                     show_default=True),
        click.option("--weighting", type=click.Choice(["examples", "uniform"]), default="examples",
                     show_default=True),
        click.option("--reducer", default="mean", show_default=True,
                     help="mean (weighted FedAvg), coverage-mean (clients that trained part of the model), median, "
                          "trimmed-mean:<beta> (coordinate-wise, unweighted), krum:<f>, multi-krum:<f>,<k> or "
                          "bulyan:<f> (exact pairwise distances first), fltrust (against the round's root update) "
                          "or secagg:<bits> (masked updates); sharded or flat topology."),
        click.option("--policy", type=click.Choice(["skip", "fail"]), default="skip", show_default=True,
                     help="On a bad update: continue without it, or fail the round."),
        click.option("--require-signatures", is_flag=True,
                     help="Every update must be signed by a key registered for its client in the store and not "
                          "revoked (gradshard keys); the round's digest must be blake3 or sha256."),
        click.option("--retries", type=click.IntRange(min=0), default=2, show_default=True),
        click.option("--timeout", type=click.FloatRange(min=0.1), default=900.0, show_default=True,
                     help="Per-invocation timeout, seconds."),
        click.option("--parallel-reads", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Clients a shard function reads at once, one window buffer each (use 4-8 on S3)."),
        click.option("--executor", "executor_kind", type=click.Choice(["local", "inline", "ray", "lambda"]),
                     default="local", show_default=True,
                     help="local: one capped process per invocation; inline: in this process; ray: Ray tasks "
                          "(capped the same way); lambda: a deployed AWS Lambda function (gradshard deploy aws)."),
        click.option("--ray-address", default=None, help="Ray cluster to join (e.g. auto, ray://head:10001) "
                     "[default: a local Ray]."),
        click.option("--lambda-function", default=None, help="Name or ARN of the Lambda function (--executor lambda)."),
        click.option("--region", default=None, help="AWS region of the Lambda function [default: AWS environment]."),
        click.option("--scoped-tokens/--no-scoped-tokens", default=True, show_default=True, help=SCOPED_TOKENS_HELP),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _central_dp_options(f: Any) -> Any:
    options = [
        click.option("--dp-clip", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Central DP: clip every update to this L2 norm, then add Gaussian noise (needs --weighting "
                          "uniform)."),
        click.option("--dp-noise-multiplier", type=click.FloatRange(min=0), default=None,
                     help="Central DP: noise std / sensitivity (σ = z · clip / expected clients); 0 clips only."),
        click.option("--dp-sampler", type=click.Choice(["none", "poisson", "fixed"]), default="none",
                     show_default=True, help="How this round's clients were sampled (the accountant's amplification)."),
        click.option("--dp-population", type=click.IntRange(min=1), default=None,
                     help="Clients the round was sampled from (poisson, fixed)."),
        click.option("--dp-expected-clients", type=click.IntRange(min=1), default=None,
                     help="The mean's denominator: the expected cohort [default: the clients accepted]."),
        click.option("--dp-sample-rate", type=click.FloatRange(min=0, max=1, min_open=True), default=None,
                     help="Poisson sampling probability [default: expected clients / population]."),
        click.option("--dp-delta", type=click.FloatRange(min=0, max=1, min_open=True, max_open=True), default=1e-5,
                     show_default=True),
        click.option("--dp-max-epsilon", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Refuse a release that takes the store's ledger past this ε (exit code 5)."),
        click.option("--dp-key-file", type=click.Path(dir_okay=False), default=None,
                     help="Secret noise key (32 bytes, mode 0600; created if missing) [default: fresh per run]."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _central_dp(kw: dict[str, Any]) -> CentralDPRound | None:
    if kw.get("dp_clip") is None:
        if kw.get("dp_noise_multiplier") is not None:
            raise click.UsageError("--dp-noise-multiplier needs --dp-clip (the sensitivity the noise is scaled to)")
        return None
    if kw.get("dp_noise_multiplier") is None:
        raise click.UsageError("--dp-clip needs --dp-noise-multiplier (0 to clip without noise)")
    try:
        return CentralDPRound(clip=kw["dp_clip"], noise_multiplier=kw["dp_noise_multiplier"],
                              sampler=kw["dp_sampler"], population=kw["dp_population"],
                              expected_clients=kw["dp_expected_clients"], sample_rate=kw["dp_sample_rate"],
                              delta=kw["dp_delta"], max_epsilon=kw["dp_max_epsilon"], key_file=kw["dp_key_file"] or "")
    except ValidationError as exc:
        raise click.UsageError("; ".join(f"--dp-{'-'.join(map(str, e['loc'])).replace('_', '-') or 'sampler'}: "
                                         f"{str(e['msg']).removeprefix('Value error, ')}"
                                         for e in exc.errors())) from None


def _config(kw: dict[str, Any]) -> AggregateConfig:
    try:
        return AggregateConfig(topology=kw["topology"], shards=kw["shards"], window_bytes=kw["window_kb"] * 1024,
                               parallel_reads=kw["parallel_reads"], accumulate=kw["accumulate"],
                               weighting=kw["weighting"], policy=kw["policy"], reducer=kw["reducer"],
                               group_size=kw["group_size"], branching=kw["branching"], nodes=kw["nodes"],
                               central_dp=_central_dp(kw), require_signatures=kw["require_signatures"])
    except ValidationError as exc:
        raise click.UsageError("; ".join((f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: " if e["loc"] else "")
                                         + str(e["msg"]).removeprefix("Value error, ")
                                         for e in exc.errors())) from None


@click.command(context_settings=HELP_OPTIONS)
@click.option("--store", "store_dir", required=True,
              help="Store holding rounds/<r>/...: a local directory or s3://bucket/prefix (endpoint and credentials "
                   "from the AWS environment: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).")
@click.option("--round", "round_", type=click.IntRange(min=0), required=True)
@click.option("--reports", type=click.Path(dir_okay=False), default=None,
              help="Also write the reports as JSON here (they are always stored in rounds/<r>/reports.json).")
@_aggregate_options
@_central_dp_options
def aggregate(store_dir: str, round_: int, reports: str | None, **kw: Any) -> None:
    """Aggregate one round of client updates and print what every function did."""
    store = open_cli_store(store_dir, must_exist=True)
    executor = make_executor(kw["executor_kind"], kw["workers"], kw["memory_mb"], kw["retries"], kw["timeout"],
                         kw["warm"], kw["ray_address"], kw["lambda_function"], kw["region"],
                         scoped_tokens=kw["scoped_tokens"])
    try:
        result = run_aggregate(store, round_, executor, _config(kw), f"aggregating round {round_}")
    finally:
        executor.close()
    summary = result.summary()
    try:
        cloud: LocalRunCost | None = cost_of_local_run(result.plan, result.reports, len(result.manifest.clients),
                                                       result.manifest.spec.model_layout().nbytes,
                                                       CostOptions(layout="ranged"))
    except PlanError as exc:  # e.g. the inline executor measures no peak memory
        cloud, no_cost = None, str(exc)
    earlier = [r for r in result.all_reports if all(r is not final for final in result.reports)]
    if reports:  # before anything is printed: the aggregate is published, its reports must not be lost
        write_json(Path(reports), {"summary": summary, "cloud_cost": cloud.to_dict() if cloud else None,
                                    "reports": [r.model_dump(mode="json") for r in result.reports],
                                    "earlier_reports": [r.model_dump(mode="json") for r in earlier]})
    if earlier:  # a phase 1 (norms, distances, trust products) or runs that found bad updates
        console.print(reports_table(earlier, f"round {round_}: phase 1 and earlier runs"))
    console.print(reports_table(result.reports, f"round {round_}: {result.plan.topology}"))
    for entry in result.manifest.clients:
        if entry.signer is not None:
            console.print(f"[green]signed[/] {untrusted(entry.client)}: key {untrusted(entry.signer[:12])}")
    for client, reason in result.manifest.rejected.items():
        console.print(f"[yellow]rejected[/] {untrusted(client)}: {untrusted(reason)}")
    if result.manifest.privacy is not None:
        p = result.manifest.privacy
        console.print(f"central DP: {p['clipped']} of {summary['clients']} updates clipped to {p['clip']}, noise "
                      f"σ = {float(p['sigma']):.4g}; the store's ledger is at ε = {float(p['epsilon']):.4g} "
                      f"(δ = {p['delta']})")
    console.print(f"published [bold]{untrusted(result.output_key)}[/] from {summary['clients']} clients in "
                  f"{summary['wall_s']:.2f} s")
    if cloud is None:
        console.print(f"no cloud cost: {untrusted(no_cost)}")
        return
    if earlier:
        console.print(f"(the cloud cost below prices the final plan only; {len(earlier)} earlier invocations "
                      "are not in it)")
    console.print(f"on AWS Lambda + S3 ({untrusted(cloud.predicted.options.prices.name)}, ranged layout): predicted "
                  f"${cloud.predicted.per_1000_rounds.total:,.3f} per 1000 rounds "
                  f"({cloud.predicted.latency_s:.1f} s a round); this run's own durations and peak billed at those "
                  f"prices: ${cloud.measured.per_1000_rounds.total:,.3f}")


@click.command(context_settings=HELP_OPTIONS)
@click.argument("path", type=click.Path(dir_okay=False, exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--layout", "layout_source", default=None,
              help="The model's or round's layout: a zoo name (resnet18, synthetic-<N>), a layout JSON file (or a "
                   "round.json), or a safetensors file written by gradshard. Needed for files the plain safetensors "
                   "library wrote [default: the file's own tensor order].")
def inspect(path: str, as_json: bool, layout_source: str | None) -> None:
    """Validate an update or aggregate file completely (header, metadata, every checksum, finite values)."""
    file = Path(path).resolve()
    layout = load_layout(layout_source) if layout_source is not None else None
    info = inspect_update(LocalStore(file.parent), file.name, layout)
    if as_json:
        click.echo(json.dumps(info))
    else:
        for name, value in info.items():
            console.print(f"[bold]{name}[/]: {untrusted(value)}")
        if info["non_finite_values"]:
            console.print(f"[red]{info['non_finite_values']} non-finite values[/]")
    if info["non_finite_values"]:
        sys.exit(ExitCode.NEGATIVE)


def _architectures(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    names = [a.strip() for a in value.split(",") if a.strip()]
    unknown = [a for a in names if a not in TOPOLOGIES]
    if unknown or not names:
        raise click.BadParameter(f"unknown {unknown}; choose from {','.join(TOPOLOGIES)}")
    return names


@click.command(context_settings=HELP_OPTIONS)
@click.option("--store", "store_dir", required=True,
              help="Store holding rounds/<r>/...: a local directory or s3://bucket/prefix.")
@click.option("--round", "round_", type=click.IntRange(min=0), required=True)
@click.option("--shards", "-M", type=click.IntRange(min=1), default=None,
              help="GradsSharding's M (default: the smallest that fits --memory-limit; 4 without a limit).")
@click.option("--memory-limit", "memory_limit_mb", type=click.FloatRange(min=1), default=None,
              help="Per-function memory limit, MiB (resident set, interpreter included); infeasible "
                   "architectures are not run.")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Invocations running at once.")
@click.option("--nodes", type=click.IntRange(min=1), default=2, show_default=True, help="LIFL nodes.")
@click.option("--architectures", default=",".join(TOPOLOGIES), show_default=True, callback=_architectures,
              help="Comma-separated architectures to compare.")
@click.option("--window-kb", type=click.IntRange(min=1), default=512, show_default=True,
              help="Elements each shard function holds per client at a time, in KiB of input.")
@click.option("--run-infeasible", is_flag=True,
              help="Run infeasible architectures anyway under the limit (they fail; the failure is reported).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Directory for compare.json, compare.csv and compare.png.")
def compare(store_dir: str, round_: int, shards: int | None, memory_limit_mb: float | None, workers: int,
            nodes: int, architectures: list[str], window_kb: int, run_infeasible: bool, out_dir: str) -> None:
    """Aggregate one round with each architecture; compare memory, time, traffic and agreement with flat."""
    require_extra("plots", "gradshard compare (for compare.png)")
    limit = None if memory_limit_mb is None else int(memory_limit_mb * MIB)
    with progress_bar() as progress:
        tasks: dict[str, TaskID] = {}

        from gradshard.aggregation.compare import compare_round  # only this command runs every topology

        def on_event(event: CompareEvent) -> None:
            if event.kind == "start":
                tasks[event.architecture] = progress.add_task(event.architecture, total=event.invocations)
            elif event.kind == "invocation":
                progress.advance(tasks[event.architecture])
            elif event.row is not None and event.row.status == "skipped":
                progress.console.print(f"{untrusted(event.architecture)}: not run ({untrusted(event.row.reason)})")

        store = open_cli_store(store_dir, must_exist=True)
        result = compare_round(store, round_, architectures=architectures, shards=shards, memory_limit_bytes=limit,
                               workers=workers, nodes=nodes, window_bytes=window_kb * 1024,
                               run_infeasible=run_infeasible, on_event=on_event)
    console.print(compare_table(result))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "compare.json", result.to_json().encode())
    write_atomic(out / "compare.csv", result.to_csv().encode())
    write_atomic(out / "compare.png", compare_png(result))
    console.print(f"wrote compare.json, compare.csv and compare.png to {untrusted(out)}")
    unexpected = [r.architecture for r in result.rows if r.feasible and r.status == "failed"]
    if unexpected:
        console.print(f"[red]failed although predicted feasible[/]: {', '.join(unexpected)}")
        sys.exit(ExitCode.NEGATIVE)
