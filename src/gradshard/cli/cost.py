"""``gradshard cost`` and ``gradshard plan``: price a round, recommend a deployment, sweep model sizes.

Thin click commands over :mod:`gradshard.cost.model` and :mod:`gradshard.cost.planner`;
``gradshard.cli.main`` registers them.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from gradshard.cli.common import HELP_OPTIONS, ExitCode
from gradshard.cli.console import untrusted
from gradshard.cost.model import (
    MEMORY_CAPS_MB,
    OBJECT_LAYOUTS,
    PAPER_LATENCY,
    CostOptions,
    RoundCost,
    RoundShape,
    measured_memory_mb,
    predict_cost,
    predict_durations,
    round_cost,
    shape_for,
    shape_from_plan,
)
from gradshard.cost.planner import (
    CostModel,
    PlanRequest,
    Recommendation,
    crossover_mb,
    default_sweep_sizes,
    recommend,
    sweep,
    write_sweep,
)
from gradshard.cost.pricing import DEFAULT_PRICES, PRICE_SHEETS, price_sheet
from gradshard.extras import require_extra
from gradshard.runtime.report import InvocationReport
from gradshard.topology.base import Plan
from gradshard.topology.names import TOPOLOGIES, Topology, topology_name

console = Console(width=None if sys.stdout.isatty() else 150)
_PRICES_HELP = f"Price sheet: {', '.join(PRICE_SHEETS)}, or a JSON file with the same fields."
_CAPS = ", ".join(f"{mb} ({name})" for name, mb in MEMORY_CAPS_MB.items())


@dataclass(frozen=True)
class LocalRun:
    """What a reports file of a local run says: its shape, the billed duration of each function, peak memory."""

    shape: RoundShape
    durations_s: list[float]
    peak_memory_mb: int | None


def _topology(ctx: click.Context, param: click.Parameter, value: str | None) -> Topology | None:
    return None if value is None else topology_name(value)


def _plan_from_dict(data: dict[str, Any]) -> Plan:
    from gradshard.report.data import plan_from_dict

    return plan_from_dict(data)


def read_local_run(path: str, arch: Topology | None, clients: int | None) -> LocalRun:
    """A local run from its reports file (``--reports`` of ``gradshard aggregate``, or ``rounds/<r>/reports.json``
    which also holds the plan: then LIFL's shared-memory hand-offs are known)."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "reports" not in data or "summary" not in data:
        raise click.BadParameter("expected a reports file with 'summary' and 'reports'", param_hint="--reports")
    reports = [InvocationReport.model_validate(r) for r in data["reports"]]
    ok = [r for r in reports if r.ok]
    n = clients or int(data["summary"]["clients"])
    if "plan" in data:
        shape = shape_from_plan(_plan_from_dict(data["plan"]), n)
        by_id = {r.invocation: r.duration_s for r in ok}
        durations = [by_id[a.id] for a in shape.aggregators if a.id in by_id]
    else:
        topology = str(data["summary"].get("topology"))
        arch = arch or (topology_name(topology) if topology in TOPOLOGIES else None)
        if arch is None:
            raise click.UsageError(f"unknown topology in {path}: give --arch")
        shape = shape_for(arch, n, len(ok))
        durations = [r.duration_s for r in ok]
    peaks = [r for r in reports if r.peak_rss_bytes is not None]
    return LocalRun(shape, durations, measured_memory_mb(peaks) if peaks else None)


def _round_from_options(kw: dict[str, Any], options: CostOptions) -> RoundCost:
    """Durations given, read from reports, or predicted from the model size: exactly one of the three."""
    given = [k for k in ("durations", "reports", "model_mb") if kw[k] is not None]
    if len(given) != 1:
        raise click.UsageError("give exactly one of --durations, --reports and --model-mb")
    if kw["reports"] is not None:
        return _from_reports(kw, options)
    if kw["clients"] is None:
        raise click.UsageError("--clients is required with --durations or --model-mb")
    shape = shape_for(kw["arch"] or "sharded", kw["clients"], kw["shards"])
    if kw["model_mb"] is not None:
        return _predicted(shape, kw["model_mb"], kw["memory_mb"], options)
    if kw["memory_mb"] is None:
        raise click.UsageError("--memory-mb is required with --durations")
    try:
        given_s = [float(d) for d in kw["durations"].split(",")]
    except ValueError:
        raise click.BadParameter("comma-separated seconds, e.g. 57.3,57.3", param_hint="--durations") from None
    wrong = [d for d in given_s if not math.isfinite(d) or d < 0]
    if wrong:
        raise click.BadParameter(f"{', '.join(map(str, wrong))}: durations are seconds, never negative (nor inf "
                                 "or nan)", param_hint="--durations")
    return round_cost(shape, kw["memory_mb"], given_s, options)


def _from_reports(kw: dict[str, Any], options: CostOptions) -> RoundCost:
    """The local run's durations at ``--memory-mb`` or, by default, at its measured peak memory."""
    run = read_local_run(kw["reports"], kw["arch"], kw["clients"])
    memory = kw["memory_mb"] or run.peak_memory_mb
    if memory is None:
        raise click.UsageError("the reports carry no peak memory: give --memory-mb")
    return round_cost(run.shape, memory, run.durations_s, options)


def _predicted(shape: RoundShape, model_mb: float, memory_mb: int | None, options: CostOptions) -> RoundCost:
    """Predicted durations; memory from the paper's rule unless ``memory_mb`` is given."""
    if memory_mb is None:
        return predict_cost(shape, model_mb, options)
    durations = predict_durations(shape, model_mb, PAPER_LATENCY, options.layout, options.header_gets)
    return round_cost(shape, memory_mb, durations, options, PAPER_LATENCY, model_mb)


def _cost_table(result: RoundCost) -> Table:
    shape = result.shape
    functions = f"M = {shape.shards}" if shape.arch == "sharded" else f"{len(shape.aggregators)} functions"
    table = Table(title=f"{shape.arch}, {result.options.layout} layout: N = {shape.clients}, {functions} of "
                        f"{result.memory_mb} MB, {untrusted(result.options.prices.name)}", title_justify="left")
    for name in ("", "compute", "requests", "storage PUT", "storage GET", "total"):
        table.add_column(name, justify="left" if not name else "right")
    for label, c, fmt in (("per round", result.per_round, "{:.6f}"), ("per 1000 rounds", result.per_1000_rounds,
                                                                      "{:.2f}")):
        table.add_row(label, *(fmt.format(v) for v in (c.compute, c.requests, c.storage_put, c.storage_get,
                                                       c.total)))
    return table


@click.command(context_settings=HELP_OPTIONS)
@click.option("--arch", type=click.Choice(TOPOLOGIES), default=None,
              help="Topology (default: the reports' topology, else grads-sharding).")
@click.option("--clients", "-N", type=click.IntRange(min=1), default=None, help="Clients N.")
@click.option("--shards", "-M", type=click.IntRange(min=1), default=4, show_default=True,
              help="Shard functions M (GradsSharding).")
@click.option("--memory-mb", type=click.IntRange(min=1), default=None,
              help="Configured memory of every function, MB (default with --reports: the measured peak).")
@click.option("--durations", default=None, help="Billed seconds of each function, comma-separated, in plan order.")
@click.option("--reports", type=click.Path(dir_okay=False, exists=True), default=None,
              help="A local run's reports JSON ({'summary':..., 'reports':[...]}) instead of --durations.")
@click.option("--model-mb", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Predict durations (and memory, by the paper's rule) for an update of this many MB.")
@click.option("--layout", type=click.Choice(OBJECT_LAYOUTS), default="paper", show_default=True,
              help="paper: M shard objects per client; ranged: one object per client, ranged reads.")
@click.option("--prices", default=DEFAULT_PRICES, show_default=True, help=_PRICES_HELP)
@click.option("--count-request-fees", is_flag=True, help="Also price function invocations (the paper did not).")
@click.option("--header-gets", type=click.IntRange(min=0), default=2, show_default=True,
              help="Ranged layout: GETs per client header per shard function.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def cost(**kw: Any) -> None:
    """Price one round: function compute, invocation requests and object-store operations, per round and per
    1000 rounds."""
    options = CostOptions(layout=kw["layout"], prices=price_sheet(kw["prices"]),
                          count_request_fees=kw["count_request_fees"], header_gets=kw["header_gets"])
    result = _round_from_options(kw, options)
    if kw["as_json"]:
        click.echo(json.dumps(result.to_dict()))
        return
    console.print(_cost_table(result))
    r = result.requests
    console.print(f"{r.puts} PUTs, {r.gets} GETs, {r.invocations} invocations; round latency "
                  f"{result.latency_s:.1f} s; prices {untrusted(options.prices.name)} as of "
                  f"{untrusted(options.prices.as_of)}")


def _plan_table(rec: Recommendation) -> Table:
    req = rec.request
    table = Table(title=f"{req.params:.3g} parameters ({req.model_mb:,.0f} MB), N = {req.clients}, cap "
                        f"{req.memory_limit_mb:,} MB, deadline {req.deadline_s or '—'} s, "
                        f"{untrusted(req.model.prices.name)}",
                  title_justify="left")
    for name in ("architecture", "layout", "M", "memory MB", "latency s", "compute $/1000", "storage $/1000",
                 "total $/1000", "feasible"):
        table.add_column(name, justify="left" if name in ("architecture", "layout", "feasible") else "right")
    for c in rec.alternatives:
        d = c.to_dict()
        table.add_row(d["arch"], d["layout"], str(d["shards"]), f"{d['memory_mb']:,}", f"{d['latency_s']:,.1f}",
                      f"{d['per_1000_rounds']['compute']:,.2f}", f"{d['per_1000_rounds']['storage']:,.2f}",
                      f"{d['per_1000_rounds']['total']:,.2f}", "yes" if d["feasible"] else f"no: {d['reason']}")
    return table


def _sweep(model: CostModel, kw: dict[str, Any]) -> None:
    require_extra("plots", "gradshard plan --sweep")
    rows = sweep(default_sweep_sizes(), kw["clients"], kw["shards"], kw["memory_limit"], model)
    crossovers = {layout: crossover_mb(kw["clients"], kw["shards"], layout, model=model)
                  for layout in OBJECT_LAYOUTS}
    title = (f"N = {kw['clients']}, M = {kw['shards']}, cap {kw['memory_limit']:,} MB, {model.prices.name} "
             "(hollow: infeasible)")
    paths = write_sweep(rows, kw["out"], title)
    if kw["as_json"]:
        click.echo(json.dumps({"files": {k: str(p) for k, p in paths.items()}, "crossover_mb": crossovers,
                               "points": len(rows)}))
        return
    for layout, size in crossovers.items():
        where = "none in 1 MB - 100 GB" if size is None else f"{size:,.0f} MB"
        console.print(f"GradsSharding / λ-FL cost crossover, {layout} layout: {where}")
    console.print("wrote " + untrusted(", ".join(str(p) for p in paths.values())))


@click.command(context_settings=HELP_OPTIONS)
@click.option("--params", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Model parameters, e.g. 7e9 (required unless --sweep).")
@click.option("--clients", "-N", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--memory-limit", type=click.IntRange(min=128), default=MEMORY_CAPS_MB["aws-max"], show_default=True,
              help=f"Per-function memory cap, MB; presets: {_CAPS}.")
@click.option("--deadline", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Longest acceptable round, seconds.")
@click.option("--bytes-per-param", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--max-shards", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--prices", default=DEFAULT_PRICES, show_default=True, help=_PRICES_HELP)
@click.option("--throughput-mb-s", type=click.FloatRange(min=0, min_open=True),
              default=PAPER_LATENCY.stream_mb_s, show_default=True, help="Object-store MB/s per stream.")
@click.option("--streams", type=click.IntRange(min=1), default=1, show_default=True,
              help="Concurrent streams per function.")
@click.option("--count-request-fees", is_flag=True, help="Also price function invocations.")
@click.option("--header-gets", type=click.IntRange(min=0), default=2, show_default=True)
@click.option("--sweep", "do_sweep", is_flag=True, help="Write cost versus model size (plot, CSV, JSON).")
@click.option("--shards", "-M", type=click.IntRange(min=1), default=4, show_default=True, help="M of the sweep.")
@click.option("--out", type=click.Path(file_okay=False), default="cost-sweep", show_default=True,
              help="Directory for the sweep's files.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def plan(**kw: Any) -> None:
    """Recommend topology, M, function memory and layout for a model; or sweep cost over model sizes."""
    latency = PAPER_LATENCY.model_copy(update={"stream_mb_s": kw["throughput_mb_s"], "streams": kw["streams"]})
    model = CostModel(prices=price_sheet(kw["prices"]), latency=latency,
                      count_request_fees=kw["count_request_fees"], header_gets=kw["header_gets"])
    if kw["do_sweep"]:
        _sweep(model, kw)
        return
    if kw["params"] is None:
        raise click.UsageError("give --params (or --sweep)")
    rec = recommend(PlanRequest(params=kw["params"], clients=kw["clients"], memory_limit_mb=kw["memory_limit"],
                                deadline_s=kw["deadline"], bytes_per_param=kw["bytes_per_param"],
                                max_shards=kw["max_shards"], model=model))
    if kw["as_json"]:
        click.echo(json.dumps(rec.to_dict()))
    else:
        _print_recommendation(rec)
    if rec.best is None:
        sys.exit(ExitCode.NEGATIVE)


def _print_recommendation(rec: Recommendation) -> None:
    console.print(_plan_table(rec))
    if rec.best is None:
        console.print("[red]nothing fits[/]: raise the memory limit or the deadline")
        return
    best = rec.best.to_dict()
    console.print(f"[bold]recommended[/]: {best['arch']}, M = {best['shards']}, {best['memory_mb']:,} MB "
                  f"functions, {best['layout']} layout: ${best['per_1000_rounds']['total']:,.2f} per 1000 rounds, "
                  f"{best['latency_s']:,.0f} s per round")
