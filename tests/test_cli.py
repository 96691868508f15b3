"""The gradshard command: demo and aggregate, through click's runner (real worker processes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from gradshard.cli.main import main
from gradshard.core.zoo import get_layout
from gradshard.demo.synthetic import make_round
from gradshard.store import LocalStore

pytestmark = pytest.mark.integration


def test_demo_reports_bit_identical_sharded_and_flat(tmp_path: Path) -> None:
    runner = CliRunner()

    result = runner.invoke(main, ["demo", "--aggregate-only", "--layout", "mlp", "--clients", "3", "--shards", "3",
                                  "--store", str(tmp_path / "store"), "--reports", str(tmp_path / "r.json")])

    assert result.exit_code == 0, result.output
    assert "bit-identical" in result.output
    reports = json.loads((tmp_path / "r.json").read_text())
    assert [r["invocation"] for r in reports["sharded"]] == ["shard-0000", "shard-0001", "shard-0002"]
    assert all(r["ok"] and r["peak_rss_bytes"] > 0 for r in reports["sharded"] + reports["flat"])


def test_aggregate_prints_table_and_writes_reports_json(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    make_round(store, 3, get_layout("synthetic-200000"), 4, seed=1)
    runner = CliRunner()

    result = runner.invoke(main, ["aggregate", "--store", str(store.root), "--round", "3", "--shards", "2",
                                  "--memory-mb", "512", "--reports", str(tmp_path / "reports.json")])

    assert result.exit_code == 0, result.output
    assert "shard-0001" in result.output
    assert "published rounds/000003/aggregate.safetensors from 4 clients" in result.output
    data = json.loads((tmp_path / "reports.json").read_text())
    assert data["summary"]["clients"] == 4
    assert len(data["reports"]) == 2
    assert store.exists("rounds/000003/reports.json")


def test_aggregate_of_a_round_that_was_never_opened_fails_with_a_clear_message(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()

    result = CliRunner().invoke(main, ["aggregate", "--store", str(tmp_path / "store"), "--round", "0"])

    assert result.exit_code == 3
    assert "round 0 has no rounds/000000/round.json" in result.stderr


def test_too_many_shards_is_refused_before_anything_runs(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    make_round(store, 0, get_layout("mlp"), 2)

    result = CliRunner().invoke(main, ["aggregate", "--store", str(store.root), "--round", "0", "--shards", "1000"])

    assert result.exit_code == 3
    assert "M = 1000 shards is more than" in result.stderr
    assert not store.exists("rounds/000000/aggregate.safetensors")
    assert not any((store.root / ".uploads").iterdir())


@pytest.mark.parametrize("shards", ["0", "-1", "four", "2.5"])
def test_shards_other_than_a_positive_number_or_auto_are_refused(tmp_path: Path, shards: str) -> None:
    result = CliRunner().invoke(main, ["aggregate", "--store", str(tmp_path), "--round", "0", "--shards", shards])

    assert result.exit_code == 2
    assert f"{shards!r} is neither a number of shards (at least 1) nor 'auto'" in result.stderr


def test_inspect_verifies_a_file_completely_and_names_corruption(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    make_round(store, 0, get_layout("mlp"), 2)
    path = store.root / "rounds/000000/updates/client-0001.safetensors"
    runner = CliRunner()

    good = runner.invoke(main, ["inspect", str(path), "--json"])
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 0xFF
    path.write_bytes(bytes(blob))
    bad = runner.invoke(main, ["inspect", str(path)])

    assert good.exit_code == 0, good.output
    info = json.loads(good.output)
    assert (info["client"], info["kind"], info["elements"], info["non_finite_values"]) == ("client-0001", "update",
                                                                                            9610, 0)
    assert info["chunks_verified"] > 1
    assert bad.exit_code == 3
    assert "checksum mismatch" in bad.stderr


@pytest.mark.parametrize("extra", [["--topology", "lambda-fl", "--group-size", "2"],
                                   ["--topology", "lifl", "--nodes", "3", "--warm"]])
def test_aggregate_runs_the_tree_baselines(tmp_path: Path, extra: list[str]) -> None:
    store = LocalStore(tmp_path / "store")
    make_round(store, 0, get_layout("mlp"), 5)

    result = CliRunner().invoke(main, ["aggregate", "--store", str(store.root), "--round", "0", *extra])

    assert result.exit_code == 0, result.output
    assert "published rounds/000000/aggregate.safetensors from 5 clients" in result.output
    assert ("root" if "lambda-fl" in extra else "top") in result.output


def test_every_command_loads_on_first_use_and_is_listed() -> None:
    # Execute: a fresh interpreter that only parses 'aggregate --help'
    code = ("import sys; from gradshard.cli.main import main; "
            "main(['aggregate', '--help'], standalone_mode=False); "
            "print(sorted(m for m in ('gradshard.cli.train', 'gradshard.cli.keys', 'gradshard.aggregation.compare') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    listed = CliRunner().invoke(main, ["--help"])

    # Assert: nothing of the other commands was imported; help still lists every command
    assert done.stdout.strip().endswith("[]")
    assert listed.exit_code == 0
    for name in ("aggregate", "inspect", "compare", "train", "report", "demo", "cost", "plan", "deploy", "gc", "keys"):
        assert f"  {name} " in listed.output
