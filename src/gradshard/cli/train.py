"""``gradshard train``: a federated training run from TOML and flags, resumable from its store."""

from __future__ import annotations

import json
import logging
import sys
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from gradshard.cli.common import (
    HELP_OPTIONS,
    SCOPED_TOKENS_HELP,
    SHARDS,
    ExitCode,
    console,
    make_executor,
    open_cli_store,
)
from gradshard.cli.console import untrusted
from gradshard.extras import EXTRAS, has_extra, require_extra
from gradshard.store import LocalStore, S3Store
from gradshard.topology.names import TOPOLOGIES

if TYPE_CHECKING:  # the training modules import torch: only the commands that train load them
    from gradshard.fl.config import TrainConfig
    from gradshard.fl.driver import RoundMetrics, Trainer

log = logging.getLogger(__name__)

#: Where each ``gradshard train`` flag goes in the TOML / :class:`TrainConfig` (a path through its tables).
TRAIN_FLAGS: dict[str, tuple[str, ...]] = {
    "model": ("model",), "data": ("data", "name"), "partition": ("data", "partition"), "alpha": ("data", "alpha"),
    "clients": ("clients",), "per_round": ("per_round",), "fraction": ("fraction",), "rounds": ("rounds",),
    "epochs": ("epochs",), "batch_size": ("batch_size",), "lr": ("lr",), "momentum": ("momentum",), "mu": ("mu",),
    "server_optimizer": ("server", "name"), "server_lr": ("server", "lr"), "topology": ("aggregation", "topology"),
    "shards": ("aggregation", "shards"), "min_clients": ("min_clients",), "deadline": ("deadline_s",),
    "seed": ("seed",), "task": ("task",), "task_options": ("task_options",),
    "sampling": ("sampling",), "weighting": ("aggregation", "weighting"),
    "central_dp_clip": ("privacy", "central", "clip"),
    "central_dp_noise_multiplier": ("privacy", "central", "noise_multiplier"),
    "central_dp_delta": ("privacy", "central", "delta"),
    "central_dp_max_epsilon": ("privacy", "central", "max_epsilon"),
    "central_dp_key_file": ("privacy", "central", "key_file"),
    "dp_noise_multiplier": ("privacy", "client", "noise_multiplier"),
    "dp_max_grad_norm": ("privacy", "client", "max_grad_norm"), "dp_delta": ("privacy", "client", "delta"),
    "dp_max_epsilon": ("privacy", "client", "max_epsilon"),
    "require_signatures": ("aggregation", "require_signatures"), "keys_dir": ("keys_dir",),
}

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

    from gradshard.fl.config import TrainConfig

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


def _round_line(m: RoundMetrics, total: int, plugin_line: str = "") -> str:
    width = len(str(total))
    line = (f"round {m.round:>{width}}  test accuracy [bold]{m.test_accuracy:.4f}[/]  loss {m.test_loss:.4f}  "
            f"clients {len(m.aggregated)}/{len(m.cohort)}  {m.wall_seconds:5.2f} s (clients {m.client_seconds:.2f}, "
            f"aggregation {m.aggregate_seconds:.2f}, server {m.server_seconds:.2f})")
    dp = m.client_privacy
    if dp is not None:
        line += f"\n    client DP (δ = {dp.delta:g}): "
        if dp.round_epsilon:
            rounds, composed = dp.round_epsilon.values(), dp.epsilon.values()
            line += (f"ε this round {_span(rounds)}, composed {_span(composed)} over {len(dp.round_epsilon)} "
                     f"clients; ")
        line += f"max composed ε {dp.max_epsilon:.3f}"
    problems = [f"{untrusted(c)} rejected ({untrusted(why)})" for c, why in m.rejected.items()]
    problems += [f"{untrusted(c)} left out ({untrusted(why)})" for c, why in (dp.excluded if dp else {}).items()]
    problems += [f"{untrusted(c)} failed ({untrusted(why)})" for c, why in m.failed.items()]
    problems += [f"{untrusted(c)} sat out ({untrusted(why)})" for c, why in (m.idle or {}).items()]
    if plugin_line:  # the round plugin's own summary (block-wise: stages, stage accuracies)
        line += f"\n    {untrusted(plugin_line)}"
    if m.central_dp is not None:
        line += (f"\n    central DP: {m.central_dp['clipped']} clipped, σ = {float(m.central_dp['sigma']):.3g}, "
                 f"ε = {float(m.central_dp['epsilon']):.3g} (δ = {m.central_dp['delta']})")
    return line + "".join(f"\n    [yellow]{p}[/]" for p in problems)


def _span(values: Any) -> str:
    low, high = min(values), max(values)
    return f"{low:.3f}" if f"{low:.3f}" == f"{high:.3f}" else f"{low:.3f}–{high:.3f}"


def run_training(trainer: Trainer, out: Path | None, title: str) -> list[dict[str, Any]]:
    """Run (or resume) ``trainer`` with a progress bar and a line per round; rewrite the outputs after each round.

    Returns the metrics of every round of the run (rounds done by an earlier start included).
    """
    from gradshard.fl import report
    from gradshard.format.keys import metrics_key

    config = trainer.config
    png = has_extra("plots")
    if out is not None and not png:
        log.warning("%s is not written: it needs matplotlib: %s", report.ACCURACY_PNG, EXTRAS["plots"].install)
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
                report.write_outputs(out, history, config_dump, title, png=png)
            bar.update(task, advance=1, accuracy=f"{m.test_accuracy:.4f}")
            summary = trainer.plugin.summary(m.plugin) if trainer.plugin is not None and m.plugin else ""
            bar.console.print(_round_line(m, config.rounds, summary))

        metrics = trainer.run(on_round=on_round)
    if out is not None:
        written = report.write_outputs(out, metrics, config_dump, title, png=png)
        console.print(f"wrote {untrusted(', '.join(p.name for p in written))} to {untrusted(out)}")
    s = report.summary(metrics)
    if metrics:
        console.print(f"final test accuracy [bold]{s['final_test_accuracy']:.4f}[/] after {s['rounds']} rounds "
                      f"(best {s['best_test_accuracy']:.4f} after round {s['best_round']}); "
                      f"{s['mean_round_seconds']:.2f} s per round, {s['total_wall_seconds']:.1f} s of rounds")
    return metrics


def _task_options(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> dict[str, Any] | None:
    if not value:
        return None
    options: dict[str, Any] = {}
    for item in value:
        key, sep, raw = item.partition("=")
        if not sep or not key.isidentifier():
            raise click.BadParameter(f"{item!r}: give KEY=VALUE with KEY a Python identifier")
        try:
            options[key] = json.loads(raw)
        except ValueError:
            options[key] = raw
    return options


def _task_target(spec: str | None) -> str | None:
    """A task reference with its file made absolute (function processes and a resumed run find the same file)."""
    if spec is None:
        return None
    from gradshard.fl.task import parse_task

    return parse_task(spec).target


def _train_options(f: Any) -> Any:
    options = [
        click.option("--task", default=None,
                     help="Your own task: 'package.module:name' or 'path/to/file.py:name', a gradshard.fl.task.Task "
                          "or a function returning one (replaces --model and --data)."),
        click.option("--task-option", "task_options", multiple=True, callback=_task_options,
                     help="KEY=VALUE passed to a task factory (VALUE as JSON, else a string); repeatable."),
        click.option("--model", type=click.Choice(["mlp", "cnn", "convnet", "resnet18", "vgg16"]), default=None,
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
        click.option("--shards", "-M", type=SHARDS, default=None,
                     help="GradsSharding's M; also the server step's shards [default: auto, one per worker]."),
        click.option("--partition", type=click.Choice(["iid", "dirichlet"]), default=None,
                     help="How the training set is split among clients [default: dirichlet]."),
        click.option("--alpha", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Dirichlet α (smaller: fewer labels per client) [default: 0.5]."),
        click.option("--min-clients", type=click.IntRange(min=1), default=None,
                     help="Updates a round needs to aggregate [default: 1]."),
        click.option("--deadline", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Seconds a client function may run; later ones are left out [default: 300]."),
        click.option("--seed", type=int, default=None, help="[default: 0]"),
        click.option("--sampling", type=click.Choice(["fixed", "poisson"]), default=None,
                     help="Clients per round: a fixed-size sample, or each client with probability per-round / "
                          "clients (what central DP's accountant amplifies by) [default: fixed]."),
        click.option("--weighting", type=click.Choice(["examples", "uniform"]), default=None,
                     help="FedAvg weights: examples, or uniform (central DP needs it) [default: examples]."),
        click.option("--central-dp-clip", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Central DP: clip each update to this L2 norm ([privacy.central] clip)."),
        click.option("--central-dp-noise-multiplier", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Central DP: noise σ = z · clip / clients per round."),
        click.option("--central-dp-delta", type=click.FloatRange(min=0, max=1, min_open=True, max_open=True),
                     default=None, help="Central DP: the δ of the reported ε [default: 1e-5]."),
        click.option("--central-dp-max-epsilon", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Central DP: stop (exit code 5) before a round would take ε past this."),
        click.option("--central-dp-key-file", default=None,
                     help="Central DP: the secret noise key file (created, mode 0600); a resumed run redraws the "
                          "same noise [default: a fresh key per start]."),
        click.option("--dp-noise-multiplier", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Client DP-SGD (Opacus): noise std / clip norm; turns client DP on ([privacy.client])."),
        click.option("--dp-max-grad-norm", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Client DP-SGD: every example's gradient is clipped to this L2 norm."),
        click.option("--dp-delta", type=click.FloatRange(min=0, max=1, min_open=True, max_open=True), default=None,
                     help="Client DP-SGD: the δ each client's ε is reported at [default: 1e-5]."),
        click.option("--dp-max-epsilon", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Client DP-SGD: a client whose composed ε would pass this is left out of later rounds."),
        click.option("--require-signatures/--no-require-signatures", default=None,
                     help="Every client signs its update with its own Ed25519 key (registered in the store) and "
                          "the aggregation accepts only signed updates (blake3 chunk digests) [default: no]."),
        click.option("--keys-dir", type=click.Path(file_okay=False), default=None,
                     help="Where the simulated clients' private keys live (with --require-signatures) [default: "
                          "a temporary directory for the run]."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@click.command(context_settings=HELP_OPTIONS)
@click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True), default=None,
              help="TOML file with the run's settings (the fields of TrainConfig; tables [data], [server], "
                   "[aggregation], [privacy.client]). Flags override it.")
@click.option("--store", "store_dir", required=True,
              help="Where the run's state lives: a directory (created if missing) or s3://bucket/prefix. Rerunning "
                   "on the same store resumes.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Directory for metrics.json, metrics.csv and accuracy.png [default: the store directory; the "
                   "current directory for an S3 store].")
@click.option("--executor", "executor_kind", type=click.Choice(["local", "ray", "lambda"]), default="local",
              show_default=True, help="Run clients, aggregation and server functions as local processes, as Ray "
                                      "tasks (capped the same way) or as AWS Lambda invocations (docs/aws-lambda.md).")
@click.option("--ray-address", default=None, help="Ray cluster to join [default: a local Ray].")
@click.option("--lambda-function", default=None,
              help="--executor lambda: the deployed function (name or ARN) of the aggregation and server functions.")
@click.option("--lambda-client-function", default=None,
              help="--executor lambda: the function of the clients (a container image with torch) [default: "
                   "--lambda-function].")
@click.option("--region", default=None, help="--executor lambda: the AWS region [default: from the environment].")
@click.option("--presigned-clients/--no-presigned-clients", default=None,
              help="Clients read and write only through URLs the driver presigns per task (an S3 store; the client "
                   "functions then need no S3 permission) [default: on with --executor lambda on an S3 store].")
@click.option("--client-memory-mb", type=click.FloatRange(min=1), default=None,
              help="Memory cap of every client function, MiB: a client that needs more fails with a memory error, "
                   "reported [default: none].")
@click.option("--memory-mb", type=click.FloatRange(min=1), default=None,
              help="Memory cap of every aggregation and server function, MiB [default: none].")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Function invocations running at once (clients, and aggregation/server functions).")
@click.option("--scoped-tokens/--no-scoped-tokens", default=True, show_default=True, help=SCOPED_TOKENS_HELP)
@_train_options
def train(config_path: str | None, store_dir: str, out_dir: str | None, executor_kind: str, ray_address: str | None,
          lambda_function: str | None, lambda_client_function: str | None, region: str | None,
          presigned_clients: bool | None,
          client_memory_mb: float | None, memory_mb: float | None, workers: int, scoped_tokens: bool,
          **flags: Any) -> None:
    """Federated training: clients, aggregation and the server step all run as functions on a store.

    Settings come from --config (TOML), else from the run already in --store, else the defaults; flags override
    them. The run's state lives in the store: rerun the same command to resume it after a crash or a kill, or
    raise --rounds to extend it.
    """
    require_extra("train", "gradshard train")
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
    flags["task"] = _task_target(flags.get("task"))
    config = train_config(base, flags, source)
    agg = config.aggregation
    what = f"task {untrusted(config.task)}" if config.task else \
        f"SuperFed supernet on {config.data.name}" if config.supernet is not None else \
        f"{untrusted(config.model)} on {config.data.name}"
    if config.blockwise is not None:
        what = f"block-wise ({config.blockwise.stages} stages, {config.blockwise.schedule}) {what}"
    console.print(f"[bold]gradshard train[/]: {what} ({config.data.partition}), "
                  f"{config.clients} clients, {config.sample_size()} per round, {config.rounds} rounds, "
                  f"{agg.topology}{f' M={agg.shards}' if agg.topology == 'sharded' else ''}, server "
                  f"{config.server.name}; store {untrusted(where)}; {executor_kind} executor")
    # Clients get no retries: the per-invocation timeout is the deadline, and a retry would restart its clock.
    executor = make_executor(executor_kind, workers, memory_mb, 2, 900.0, ray_address=ray_address,
                             lambda_function=lambda_function, region=region, scoped_tokens=scoped_tokens)
    client_executor = make_executor(executor_kind, workers, client_memory_mb, 0, config.deadline_s,
                                    ray_address=ray_address, lambda_function=lambda_client_function or lambda_function,
                                    region=region, scoped_tokens=scoped_tokens)
    from gradshard.cli.console import printable
    from gradshard.errors import TrainingError

    try:
        if presigned_clients is None:
            presigned_clients = executor_kind == "lambda" and isinstance(store, S3Store)
        trainer = Trainer(store, config, executor, client_executor, presigned_clients=presigned_clients)
        default_out = store.root if isinstance(store, LocalStore) else Path(".")
        title = config.task or (f"SuperFed supernet on {config.data.name}" if config.supernet is not None
                                 else f"{config.model} on {config.data.name}")
        if config.blockwise is not None:
            title = f"block-wise {title}"
        run_training(trainer, Path(out_dir) if out_dir else default_out,
                     f"{title}, {config.clients} clients, {agg.topology}")
    except TrainingError as exc:  # the run ran and its verdict is negative: every client failed, nothing aggregated
        click.echo(f"error: {printable(str(exc))}", err=True)
        sys.exit(ExitCode.NEGATIVE)
    finally:
        client_executor.close()
        executor.close()
