"""Terminal rendering of invocation reports and comparisons (rich tables) — presentation only, no logic."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich import box
from rich.markup import escape
from rich.table import Table

from gradshard.runtime.report import InvocationReport
from gradshard.units import MIB

if TYPE_CHECKING:
    from gradshard.aggregation.compare import CompareResult, CompareRow

_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _visible(c: str) -> str:
    if not unicodedata.category(c).startswith("C"):
        return c
    return _SHORT_ESCAPES.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def printable(text: object) -> str:
    """``text`` on one line, every control character (ANSI escapes, newlines, carriage returns, ...) written as a
    visible escape such as ``\\x1b``: a string from a file or a server can neither forge an output line nor move
    the cursor or recolour the terminal."""
    return "".join(map(_visible, str(text)))


def untrusted(text: object) -> str:
    """An untrusted string (client ids, object names, reasons, error messages) made safe to embed in rich
    markup: printed literally, with control characters visible (:func:`printable`)."""
    return escape(printable(text))


def _mib(value: int | None) -> str:
    return "—" if value is None else f"{value / MIB:,.1f}"


def _dollars(value: float | None) -> str:
    return "—" if value is None else f"{value:,.3f}"


def reports_table(reports: Sequence[InvocationReport], title: str = "") -> Table:
    """One row per invocation: outcome, time, measured peak memory against its cap, and store I/O."""
    table = Table(title=title or None, title_justify="left")
    for name, justify in [("invocation", "left"), ("ok", "center"), ("tries", "right"), ("time s", "right"),
                          ("peak MiB", "right"), ("cap MiB", "right"), ("read MiB", "right"),
                          ("written MiB", "right"), ("GETs", "right"), ("PUTs", "right"), ("error", "left")]:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for r in reports:
        error = "" if r.ok else f"{r.error_type}: {r.error}"
        table.add_row(untrusted(r.invocation), "✓" if r.ok else "✗", str(r.attempts), f"{r.duration_s:.3f}",
                      _mib(r.peak_rss_bytes), _mib(r.memory_cap_bytes), _mib(r.bytes_read), _mib(r.bytes_written),
                      str(r.gets), str(r.puts), untrusted(error[:80]))
    return table


def agreement_text(row: CompareRow) -> str:
    """``reference``, ``exact``, ``max abs e / rel e``, or why there is no comparison."""
    if row.reference:
        return "reference"
    if row.status == "failed":
        return f"✗ {untrusted(row.error_type)}"
    if row.status == "skipped":
        return "not run"
    if row.exact:
        return "exact"
    if row.max_abs_error is None or row.max_rel_error is None:
        return "no reference"
    return f"{row.max_abs_error:.1e} / {row.max_rel_error:.1e}"


def compare_table(result: CompareResult, title: str = "") -> Table:
    """One row per architecture: shape, predicted and measured peak memory per function, time, traffic, agreement."""
    limit = "" if result.memory_limit_bytes is None else f", limit {_mib(result.memory_limit_bytes)} MiB"
    table = Table(title=title or f"round {result.round}: {result.clients} clients, "
                  f"{_mib(result.model_bytes)} MiB update, baseline {_mib(result.baseline_bytes)} MiB{limit}",
                  title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for name in ["architecture", "invocations", "levels", "peak MiB", "predicted MiB", "wall s", "read MiB",
                 "written MiB", "GETs", "PUTs", "shm MiB", "AWS $/1k pred.", "AWS $/1k meas.", "feasible",
                 "agreement"]:
        table.add_column(name, justify="left" if name in ("architecture", "agreement") else "right",
                         no_wrap=name in ("architecture", "agreement"))
    for row in result.rows:
        ran = row.status != "skipped"
        table.add_row(f"{row.architecture} ({row.shape})", str(row.invocations), str(row.levels),
                      _mib(row.peak_rss_bytes), _mib(row.predicted_peak_bytes),
                      "—" if row.wall_s is None else f"{row.wall_s:.2f}", _mib(row.bytes_read) if ran else "—",
                      _mib(row.bytes_written) if ran else "—", str(row.gets) if ran else "—",
                      str(row.puts) if ran else "—", _mib(row.shm_bytes) if ran else "—",
                      _dollars(row.cloud_predicted_per_1000), _dollars(row.cloud_measured_per_1000),
                      "yes" if row.feasible else "[red]no[/]", agreement_text(row))
    return table
