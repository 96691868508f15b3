"""Figures of a comparison, rendered with matplotlib's Agg backend to PNG bytes.

matplotlib is an optional dependency (``pip install gradshard[plots]``) and is imported inside the functions, so
importing gradshard never pulls it in. The figure is drawn on an explicit Agg canvas (no pyplot, no global
backend switch), so it works headless and leaves the caller's matplotlib state alone.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

from gradshard.extras import require_extra
from gradshard.units import MIB

if TYPE_CHECKING:
    from gradshard.aggregation.compare import CompareResult, CompareRow

_COLOURS = {"ok": "#4c72b0", "failed": "#c44e52", "skipped": "#dddddd"}
_STATUS_LEGEND = {"ok": "measured peak", "failed": "measured, failed under the cap", "skipped": "not run (predicted)"}
_LIMIT_COLOUR = "#c44e52"


def _memory_panel(ax: Any, result: CompareResult) -> None:
    """Measured peak per function (bars; the prediction, hatched, where not run), predicted need, baseline, limit."""
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    rows = result.rows
    xs = list(range(len(rows)))
    predicted = [r.predicted_peak_bytes / MIB for r in rows]
    heights = [r.peak_rss_bytes / MIB if r.peak_rss_bytes is not None else p for r, p in zip(rows, predicted,
                                                                                               strict=True)]
    bars = ax.bar(xs, heights, color=[_COLOURS[r.status] for r in rows], edgecolor="#333333", linewidth=0.6)
    ax.hlines(predicted, [x - 0.4 for x in xs], [x + 0.4 for x in xs], colors="black", linewidth=1.5, zorder=3)
    for bar, row, need in zip(bars, rows, predicted, strict=True):
        if row.status == "skipped":
            bar.set_hatch("//")
        ax.annotate(_memory_label(row), (bar.get_x() + bar.get_width() / 2, max(bar.get_height(), need)),
                    xytext=(0, 3), textcoords="offset points", ha="center", va="bottom", fontsize=8,
                    color="black" if row.feasible else _LIMIT_COLOUR)
    used = {r.status for r in rows}
    handles = [Patch(facecolor=_COLOURS[status], edgecolor="#333333", hatch="//" if status == "skipped" else None,
                     label=label) for status, label in _STATUS_LEGEND.items() if status in used]
    handles.append(ax.plot([], [], color="black", linewidth=1.5, label="predicted need + baseline")[0])
    handles.append(ax.axhline(result.baseline_bytes / MIB, color="#888888", linestyle=":", linewidth=1,
                              label=f"interpreter baseline ({result.baseline_bytes / MIB:.0f} MiB)"))
    if result.memory_limit_bytes is not None:
        handles.append(ax.axhline(result.memory_limit_bytes / MIB, color=_LIMIT_COLOUR, linestyle="--",
                                  linewidth=1.2, label=f"memory limit ({result.memory_limit_bytes / MIB:,.0f} MiB)"))
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel("peak memory per function, MiB (log scale)")
    ax.set_title("largest function's resident memory")
    top = max([*heights, *predicted, (result.memory_limit_bytes or 0) / MIB])
    ax.set_ylim(result.baseline_bytes / MIB / 1.5, top * 4)
    ax.legend(handles=handles, loc="upper left", fontsize=8, frameon=False, ncols=2)


def _memory_label(row: CompareRow) -> str:
    if row.status == "skipped":
        return f"not run\nneeds {row.predicted_peak_bytes / MIB:,.0f} MiB"
    value = f"{(row.peak_rss_bytes or 0) / MIB:,.0f} MiB"
    return f"{value}\n{row.error_type}" if row.status == "failed" else value


def _time_panel(ax: Any, result: CompareResult) -> None:
    """Wall time of each architecture's run; failed runs in red (time until the failure), skipped ones marked."""
    rows = result.rows
    heights = [r.wall_s or 0.0 for r in rows]
    bars = ax.bar(range(len(rows)), heights, color=[_COLOURS[r.status] for r in rows], edgecolor="#333333",
                  linewidth=0.6)
    for bar, row in zip(bars, rows, strict=True):
        label = {"ok": f"{row.wall_s or 0:.2f} s", "failed": f"failed after\n{row.wall_s or 0:.2f} s",
                 "skipped": "not run"}[row.status]
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), xytext=(0, 3),
                    textcoords="offset points", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("wall time, s")
    ax.set_title("wall time of the round")
    ax.set_ylim(0, max([*heights, 1e-3]) * 1.3)


def compare_png(result: CompareResult, *, dpi: int = 120) -> bytes:
    """Two panels, peak memory per function and wall time, one bar per architecture; returns the PNG bytes."""
    require_extra("plots", "the comparison plot (compare.png)")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    memory_ax, time_ax = fig.subplots(1, 2)
    _memory_panel(memory_ax, result)
    _time_panel(time_ax, result)
    labels = [f"{r.architecture}\n{r.shape}" for r in result.rows]
    for ax in (memory_ax, time_ax):
        ax.set_xticks(range(len(result.rows)), labels, fontsize=9)
        for tick, row in zip(ax.get_xticklabels(), result.rows, strict=True):
            tick.set_color("black" if row.feasible else _LIMIT_COLOUR)
        ax.spines[["top", "right"]].set_visible(False)
    limit = "no memory limit" if result.memory_limit_bytes is None else (
        f"limit {result.memory_limit_bytes / MIB:,.0f} MiB per function (red labels: predicted infeasible)")
    fig.suptitle(f"round {result.round}: {result.clients} clients × {result.model_bytes / MIB:,.1f} MiB update, "
                 f"{limit}", fontsize=11)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
