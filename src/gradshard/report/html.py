"""A :class:`RunReport` as one self-contained HTML page: Jinja2 with autoescape on, plots as base64 PNG.

The page needs nothing outside itself: the CSS is inline, the plots are PNG data URIs drawn by matplotlib on an
explicit Agg canvas (no pyplot, no global backend switch), there is no JavaScript, and a Content-Security-Policy
forbids scripts and every fetch except ``data:`` images. Every string from the store is untrusted and escaped by
the template engine (autoescape on for every template, whatever its name); plots carry numbers only.

matplotlib is optional: without it the page leaves the plots out and says so (the tables hold every number).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

from gradshard.fl.report import write_atomic
from gradshard.report.data import STAGES, RunReport, client_of, load_run_report
from gradshard.store import Store
from gradshard.units import MIB

TEMPLATE = "report.html.j2"
_STAGE_COLOURS = {"client": "#8c8c8c", "aggregation": "#4c72b0", "server": "#55a868"}
_FAILED, _REJECTED, _CAP = "#c44e52", "#dd8452", "#c44e52"


def _png_uri(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def accuracy_plot(report: RunReport) -> str:
    """Test accuracy (left) and loss (right) per round; rounds with failed / rejected clients marked."""
    from matplotlib.ticker import MaxNLocator

    rounds = [r.round for r in report.rounds]
    fig = _figure(8.0, 3.6)
    ax = fig.add_subplot()
    ax.plot(rounds, [r.test_accuracy for r in report.rounds], marker="o", markersize=4, color="#4c72b0",
            label="test accuracy", zorder=3)
    for attr, marker, colour, label in (("failed", "X", _FAILED, "clients failed"),
                                        ("rejected", "s", _REJECTED, "clients rejected")):
        marked = [r for r in report.rounds if getattr(r, attr)]
        if marked:
            ax.scatter([r.round for r in marked], [r.test_accuracy for r in marked], marker=marker, s=90,
                       facecolors="none" if marker == "s" else colour, edgecolors=colour, linewidths=1.5,
                       label=label, zorder=4)
            for r in marked:
                ax.axvline(r.round, color=colour, alpha=0.25, linewidth=6, zorder=1)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0.0, 1.0)
    ax.grid(True, alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if rounds:
        ax.set_xlim(min(rounds) - 0.5, max(rounds) + 0.5)
    twin = ax.twinx()
    twin.plot(rounds, [r.test_loss for r in report.rounds], linestyle="--", color="#937860", linewidth=1,
              label="test loss")
    twin.set_ylabel("test loss")
    twin.set_ylim(bottom=0.0)
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="lower right", fontsize=8)
    return _png_uri(fig)


def functions_plot(report: RunReport) -> str:
    """Peak memory (left) and duration (right) of every function of every round, by stage; the cap dashed."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(10.0, 3.6)
    memory_ax, time_ax = fig.subplots(1, 2)
    offsets = {"client": -0.2, "aggregation": 0.0, "server": 0.2}
    for stage in STAGES:
        points = [(r.round + offsets[stage], f) for r in report.rounds for f in r.stage(stage)]
        peaks = [(x, f.peak_rss_bytes / MIB) for x, f in points if f.peak_rss_bytes]  # 0: died unmeasured
        colour = _STAGE_COLOURS[stage]
        if peaks:
            memory_ax.scatter(*zip(*peaks, strict=True), s=14, color=colour, label=stage, alpha=0.8)
        if points:
            time_ax.scatter([x for x, _ in points], [f.duration_s for _, f in points], s=14, color=colour,
                            label=stage, alpha=0.8)
    capped: dict[int, set[str]] = {}
    for f in (f for r in report.rounds for f in r.functions if f.memory_cap_bytes):
        capped.setdefault(f.memory_cap_bytes or 0, set()).add(f.stage)
    for cap, stages in sorted(capped.items()):
        memory_ax.axhline(cap / MIB, color=_CAP, linestyle="--", linewidth=1.2,
                          label=f"cap {cap / MIB:,.0f} MiB ({', '.join(s for s in STAGES if s in stages)})")
    memory_ax.set_ylabel("peak resident memory, MiB")
    time_ax.set_ylabel("duration, s")
    for ax in (memory_ax, time_ax):  # room above the points for the legend
        ax.set_ylim(0, ax.get_ylim()[1] * 1.35)
    for ax, title in ((memory_ax, "peak memory per function"), (time_ax, "duration per function")):
        ax.set_xlabel("round")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper left", ncols=2)
    return _png_uri(fig)


def plots(report: RunReport) -> dict[str, str | None]:
    """The page's plots as data URIs, or ``None`` each without matplotlib or without rounds."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return {"accuracy": None, "functions": None}
    if not report.rounds:
        return {"accuracy": None, "functions": None}
    has_functions = any(r.functions for r in report.rounds)
    return {"accuracy": accuracy_plot(report), "functions": functions_plot(report) if has_functions else None}


def _environment() -> Any:
    from gradshard.extras import require_extra

    require_extra("report", "gradshard report")
    from jinja2 import Environment, PackageLoader, StrictUndefined
    env = Environment(loader=PackageLoader("gradshard.report", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["mib"] = lambda b: "—" if b is None else f"{b / MIB:,.1f}"
    env.filters["pct"] = lambda x: "—" if x is None else f"{100 * x:.0f} %"
    return env


def config_rows(config: dict[str, Any]) -> list[tuple[str, str]]:
    """The run's settings a reader looks for first, as (name, value) text."""
    data, server, agg = config.get("data") or {}, config.get("server") or {}, config.get("aggregation") or {}
    per_round = config.get("per_round") or (f"fraction {config['fraction']}" if config.get("fraction") else "all")
    rows = [("model", config.get("model")),
            ("data", f"{data.get('name')}, {data.get('partition')}"
                     + (f" (α = {data.get('alpha')})" if data.get("partition") == "dirichlet" else "")),
            ("clients", f"{config.get('clients')}, per round: {per_round}"),
            ("rounds", config.get("rounds")),
            ("local training", f"{config.get('epochs')} epoch(s), batch {config.get('batch_size')}, "
                               f"lr {config.get('lr')}, momentum {config.get('momentum')}, μ {config.get('mu')}"),
            ("server optimizer", f"{server.get('name')}, lr {server.get('lr')}"),
            ("aggregation", f"{agg.get('topology')}"
                            + (f", M = {agg.get('shards')} ({agg.get('partition')})"
                               if agg.get("topology") == "sharded" else "")
                            + f", reducer {agg.get('reducer')}, weighting {agg.get('weighting')}, "
                              f"policy {agg.get('policy')}"),
            ("min clients, deadline", f"{config.get('min_clients')}, {config.get('deadline_s')} s"),
            ("seed", config.get("seed"))]
    if config.get("faults"):
        rows.append(("injected faults (testing)", ", ".join(f"{k}: {v}" for k, v in config["faults"].items())))
    return [(name, str(value)) for name, value in rows]


def render_html(report: RunReport) -> str:
    """The page of ``report`` (a str of HTML: autoescaped, self-contained)."""
    template = _environment().get_template(TEMPLATE)
    return str(template.render(report=report, config_rows=config_rows(report.config), plots=plots(report),
                               stages=STAGES, client_of=client_of))


def write_report(store: Store, out: Path | str, location: str = "") -> Path:
    """Collect the run in ``store``, render it, and write the page to ``out`` atomically (temp file + rename)."""
    path = Path(out)
    write_atomic(path, render_html(load_run_report(store, location)).encode("utf-8"))
    return path
