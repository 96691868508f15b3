"""Hardening of the gradshard command: untrusted strings, exit codes and one-line errors, config validation, S3."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gradshard.cli.main import main
from gradshard.core.zoo import get_layout
from gradshard.demo.synthetic import make_round
from gradshard.format.keys import update_key
from gradshard.format.round import load_spec
from gradshard.format.update import UpdateMeta
from gradshard.format.writer import UpdateWriter
from gradshard.store import LocalStore

HOSTILE = ["[/]", "[bold]x", "\x1b[31mred"]


def _misfiled_round(store: LocalStore, r: int = 0) -> list[Path]:
    """A round of 4 clients; clients 1-3 are filed under their own ids but their metadata names a hostile one."""
    layout = get_layout("synthetic-1000")
    make_round(store, r, layout, 4)
    spec = load_spec(store, r)
    layout = spec.model_layout()
    paths = []
    for i, name in enumerate(HOSTILE, start=1):
        key = update_key(r, f"client-{i:04d}")
        store.delete(key)
        meta = UpdateMeta(client=name, round=r, examples=5, layout_digest=layout.digest(),
                          chunk_elems=spec.chunk_elems, base_model=spec.base_model, digest=spec.digest)
        with UpdateWriter(store, key, layout, meta) as writer:
            writer.write(np.zeros(layout.numel, dtype=layout.flat_dtype))
            writer.commit()
        paths.append(store.root / key)
    return paths


# --- item 3: untrusted strings are printed literally ----------------------------------------------------------
def test_aggregate_prints_hostile_client_names_literally_and_writes_the_reports_file(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    _misfiled_round(store)

    result = CliRunner().invoke(main, ["aggregate", "--store", str(store.root), "--round", "0", "--shards", "2",
                                       "--executor", "inline", "--reports", str(tmp_path / "r.json")])

    assert result.exit_code == 0, result.output
    assert "its metadata names '[/]'" in result.output
    assert "its metadata names '[bold]x'" in result.output
    assert "\x1b" not in result.output
    assert "its metadata names '\\x1b[31mred'" in result.output
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["clients"] == 1


@pytest.mark.parametrize("hostile", range(len(HOSTILE)))
def test_inspect_prints_a_hostile_client_name_literally(tmp_path: Path, hostile: int) -> None:
    path = _misfiled_round(LocalStore(tmp_path / "store"))[hostile]

    result = CliRunner().invoke(main, ["inspect", str(path)])

    assert result.exit_code == 0, result.output
    shown = HOSTILE[hostile].replace("\x1b", "\\x1b")
    assert f"client: {shown}\n" in result.output


def test_a_training_round_line_shows_hostile_failure_reasons_literally() -> None:
    from rich.console import Console

    from gradshard.cli.train import _round_line
    from gradshard.fl.driver import RoundMetrics

    m = RoundMetrics(round=0, cohort=["a", "b"], aggregated=["a"], rejected={"b": "names '[/]'"},
                     failed={"c": "RuntimeError: [bold]x\x1b[2J\nround 9 test accuracy 1.0"}, test_loss=0.1,
                     test_accuracy=0.9, client_loss=None, client_seconds=0, aggregate_seconds=0,
                     server_seconds=0, wall_seconds=0)
    console = Console(record=True, width=200)

    console.print(_round_line(m, 1))

    text = console.export_text()
    assert "b rejected (names '[/]')" in text
    assert "c failed (RuntimeError: [bold]x\\x1b[2J\\nround 9 test accuracy 1.0)" in text
