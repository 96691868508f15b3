"""``gradshard demo``: the training demo (and ``--aggregate-only``), each checked against a flat recomputation."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from gradshard.aggregation.driver import AggregateConfig, AggregateResult
from gradshard.cli.common import (
    HELP_OPTIONS,
    ExitCode,
    console,
    progress_bar,
    run_aggregate,
    sha256_of,
    write_json,
)
from gradshard.cli.console import reports_table, untrusted
from gradshard.cli.train import run_training
from gradshard.core.zoo import LAYOUTS, get_layout
from gradshard.demo.synthetic import make_round
from gradshard.extras import require_extra
from gradshard.format.keys import aggregate_key
from gradshard.runtime import LocalExecutor
from gradshard.store import LocalStore
from gradshard.units import MIB

if TYPE_CHECKING:  # the training modules import torch: only the commands that train load them
    from gradshard.fl.config import TrainConfig

#: The demo's training run: small CNN on digits, 20 non-IID clients, GradsSharding M = 4 (tuned to reach >= 0.93
#: test accuracy within its rounds in well under a minute on 2 cores; measured numbers in docs/training.md).
DEMO_TRAINING: dict[str, Any] = {"model": "cnn", "clients": 20, "rounds": 20, "epochs": 5, "batch_size": 32,
                                 "lr": 0.1, "momentum": 0.9, "data": {"name": "digits", "partition": "dirichlet",
                                                                      "alpha": 0.5},
                                 "aggregation": {"topology": "sharded", "shards": 4}}


def _verify_last_round(store: LocalStore, config: TrainConfig, r: int, workers: int) -> bool:
    from gradshard.fl.report import recompute_flat, save_flat_check

    with LocalExecutor(workers=workers) as uncapped:
        check = recompute_flat(store, config, r, uncapped)
    save_flat_check(store, check)
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
    require_extra("train", "gradshard demo (without --aggregate-only)")
    from gradshard.fl.config import TrainConfig
    from gradshard.fl.driver import Trainer

    config = TrainConfig.model_validate({**DEMO_TRAINING, "clients": clients, "rounds": rounds, "model": model,
                                         "seed": seed, "aggregation": {"topology": "sharded", "shards": shards}})
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gradshard-demo-") as tmp:
        store = LocalStore(store_dir or tmp)
        console.print(f"[bold]gradshard demo[/]: federated training of a {model} on scikit-learn's digits; "
                      f"{clients} non-IID clients (Dirichlet α = {config.data.alpha}), {rounds} rounds of "
                      f"{config.epochs} local epochs; GradsSharding M = {shards} and a sharded server step on "
                      f"functions capped at {memory_mb:.0f} MiB; store {untrusted(store.root)}")
        with LocalExecutor(workers=workers, memory_cap_bytes=int(memory_mb * MIB)) as capped, \
                LocalExecutor(workers=workers, retries=0, timeout_s=config.deadline_s) as client_executor:
            trainer = Trainer(store, config, capped, client_executor)
            metrics = run_training(trainer, Path(out_dir) if out_dir else None,
                                   f"demo: {model}, {clients} non-IID clients, GradsSharding M={shards}")
        identical = _verify_last_round(store, config, len(metrics) - 1, workers)
    console.print(f"demo done in {time.perf_counter() - started:.1f} s")
    if not identical:
        sys.exit(ExitCode.NEGATIVE)


@click.command(context_settings=HELP_OPTIONS)
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
    if store_dir is not None and store_dir.startswith("s3://"):
        raise click.BadParameter("the demo runs on a local directory (it hashes the aggregates there); use "
                                 "'gradshard train --store s3://...' or 'gradshard aggregate --store s3://...'",
                                 param_hint="--store")
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
        console.print(f"[bold]gradshard demo[/]: {untrusted(layout_name)}, {layout.aggregated().numel:,} averaged "
                      f"parameters ({layout.aggregated().nbytes / MIB:,.1f} MiB per update), {clients} clients, "
                      f"store {untrusted(store.root)}")
        with progress_bar() as progress:
            task = progress.add_task("writing client updates", total=clients)
            make_round(store, 0, layout, clients, seed=seed, on_client=lambda _: progress.advance(task))
        sharded_cfg = AggregateConfig(topology="sharded", shards=shards)
        with LocalExecutor(workers=workers, memory_cap_bytes=int(memory_mb * MIB)) as capped:
            sharded = run_aggregate(store, 0, capped, sharded_cfg, f"GradsSharding, M={shards}")
        sharded_sha = sha256_of(store, aggregate_key(0))
        with LocalExecutor(workers=1) as uncapped:
            flat = run_aggregate(store, 0, uncapped, AggregateConfig(topology="flat"), "flat reference")
        flat_sha = sha256_of(store, aggregate_key(0))
        if reports:
            write_json(Path(reports), {"sharded": [r.model_dump(mode="json") for r in sharded.reports],
                                        "flat": [r.model_dump(mode="json") for r in flat.reports]})
        console.print(reports_table(sharded.reports + flat.reports, "invocation reports"))
        _demo_verdict(sharded, flat, sharded_sha, flat_sha, memory_mb)
        if sharded_sha != flat_sha:
            sys.exit(ExitCode.NEGATIVE)


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
