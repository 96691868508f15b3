"""``gradshard train`` and the training demo through click's runner; the metrics writers and the config merge."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from gradshard.cli.main import main
from gradshard.cli.train import train_config
from gradshard.fl import report

# Small and quick: 4 clients, an MLP, one local epoch; sharded over 2 capped functions.
SMALL = ["--model", "mlp", "--clients", "4", "--epochs", "1", "--batch-size", "64", "--shards", "2",
         "--memory-mb", "256"]


def _train(*args: str) -> Result:
    return CliRunner().invoke(main, ["train", *args])


def _rows(out: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO((out / "metrics.csv").read_text())))


def _metrics(out: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / "metrics.json").read_text())
    return data


# --- through the command line (worker processes) -------------------------------------------------------------------
@pytest.mark.integration
def test_train_writes_metrics_json_csv_and_png(tmp_path: Path) -> None:
    out = tmp_path / "out"

    result = _train("--store", str(tmp_path / "store"), "--out", str(out), "--rounds", "2", *SMALL)

    assert result.exit_code == 0, result.output
    assert "round 1  test accuracy" in result.output
    assert "final test accuracy" in result.output
    rows = _rows(out)
    assert [r["round"] for r in rows] == ["0", "1"]
    assert tuple(rows[0]) == report.CSV_COLUMNS
    assert all(r["aggregated"] == "4" and r["rejected"] == "0" and r["failed"] == "0" for r in rows)
    data = _metrics(out)
    assert data["summary"]["rounds"] == 2
    assert data["summary"]["final_test_accuracy"] == pytest.approx(float(rows[1]["test_accuracy"]))
    assert data["config"]["aggregation"]["shards"] == 2
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.integration
def test_rerun_on_the_same_store_resumes_and_does_not_redo_rounds(tmp_path: Path) -> None:
    store = tmp_path / "store"

    first = _train("--store", str(store), "--rounds", "2", *SMALL)
    before = _metrics(store)["rounds"]
    stored = {r: (store / f"metrics/{r:06d}.json").read_bytes() for r in (0, 1)}
    second = _train("--store", str(store), "--rounds", "3", *SMALL)

    assert first.exit_code == 0, first.output
    assert second.exit_code == 0, second.output
    assert "resuming: rounds 0–1 are done" in second.output
    assert "round 0  test" not in second.output  # only round 2 ran
    after = _metrics(store)["rounds"]  # --out defaults to the store
    assert [m["round"] for m in after] == [0, 1, 2]
    assert after[:2] == before  # timings included: the rounds were not run again
    assert {r: (store / f"metrics/{r:06d}.json").read_bytes() for r in (0, 1)} == stored
    assert [r["round"] for r in _rows(store)] == ["0", "1", "2"]


@pytest.mark.integration
def test_a_toml_config_is_honoured_and_flags_override_it(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text('model = "mlp"\nclients = 3\nrounds = 5\nepochs = 1\nlr = 0.1\n\n'
                      '[data]\npartition = "iid"\n\n[server]\nname = "fedavgm"\nlr = 1.0\n\n'
                      '[aggregation]\nshards = 3\n')
    store = tmp_path / "store"

    result = _train("--config", str(config), "--store", str(store), "--rounds", "1", "--shards", "2")

    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    used = json.loads((store / "run/config.json").read_text())
    assert (used["model"], used["clients"], used["lr"], used["data"]["partition"]) == ("mlp", 3, 0.1, "iid")
    assert used["server"]["name"] == "fedavgm"  # from the TOML
    assert (used["rounds"], used["aggregation"]["shards"]) == (1, 2)  # flags win
    assert len(_metrics(store)["rounds"]) == 1
    assert (store / "server/000001/v.safetensors").exists()  # FedAvgM's momentum, in the store
    assert "mlp on digits (iid), 3 clients" in text


@pytest.mark.integration
def test_a_different_run_on_the_same_store_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "store"
    first = _train("--store", str(store), "--rounds", "1", *SMALL)

    second = _train("--store", str(store), "--rounds", "2", *SMALL, "--lr", "0.3")

    assert first.exit_code == 0, first.output
    assert second.exit_code == 3
    assert "differs in lr" in second.stderr


@pytest.mark.integration
def test_training_demo_runs_and_checks_the_last_round_against_flat(tmp_path: Path) -> None:
    out = tmp_path / "out"

    result = CliRunner().invoke(main, ["demo", "--clients", "4", "--rounds", "2", "--model", "mlp",
                                       "--out", str(out)])

    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # rich wraps long lines
    assert "GradsSharding M = 4" in text
    assert "bit-identical: round 1 recomputed with one flat aggregator" in text
    assert [r["round"] for r in _rows(out)] == ["0", "1"]


# --- errors before anything runs -------------------------------------------------------------------------------------
def test_bad_toml_syntax_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('model = "mlp"\nrounds = \n')

    result = _train("--config", str(config), "--store", str(tmp_path / "store"))

    assert result.exit_code == 2
    assert "Invalid value for '--config'" in result.output
    assert "bad.toml is not valid TOML" in result.output
    assert "line 2" in result.output
    assert not (tmp_path / "store" / "run").exists()


def test_unknown_or_invalid_toml_fields_are_named(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text('modle = "mlp"\nrounds = 0\n\n[data]\nalpha = -1\n')

    result = _train("--config", str(config), "--store", str(tmp_path / "store"))

    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "invalid training config" in text
    for field in ("modle:", "rounds:", "data.alpha:"):
        assert field in text


def test_demo_refuses_options_of_the_other_mode(tmp_path: Path) -> None:
    runner = CliRunner()

    training_only = runner.invoke(main, ["demo", "--aggregate-only", "--rounds", "3"])
    aggregate_only = runner.invoke(main, ["demo", "--layout", "mlp"])

    assert training_only.exit_code == 2 and "--rounds only apply to the training demo" in training_only.output
    assert aggregate_only.exit_code == 2 and "--layout only apply with --aggregate-only" in aggregate_only.output


# --- the pieces ----------------------------------------------------------------------------------------------------
def test_flags_override_nested_fields_and_per_round_replaces_fraction() -> None:
    base = {"clients": 10, "fraction": 0.5, "server": {"name": "fedadam", "lr": 0.01}, "data": {"alpha": 0.1}}

    config = train_config(base, {"per_round": 3, "server_lr": 0.05, "alpha": None, "topology": "flat",
                                 "deadline": 12.0}, "test")

    assert (config.per_round, config.fraction, config.sample_size()) == (3, None, 3)
    assert (config.server.name, config.server.lr) == ("fedadam", 0.05)
    assert config.data.alpha == 0.1  # an unset flag leaves the base alone
    assert (config.aggregation.topology, config.deadline_s) == ("flat", 12.0)
    assert base["fraction"] == 0.5  # the base is not modified


def _round(r: int, accuracy: float, **extra: Any) -> dict[str, Any]:
    return {"round": r, "cohort": ["a", "b", "c"], "aggregated": ["a", "b"], "rejected": {"c": "nan"},
            "failed": {}, "test_loss": 1.0 - accuracy, "test_accuracy": accuracy, "client_loss": None,
            "client_seconds": 1.0, "aggregate_seconds": 0.25, "server_seconds": 0.125, "wall_seconds": 1.5, **extra}


def test_report_writers_count_clients_and_summarise(tmp_path: Path) -> None:
    metrics = [_round(0, 0.5), _round(1, 0.75), _round(2, 0.7)]

    paths = report.write_outputs(tmp_path, metrics, {"model": "mlp"}, title="t")

    assert [p.name for p in paths] == ["metrics.json", "metrics.csv", "accuracy.png"]
    rows = _rows(tmp_path)
    assert (rows[0]["aggregated"], rows[0]["rejected"], rows[0]["failed"], rows[0]["client_loss"]) == ("2", "1", "0",
                                                                                                       "")
    data = _metrics(tmp_path)
    assert data["config"] == {"model": "mlp"}
    assert data["rounds"][0]["rejected"] == {"c": "nan"}
    s = data["summary"]
    assert (s["rounds"], s["final_test_accuracy"], s["best_test_accuracy"], s["best_round"]) == (3, 0.7, 0.75, 1)
    assert (s["total_wall_seconds"], s["mean_round_seconds"]) == (4.5, 1.5)
    assert not list(tmp_path.glob(".*.tmp"))


def test_report_of_no_rounds_is_valid() -> None:
    assert report.metrics_csv([]) == ",".join(report.CSV_COLUMNS) + "\n"
    assert json.loads(report.metrics_json([]))["summary"]["final_test_accuracy"] is None
    assert report.accuracy_png([])[:4] == b"\x89PNG"
