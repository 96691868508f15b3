"""Terminal rendering of invocation reports (rich tables) — presentation only, no logic."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table

from gradshard.runtime.report import InvocationReport

MIB = 1 << 20


def _mib(value: int | None) -> str:
    return "—" if value is None else f"{value / MIB:,.1f}"


def reports_table(reports: Sequence[InvocationReport], title: str = "") -> Table:
    """One row per invocation: outcome, time, measured peak memory against its cap, and store I/O."""
    table = Table(title=title or None, title_justify="left")
    for name, justify in [("invocation", "left"), ("ok", "center"), ("tries", "right"), ("time s", "right"),
                          ("peak MiB", "right"), ("cap MiB", "right"), ("read MiB", "right"),
                          ("written MiB", "right"), ("GETs", "right"), ("PUTs", "right"), ("error", "left")]:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for r in reports:
        error = "" if r.ok else f"{r.error_type}: {r.error}"
        table.add_row(r.invocation, "✓" if r.ok else "✗", str(r.attempts), f"{r.duration_s:.3f}",
                      _mib(r.peak_rss_bytes), _mib(r.memory_cap_bytes), _mib(r.bytes_read), _mib(r.bytes_written),
                      str(r.gets), str(r.puts), error[:80])
    return table
