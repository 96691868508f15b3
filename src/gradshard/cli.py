"""The ``gradshard`` command: a thin layer where every command is one library call."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from gradshard import __version__
from gradshard.aggregate import AggregateConfig, AggregateResult, aggregate_round
from gradshard.cli_cost import cost, plan
from gradshard.compare import ARCHITECTURES, CompareEvent, compare_round
from gradshard.console import compare_table, reports_table
from gradshard.cost import CostOptions, cost_of_local_run
from gradshard.errors import GradshardError
from gradshard.plots import compare_png
from gradshard.round import aggregate_key
from gradshard.runtime import Executor, InlineExecutor, LocalExecutor
from gradshard.store import LocalStore
from gradshard.synthetic import make_round
from gradshard.topology import TOPOLOGIES
from gradshard.update import inspect_update
from gradshard.zoo import LAYOUTS, get_layout

MIB = 1 << 20
console = Console(width=None if sys.stdout.isatty() else 150)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


def _executor(kind: str, workers: int, memory_mb: float | None, retries: int, timeout: float,
              warm: bool = False) -> Executor:
    if kind == "inline":
        return InlineExecutor(retries=retries)
    cap = None if memory_mb is None else int(memory_mb * MIB)
    return LocalExecutor(workers=workers, retries=retries, memory_cap_bytes=cap, timeout_s=timeout, warm=warm)


def _run_aggregate(store: LocalStore, r: int, executor: Executor, config: AggregateConfig,
                   label: str) -> AggregateResult:
    with _progress() as progress:
        task = progress.add_task(label, total=None)
        return aggregate_round(store, r, executor, config, on_done=lambda _: progress.advance(task))


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


@click.group()
@click.version_option(__version__)
@click.option("-v", "--verbose", is_flag=True, help="Log what happens (to stderr).")
def main(verbose: bool) -> None:
    """gradshard: federated aggregation sharded across memory-capped functions."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


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
        click.option("--shards", "-M", type=click.IntRange(min=1), default=4, show_default=True,
                     help="Number of shard functions M."),
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
        click.option("--policy", type=click.Choice(["skip", "fail"]), default="skip", show_default=True,
                     help="On a bad update: continue without it, or fail the round."),
        click.option("--retries", type=click.IntRange(min=0), default=2, show_default=True),
        click.option("--timeout", type=click.FloatRange(min=0.1), default=900.0, show_default=True,
                     help="Per-invocation timeout, seconds."),
        click.option("--executor", "executor_kind", type=click.Choice(["local", "inline"]), default="local",
                     show_default=True, help="local: one capped process per invocation; inline: in this process."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _config(kw: dict[str, Any]) -> AggregateConfig:
    return AggregateConfig(topology=kw["topology"], shards=kw["shards"], window_bytes=kw["window_kb"] * 1024,
                           accumulate=kw["accumulate"], weighting=kw["weighting"], policy=kw["policy"],
                           group_size=kw["group_size"], branching=kw["branching"], nodes=kw["nodes"])


@main.command()
@click.option("--store", "store_dir", type=click.Path(file_okay=False, exists=True), required=True,
              help="Local store directory holding rounds/<r>/...")
@click.option("--round", "round_", type=click.IntRange(min=0), required=True)
@click.option("--reports", type=click.Path(dir_okay=False), default=None,
              help="Also write the reports as JSON here (they are always stored in rounds/<r>/reports.json).")
@_aggregate_options
def aggregate(store_dir: str, round_: int, reports: str | None, **kw: Any) -> None:
    """Aggregate one round of client updates and print what every function did."""
    store = LocalStore(store_dir)
    executor = _executor(kw["executor_kind"], kw["workers"], kw["memory_mb"], kw["retries"], kw["timeout"],
                         kw["warm"])
    try:
        result = _run_aggregate(store, round_, executor, _config(kw), f"aggregating round {round_}")
    finally:
        if isinstance(executor, LocalExecutor):
            executor.close()
    console.print(reports_table(result.reports, f"round {round_}: {result.plan.topology}"))
    summary = result.summary()
    for client, reason in result.manifest.rejected.items():
        console.print(f"[yellow]rejected[/] {client}: {reason}")
    console.print(f"published [bold]{result.output_key}[/] from {summary['clients']} clients in "
                  f"{summary['wall_s']:.2f} s")
    cloud = cost_of_local_run(result.plan, result.reports, len(result.manifest.clients),
                              result.manifest.spec.model_layout().nbytes, CostOptions(layout="ranged"))
    console.print(f"on AWS Lambda + S3 ({cloud.predicted.options.prices.name}, ranged layout): predicted "
                  f"${cloud.predicted.per_1000_rounds.total:,.3f} per 1000 rounds "
                  f"({cloud.predicted.latency_s:.1f} s a round); this run's own durations and peak billed at those "
                  f"prices: ${cloud.measured.per_1000_rounds.total:,.3f}")
    if reports:
        _write_json(Path(reports), {"summary": summary, "cloud_cost": cloud.to_dict(),
                                    "reports": [r.model_dump(mode="json") for r in result.reports]})


@main.command()
@click.argument("path", type=click.Path(dir_okay=False, exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect(path: str, as_json: bool) -> None:
    """Validate an update or aggregate file completely (header, metadata, every checksum, finite values)."""
    file = Path(path).resolve()
    info = inspect_update(LocalStore(file.parent), file.name)
    if as_json:
        click.echo(json.dumps(info))
        return
    for name, value in info.items():
        console.print(f"[bold]{name}[/]: {value}")
    if info["non_finite_values"]:
        console.print(f"[red]{info['non_finite_values']} non-finite values[/]")
        sys.exit(1)


def _sha256(store: LocalStore, key: str) -> str:
    digest = hashlib.sha256()
    size = store.size(key)
    with store.open_reader(key) as reader:
        for offset in range(0, size, 64 * MIB):
            buf = bytearray(min(64 * MIB, size - offset))
            reader.read_into(offset, memoryview(buf))
            digest.update(buf)
    return digest.hexdigest()


@main.command()
@click.option("--layout", "layout_name", default="resnet18", show_default=True,
              help=f"Model layout: {', '.join(LAYOUTS)} or synthetic-<N>.")
@click.option("--clients", "-N", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--shards", "-M", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--memory-mb", type=click.FloatRange(min=1), default=128.0, show_default=True,
              help="Memory cap of every shard function, MiB.")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--store", "store_dir", type=click.Path(file_okay=False), default=None,
              help="Store directory (default: a temporary one, removed afterwards).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--reports", type=click.Path(dir_okay=False), default=None, help="Write all reports as JSON here.")
def demo(layout_name: str, clients: int, shards: int, memory_mb: float, workers: int, store_dir: str | None,
         seed: int, reports: str | None) -> None:
    """Generate realistic updates, aggregate them sharded (capped) and flat, and check they are bit-identical."""
    layout = get_layout(layout_name)
    with tempfile.TemporaryDirectory(prefix="gradshard-demo-") as tmp:
        store = LocalStore(store_dir or tmp)
        console.print(f"[bold]gradshard demo[/]: {layout_name}, {layout.aggregated().numel:,} averaged parameters "
                      f"({layout.aggregated().nbytes / MIB:,.1f} MiB per update), {clients} clients, "
                      f"store {store.root}")
        with _progress() as progress:
            task = progress.add_task("writing client updates", total=clients)
            make_round(store, 0, layout, clients, seed=seed, on_client=lambda _: progress.advance(task))
        sharded_cfg = AggregateConfig(topology="sharded", shards=shards)
        with LocalExecutor(workers=workers, memory_cap_bytes=int(memory_mb * MIB)) as capped:
            sharded = _run_aggregate(store, 0, capped, sharded_cfg, f"GradsSharding, M={shards}")
        sharded_sha = _sha256(store, aggregate_key(0))
        with LocalExecutor(workers=1) as uncapped:
            flat = _run_aggregate(store, 0, uncapped, AggregateConfig(topology="flat"), "flat reference")
        flat_sha = _sha256(store, aggregate_key(0))
        console.print(reports_table(sharded.reports + flat.reports, "invocation reports"))
        _demo_verdict(sharded, flat, sharded_sha, flat_sha, memory_mb)
        if reports:
            _write_json(Path(reports), {"sharded": [r.model_dump(mode="json") for r in sharded.reports],
                                        "flat": [r.model_dump(mode="json") for r in flat.reports]})
        if sharded_sha != flat_sha:
            sys.exit(1)


def _demo_verdict(sharded: AggregateResult, flat: AggregateResult, sharded_sha: str, flat_sha: str,
                  memory_mb: float) -> None:
    if sharded_sha == flat_sha:
        console.print(f"[green]bit-identical[/]: sharded and flat aggregates both hash to sha256 {sharded_sha[:16]}…")
    else:
        console.print(f"[red]DIFFERENT[/]: sharded {sharded_sha[:16]}…, flat {flat_sha[:16]}…")
    shard_peak = max(r.peak_rss_bytes or 0 for r in sharded.reports)
    flat_peak = max(r.peak_rss_bytes or 0 for r in flat.reports)
    console.print(f"largest shard function: {shard_peak / MIB:.1f} MiB resident (cap {memory_mb:.0f} MiB); "
                  f"flat aggregator: {flat_peak / MIB:.1f} MiB; sharded wall {sharded.wall_s:.2f} s, "
                  f"flat wall {flat.wall_s:.2f} s")


def _architectures(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    names = [a.strip() for a in value.split(",") if a.strip()]
    unknown = [a for a in names if a not in ARCHITECTURES]
    if unknown or not names:
        raise click.BadParameter(f"unknown {unknown}; choose from {','.join(ARCHITECTURES)}")
    return names


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


@main.command()
@click.option("--store", "store_dir", type=click.Path(file_okay=False, exists=True), required=True,
              help="Local store directory holding rounds/<r>/...")
@click.option("--round", "round_", type=click.IntRange(min=0), required=True)
@click.option("--shards", "-M", type=click.IntRange(min=1), default=None,
              help="GradsSharding's M (default: the smallest that fits --memory-limit; 4 without a limit).")
@click.option("--memory-limit", "memory_limit_mb", type=click.FloatRange(min=1), default=None,
              help="Per-function memory limit, MiB (resident set, interpreter included); infeasible "
                   "architectures are not run.")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Invocations running at once.")
@click.option("--nodes", type=click.IntRange(min=1), default=2, show_default=True, help="LIFL nodes.")
@click.option("--architectures", default=",".join(ARCHITECTURES), show_default=True, callback=_architectures,
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
    limit = None if memory_limit_mb is None else int(memory_limit_mb * MIB)
    with _progress() as progress:
        tasks: dict[str, TaskID] = {}

        def on_event(event: CompareEvent) -> None:
            if event.kind == "start":
                tasks[event.architecture] = progress.add_task(event.architecture, total=event.invocations)
            elif event.kind == "invocation":
                progress.advance(tasks[event.architecture])
            elif event.row is not None and event.row.status == "skipped":
                progress.console.print(f"{event.architecture}: not run ({event.row.reason})")

        result = compare_round(LocalStore(store_dir), round_, architectures=architectures, shards=shards,
                               memory_limit_bytes=limit, workers=workers, nodes=nodes,
                               window_bytes=window_kb * 1024, run_infeasible=run_infeasible, on_event=on_event)
    console.print(compare_table(result))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "compare.json", result.to_json().encode())
    _write_atomic(out / "compare.csv", result.to_csv().encode())
    _write_atomic(out / "compare.png", compare_png(result))
    console.print(f"wrote compare.json, compare.csv and compare.png to {out}")
    unexpected = [r.architecture for r in result.rows if r.feasible and r.status == "failed"]
    if unexpected:
        console.print(f"[red]failed although predicted feasible[/]: {', '.join(unexpected)}")
        sys.exit(1)


main.add_command(cost)
main.add_command(plan)


def run() -> None:
    """Entry point that turns gradshard errors into one clear line and exit code 2."""
    try:
        main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except GradshardError as exc:
        console.print(f"[red]error[/]: {exc}")
        sys.exit(2)


if __name__ == "__main__":
    run()
