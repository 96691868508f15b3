"""``gradshard report``: one self-contained HTML page of a training run (one call: :func:`write_report`)."""

from __future__ import annotations

from pathlib import Path

import click

from gradshard.cli.common import HELP_OPTIONS, console, open_cli_store
from gradshard.cli.console import untrusted
from gradshard.store import LocalStore


@click.command(context_settings=HELP_OPTIONS)
@click.option("--store", "location", required=True,
              help="The training run's store: a directory or s3://bucket/prefix (as given to 'gradshard train').")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, writable=True), default="report.html",
              show_default=True, help="The HTML file to write (replaced atomically).")
def report(location: str, out_path: str) -> None:
    """Write one HTML page of a training run: config, accuracy and loss per round, clients per round (failed and
    rejected with reasons), functions' memory and time against the cap, predicted cloud cost, bit-identity checks.

    The page is self-contained (inline CSS, plots as embedded PNG, no scripts): open it in any browser, offline.
    """
    from gradshard.report.html import write_report

    store = open_cli_store(location, must_exist=True)
    where = str(store.root) if isinstance(store, LocalStore) else location
    written = write_report(store, Path(out_path), where)
    console.print(f"wrote {untrusted(written)}")
