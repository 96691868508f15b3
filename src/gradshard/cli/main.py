"""The ``gradshard`` command: a thin layer where every command is one library call."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from gradshard import __version__
from gradshard.aggregation.compare import ARCHITECTURES, CompareEvent, compare_round
from gradshard.aggregation.driver import AggregateConfig, AggregateResult, aggregate_round
from gradshard.cli.console import compare_table, reports_table
from gradshard.cli.cost import cost, plan
from gradshard.cli.deploy import deploy
from gradshard.cli.plots import compare_png
from gradshard.core.zoo import LAYOUTS, get_layout
from gradshard.cost.model import CostOptions, cost_of_local_run
from gradshard.demo.synthetic import make_round
from gradshard.errors import GradshardError
from gradshard.format.keys import aggregate_key
from gradshard.format.update import inspect_update
from gradshard.runtime import Executor, InlineExecutor, LocalExecutor
from gradshard.store import LocalStore, S3Store, Store, open_store
from gradshard.topology import TOPOLOGIES

if TYPE_CHECKING:  # the training modules import torch: only the commands that train load them
    from gradshard.fl.driver import RoundMetrics, TrainConfig, Trainer

MIB = 1 << 20
console = Console(width=None if sys.stdout.isatty() else 150)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


def _executor(kind: str, workers: int, memory_mb: float | None, retries: int, timeout: float,
              warm: bool = False, ray_address: str | None = None, lambda_function: str | None = None,
              region: str | None = None) -> Executor:
    """An executor by name (close it when done). Ray and boto3 are imported only when asked for."""
    cap = None if memory_mb is None else int(memory_mb * MIB)
    if kind == "inline":
        return InlineExecutor(retries=retries)
    if kind == "ray":
        from gradshard.runtime.ray import RayExecutor

        return RayExecutor(address=ray_address, workers=workers, retries=retries, memory_cap_bytes=cap,
                           timeout_s=timeout)
    if kind == "lambda":
        from gradshard.runtime.aws_lambda import LambdaExecutor

        if not lambda_function:
            raise click.UsageError("--executor lambda needs --lambda-function (the deployed function's name or ARN)")
        return LambdaExecutor(lambda_function, region=region, workers=workers, retries=retries, timeout_s=timeout)
    return LocalExecutor(workers=workers, retries=retries, memory_cap_bytes=cap, timeout_s=timeout, warm=warm)


def open_cli_store(location: str, *, must_exist: bool) -> Store:
    """``s3://bucket/prefix`` (endpoint and credentials from the AWS environment) or a local directory."""
    if location.startswith("s3://"):
        store = open_store(location)
        if isinstance(store, S3Store) and not store.bucket_exists():
            raise click.BadParameter(f"bucket {store.bucket!r} does not exist at {store.endpoint_url or 'AWS'}",
                                     param_hint="--store")
        return store
    if must_exist and not Path(location).is_dir():
        raise click.BadParameter(f"directory {location!r} does not exist", param_hint="--store")
    return LocalStore(location)


def _run_aggregate(store: Store, r: int, executor: Executor, config: AggregateConfig,
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
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _config(kw: dict[str, Any]) -> AggregateConfig:
    return AggregateConfig(topology=kw["topology"], shards=kw["shards"], window_bytes=kw["window_kb"] * 1024,
                           parallel_reads=kw["parallel_reads"],
                           accumulate=kw["accumulate"], weighting=kw["weighting"], policy=kw["policy"],
                           group_size=kw["group_size"], branching=kw["branching"], nodes=kw["nodes"])


@main.command()
@click.option("--store", "store_dir", required=True,
              help="Store holding rounds/<r>/...: a local directory or s3://bucket/prefix (endpoint and credentials "
                   "from the AWS environment: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).")
@click.option("--round", "round_", type=click.IntRange(min=0), required=True)
@click.option("--reports", type=click.Path(dir_okay=False), default=None,
              help="Also write the reports as JSON here (they are always stored in rounds/<r>/reports.json).")
@_aggregate_options
def aggregate(store_dir: str, round_: int, reports: str | None, **kw: Any) -> None:
    """Aggregate one round of client updates and print what every function did."""
    store = open_cli_store(store_dir, must_exist=True)
    executor = _executor(kw["executor_kind"], kw["workers"], kw["memory_mb"], kw["retries"], kw["timeout"],
                         kw["warm"], kw["ray_address"], kw["lambda_function"], kw["region"])
    try:
        result = _run_aggregate(store, round_, executor, _config(kw), f"aggregating round {round_}")
    finally:
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


# --- training: gradshard train and gradshard demo ------------------------------------------------------------------
#: Where each ``gradshard train`` flag goes in the TOML / :class:`TrainConfig` (a path through its tables).
TRAIN_FLAGS: dict[str, tuple[str, ...]] = {
    "model": ("model",), "data": ("data", "name"), "partition": ("data", "partition"), "alpha": ("data", "alpha"),
    "clients": ("clients",), "per_round": ("per_round",), "fraction": ("fraction",), "rounds": ("rounds",),
    "epochs": ("epochs",), "batch_size": ("batch_size",), "lr": ("lr",), "momentum": ("momentum",), "mu": ("mu",),
    "server_optimizer": ("server", "name"), "server_lr": ("server", "lr"), "topology": ("aggregation", "topology"),
    "shards": ("aggregation", "shards"), "min_clients": ("min_clients",), "deadline": ("deadline_s",),
    "seed": ("seed",),
}

#: The demo's training run: small CNN on digits, 20 non-IID clients, GradsSharding M = 4 (tuned to reach >= 0.93
#: test accuracy within its rounds in well under a minute on 2 cores; measured numbers in docs/training.md).
DEMO_TRAINING: dict[str, Any] = {"model": "cnn", "clients": 20, "rounds": 20, "epochs": 5, "batch_size": 32,
                                 "lr": 0.1, "momentum": 0.9, "data": {"name": "digits", "partition": "dirichlet",
                                                                      "alpha": 0.5},
                                 "aggregation": {"topology": "sharded", "shards": 4}}


def load_toml(path: str) -> dict[str, Any]:
    """A TOML file as a dict; a syntax error becomes a usage error naming the file, line and column."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise click.BadParameter(f"{path} is not valid TOML: {exc}", param_hint="'--config'") from None


def train_config(base: dict[str, Any], flags: dict[str, Any], source: str) -> TrainConfig:
    """``base`` (a TOML document or a stored config) with every flag that was given set on top, validated.

    ``--per-round`` and ``--fraction`` replace each other. Invalid values become one usage error listing each
    field (as a TOML path) and what is wrong with it.
    """
    from pydantic import ValidationError

    from gradshard.fl.driver import TrainConfig

    raw = json.loads(json.dumps(base))  # a deep copy
    for given, other in (("per_round", "fraction"), ("fraction", "per_round")):
        if flags.get(given) is not None:
            raw.pop(other, None)
    for name, path in TRAIN_FLAGS.items():
        if flags.get(name) is None:
            continue
        node = raw
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = flags[name]
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(config)'}: {e['msg']}"
                             for e in exc.errors())
        raise click.UsageError(f"invalid training config ({source}): {problems}") from None


def _round_line(m: RoundMetrics, total: int) -> str:
    width = len(str(total))
    line = (f"round {m.round:>{width}}  test accuracy [bold]{m.test_accuracy:.4f}[/]  loss {m.test_loss:.4f}  "
            f"clients {len(m.aggregated)}/{len(m.cohort)}  {m.wall_seconds:5.2f} s (clients {m.client_seconds:.2f}, "
            f"aggregation {m.aggregate_seconds:.2f}, server {m.server_seconds:.2f})")
    problems = [f"{c} rejected ({why})" for c, why in m.rejected.items()]
    problems += [f"{c} failed ({why})" for c, why in m.failed.items()]
    return line + "".join(f"\n    [yellow]{p}[/]" for p in problems)


def run_training(trainer: Trainer, out: Path | None, title: str) -> list[dict[str, Any]]:
    """Run (or resume) ``trainer`` with a progress bar and a line per round; rewrite the outputs after each round.

    Returns the metrics of every round of the run (rounds done by an earlier start included).
    """
    from gradshard.fl import report
    from gradshard.format.keys import metrics_key

    config = trainer.config
    config_dump = config.model_dump(mode="json")
    trainer.prepare()  # refuses a store holding a different run before anything is shown
    done = min(trainer.completed_rounds(), config.rounds)
    history = [json.loads(trainer.store.get(metrics_key(r))) for r in range(done)]
    if done:
        finished = "round 0 is" if done == 1 else f"rounds 0–{done - 1} are"
        console.print(f"resuming: {finished} done (in the store); continuing at round {done}")
    last = f"{history[-1]['test_accuracy']:.4f}" if history else "–"
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("test accuracy {task.fields[accuracy]}"), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("rounds", total=config.rounds, completed=done, accuracy=last)

        def on_round(m: RoundMetrics) -> None:
            history.append(m.to_dict())
            if out is not None:
                report.write_outputs(out, history, config_dump, title)
            bar.update(task, advance=1, accuracy=f"{m.test_accuracy:.4f}")
            bar.console.print(_round_line(m, config.rounds))

        metrics = trainer.run(on_round=on_round)
    if out is not None:
        written = report.write_outputs(out, metrics, config_dump, title)
        console.print(f"wrote {', '.join(p.name for p in written)} to {out}")
    s = report.summary(metrics)
    if metrics:
        console.print(f"final test accuracy [bold]{s['final_test_accuracy']:.4f}[/] after {s['rounds']} rounds "
                      f"(best {s['best_test_accuracy']:.4f} after round {s['best_round']}); "
                      f"{s['mean_round_seconds']:.2f} s per round, {s['total_wall_seconds']:.1f} s of rounds")
    return metrics


def _train_options(f: Any) -> Any:
    options = [
        click.option("--model", type=click.Choice(["mlp", "cnn", "resnet18", "vgg16"]), default=None,
                     help="Model to train [default: mlp]."),
        click.option("--data", type=click.Choice(["digits", "synthetic"]), default=None,
                     help="Bundled data set [default: digits]."),
        click.option("--clients", "-N", type=click.IntRange(min=1), default=None, help="Clients [default: 20]."),
        click.option("--rounds", type=click.IntRange(min=1), default=None,
                     help="Rounds of the run [default: 20]; raise it on the same store to extend a run."),
        click.option("--per-round", type=click.IntRange(min=1), default=None,
                     help="Clients sampled per round [default: all]."),
        click.option("--fraction", type=click.FloatRange(min=0, max=1, min_open=True), default=None,
                     help="Or the fraction of clients sampled per round."),
        click.option("--epochs", type=click.IntRange(min=1), default=None, help="Local epochs [default: 5]."),
        click.option("--batch-size", type=click.IntRange(min=1), default=None, help="[default: 16]"),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Client SGD learning rate [default: 0.1]."),
        click.option("--momentum", type=click.FloatRange(min=0, max=1, max_open=True), default=None,
                     help="Client SGD momentum [default: 0.9]."),
        click.option("--mu", type=click.FloatRange(min=0), default=None,
                     help="FedProx proximal weight; 0 is FedAvg [default: 0]."),
        click.option("--server-optimizer", type=click.Choice(["fedavg", "fedavgm", "fedadam"]), default=None,
                     help="Server update applied shard by shard [default: fedavg]."),
        click.option("--server-lr", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Server learning rate η [default: 1]."),
        click.option("--topology", type=click.Choice(list(TOPOLOGIES)), default=None,
                     help="Aggregation topology [default: sharded]."),
        click.option("--shards", "-M", type=click.IntRange(min=1), default=None,
                     help="GradsSharding's M; also the server step's shards [default: 4]."),
        click.option("--partition", type=click.Choice(["iid", "dirichlet"]), default=None,
                     help="How the training set is split among clients [default: dirichlet]."),
        click.option("--alpha", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Dirichlet α (smaller: fewer labels per client) [default: 0.5]."),
        click.option("--min-clients", type=click.IntRange(min=1), default=None,
                     help="Updates a round needs to aggregate [default: 1]."),
        click.option("--deadline", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Seconds a client function may run; later ones are left out [default: 300]."),
        click.option("--seed", type=int, default=None, help="[default: 0]"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True), default=None,
              help="TOML file with the run's settings (the fields of TrainConfig; tables [data], [server], "
                   "[aggregation]). Flags override it.")
@click.option("--store", "store_dir", required=True,
              help="Where the run's state lives: a directory (created if missing) or s3://bucket/prefix. Rerunning "
                   "on the same store resumes.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Directory for metrics.json, metrics.csv and accuracy.png [default: the store directory; the "
                   "current directory for an S3 store].")
@click.option("--executor", "executor_kind", type=click.Choice(["local", "ray"]), default="local",
              show_default=True, help="Run clients, aggregation and server functions as local processes or as Ray "
                                      "tasks (capped the same way).")
@click.option("--ray-address", default=None, help="Ray cluster to join [default: a local Ray].")
@click.option("--memory-mb", type=click.FloatRange(min=1), default=None,
              help="Memory cap of every aggregation and server function, MiB [default: none].")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Function invocations running at once (clients, and aggregation/server functions).")
@_train_options
def train(config_path: str | None, store_dir: str, out_dir: str | None, executor_kind: str, ray_address: str | None,
          memory_mb: float | None, workers: int, **flags: Any) -> None:
    """Federated training: clients, aggregation and the server step all run as functions on a store.

    Settings come from --config (TOML), else from the run already in --store, else the defaults; flags override
    them. The run's state lives in the store: rerun the same command to resume it after a crash or a kill, or
    raise --rounds to extend it.
    """
    from gradshard.fl.driver import Trainer
    from gradshard.format.keys import CONFIG_KEY

    store = open_cli_store(store_dir, must_exist=False)
    where = str(store.root) if isinstance(store, LocalStore) else store_dir
    if config_path is not None:
        base, source = load_toml(config_path), f"{config_path} + flags"
    elif store.exists(CONFIG_KEY):
        base, source = json.loads(store.get(CONFIG_KEY)), f"{where}/{CONFIG_KEY} + flags"
    else:
        base, source = {}, "defaults + flags"
    config = train_config(base, flags, source)
    agg = config.aggregation
    console.print(f"[bold]gradshard train[/]: {config.model} on {config.data.name} ({config.data.partition}), "
                  f"{config.clients} clients, {config.sample_size()} per round, {config.rounds} rounds, "
                  f"{agg.topology}{f' M={agg.shards}' if agg.topology == 'sharded' else ''}, server "
                  f"{config.server.name}; store {where}; {executor_kind} executor")
    # Clients get no retries: the per-invocation timeout is the deadline, and a retry would restart its clock.
    executor = _executor(executor_kind, workers, memory_mb, 2, 900.0, ray_address=ray_address)
    client_executor = _executor(executor_kind, workers, None, 0, config.deadline_s, ray_address=ray_address)
    try:
        trainer = Trainer(store, config, executor, client_executor)
        default_out = store.root if isinstance(store, LocalStore) else Path(".")
        run_training(trainer, Path(out_dir) if out_dir else default_out, f"{config.model} on {config.data.name}, "
                     f"{config.clients} clients, {agg.topology}")
    finally:
        client_executor.close()
        executor.close()


def _verify_last_round(store: LocalStore, config: TrainConfig, r: int, workers: int) -> bool:
    from gradshard.fl.report import recompute_flat

    with LocalExecutor(workers=workers) as uncapped:
        check = recompute_flat(store, config, r, uncapped)
    if check.identical:
        console.print(f"[green]bit-identical[/]: round {r} recomputed with one flat aggregator and an unsharded "
                      f"server step gives the same aggregate (sha256 {check.sharded_aggregate[:16]}…) and the same "
                      f"global model (sha256 {check.sharded_model[:16]}…)")
    else:
        console.print(f"[red]DIFFERENT[/]: aggregate sharded {check.sharded_aggregate[:16]}… vs flat "
                      f"{check.flat_aggregate[:16]}…; model sharded {check.sharded_model[:16]}… vs flat "
                      f"{check.flat_model[:16]}…")
    return check.identical


def _demo_training(clients: int, rounds: int, shards: int, memory_mb: float, workers: int, store_dir: str | None,
                   seed: int, model: str, out_dir: str | None) -> None:
    from gradshard.fl.driver import TrainConfig, Trainer

    config = TrainConfig.model_validate({**DEMO_TRAINING, "clients": clients, "rounds": rounds, "model": model,
                                         "seed": seed, "aggregation": {"topology": "sharded", "shards": shards}})
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gradshard-demo-") as tmp:
        store = LocalStore(store_dir or tmp)
        console.print(f"[bold]gradshard demo[/]: federated training of a {model} on scikit-learn's digits; "
                      f"{clients} non-IID clients (Dirichlet α = {config.data.alpha}), {rounds} rounds of "
                      f"{config.epochs} local epochs; GradsSharding M = {shards} and a sharded server step on "
                      f"functions capped at {memory_mb:.0f} MiB; store {store.root}")
        with LocalExecutor(workers=workers, memory_cap_bytes=int(memory_mb * MIB)) as capped, \
                LocalExecutor(workers=workers, retries=0, timeout_s=config.deadline_s) as client_executor:
            trainer = Trainer(store, config, capped, client_executor)
            metrics = run_training(trainer, Path(out_dir) if out_dir else None,
                                   f"demo: {model}, {clients} non-IID clients, GradsSharding M={shards}")
        identical = _verify_last_round(store, config, len(metrics) - 1, workers)
    console.print(f"demo done in {time.perf_counter() - started:.1f} s")
    if not identical:
        sys.exit(1)


@main.command()
@click.option("--aggregate-only", is_flag=True,
              help="The aggregation-only demo: synthetic updates of --layout, aggregated sharded (capped) and flat.")
@click.option("--clients", "-N", type=click.IntRange(min=1), default=None,
              help="Clients [default: 20; 8 with --aggregate-only].")
@click.option("--rounds", type=click.IntRange(min=1), default=None,
              help=f"Training rounds [default: {DEMO_TRAINING['rounds']}].")
@click.option("--model", type=click.Choice(["mlp", "cnn"]), default=None,
              help=f"Model to train [default: {DEMO_TRAINING['model']}].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Write metrics.json, metrics.csv and accuracy.png of the training run here.")
@click.option("--layout", "layout_name", default=None,
              help=f"With --aggregate-only: model layout: {', '.join(LAYOUTS)} or synthetic-<N> [default: resnet18].")
@click.option("--shards", "-M", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--memory-mb", type=click.FloatRange(min=1), default=None,
              help="Memory cap of every aggregation and server function, MiB [default: 256; 128 with "
                   "--aggregate-only].")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--store", "store_dir", type=click.Path(file_okay=False), default=None,
              help="Store directory (default: a temporary one, removed afterwards).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--reports", type=click.Path(dir_okay=False), default=None,
              help="With --aggregate-only: write all reports as JSON here.")
def demo(aggregate_only: bool, clients: int | None, rounds: int | None, model: str | None, out_dir: str | None,
         layout_name: str | None, shards: int, memory_mb: float | None, workers: int, store_dir: str | None,
         seed: int, reports: str | None) -> None:
    """Federated training on digits with 20 non-IID clients and GradsSharding on memory-capped functions, then a
    check that the last round is bit-identical to a flat recomputation. --aggregate-only: aggregation alone."""
    if aggregate_only:
        extra = [name for name, value in (("--rounds", rounds), ("--model", model), ("--out", out_dir))
                 if value is not None]
        if extra:
            raise click.UsageError(f"{', '.join(extra)} only apply to the training demo (without --aggregate-only)")
        _demo_aggregate(layout_name or "resnet18", clients or 8, shards, memory_mb or 128.0, workers, store_dir,
                        seed, reports)
        return
    extra = [name for name, value in (("--layout", layout_name), ("--reports", reports)) if value is not None]
    if extra:
        raise click.UsageError(f"{', '.join(extra)} only apply with --aggregate-only")
    _demo_training(clients or DEMO_TRAINING["clients"], rounds or DEMO_TRAINING["rounds"], shards,
                   memory_mb or 256.0, workers, store_dir, seed, model or DEMO_TRAINING["model"], out_dir)


def _demo_aggregate(layout_name: str, clients: int, shards: int, memory_mb: float, workers: int,
                    store_dir: str | None, seed: int, reports: str | None) -> None:
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

        store = open_cli_store(store_dir, must_exist=True)
        result = compare_round(store, round_, architectures=architectures, shards=shards, memory_limit_bytes=limit,
                               workers=workers, nodes=nodes, window_bytes=window_kb * 1024,
                               run_infeasible=run_infeasible, on_event=on_event)
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
main.add_command(deploy)


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
