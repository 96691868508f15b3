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
from gradshard.errors import StoreError
from gradshard.format.keys import update_key
from gradshard.format.round import load_spec
from gradshard.format.update import UpdateMeta
from gradshard.format.writer import UpdateWriter
from gradshard.store import LocalStore, Store

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
                     server_seconds=0, wall_seconds=0, idle={"d": "budget [red]0[/] MiB"})
    console = Console(record=True, width=200)

    console.print(_round_line(m, 1, "plugin says [bold]hi"))

    text = console.export_text()
    assert "d sat out (budget [red]0[/] MiB)" in text and "plugin says [bold]hi" in text
    assert "b rejected (names '[/]')" in text
    assert "c failed (RuntimeError: [bold]x\\x1b[2J\\nround 9 test accuracy 1.0)" in text


# --- item 16: conventions: -h, --version, one-line errors on stderr, exit codes, -v / -q ---------------------------
def _commands() -> list[list[str]]:
    import click

    paths: list[list[str]] = [[]]
    for name, command in main.commands.items():
        paths.append([name])
        if isinstance(command, click.Group):
            paths += [[name, sub] for sub in command.commands]
    return paths


@pytest.mark.parametrize("path", _commands(), ids=" ".join)
def test_every_command_takes_dash_h(path: list[str]) -> None:
    result = CliRunner().invoke(main, [*path, "-h"])

    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage: ")


def test_top_level_help_documents_the_exit_codes_and_version_is_printed() -> None:
    import gradshard

    help_text = CliRunner().invoke(main, ["--help"]).output
    version = CliRunner().invoke(main, ["--version"])

    assert "Exit codes: 0" in help_text and "130 interrupted" in help_text
    assert version.exit_code == 0 and gradshard.__version__ in version.output


def test_a_gradshard_error_is_one_line_on_stderr_with_exit_code_3(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()

    result = CliRunner().invoke(main, ["aggregate", "--store", str(tmp_path / "store"), "--round", "0"])

    assert result.exit_code == 3
    assert result.stderr.startswith("error: round 0 has no rounds/000000/round.json")
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.output


def test_a_usage_error_is_one_line_on_stderr_with_exit_code_2() -> None:
    result = CliRunner().invoke(main, ["aggregate", "--round", "0"])

    assert result.exit_code == 2
    assert result.stderr == "error: Missing option '--store'. (see 'main aggregate -h')\n"
    assert result.stdout == ""


def test_an_error_of_a_json_run_leaves_stdout_clean() -> None:
    result = CliRunner().invoke(main, ["cost", "--json", "--arch", "lambda-fl", "-N", "20", "-M", "1",
                                       "--memory-mb", "1024", "--durations", "1,2,3"])

    assert result.exit_code == 3
    assert result.stdout == ""
    assert result.stderr.startswith("error: lambda-fl with N = 20, M = 1 has 5 functions, got 3 durations")


@pytest.mark.parametrize("as_json", [[], ["--json"]])
def test_plan_with_nothing_feasible_exits_1(as_json: list[str]) -> None:
    result = CliRunner().invoke(main, ["plan", "--params", "1e13", "--memory-limit", "128", "--max-shards", "1",
                                       *as_json])

    assert result.exit_code == 1, result.output
    if as_json:
        assert json.loads(result.stdout)["recommended"] is None


def test_inspect_json_of_non_finite_values_exits_1(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    _misfiled_round(store)
    spec = load_spec(store, 0)
    layout = spec.model_layout()
    key = update_key(0, "client-0000")
    store.delete(key)
    meta = UpdateMeta(client="client-0000", round=0, examples=5, layout_digest=layout.digest(),
                      chunk_elems=spec.chunk_elems, base_model=spec.base_model, digest=spec.digest)
    with UpdateWriter(store, key, layout, meta) as writer:
        writer.write(np.full(layout.numel, np.nan, dtype=layout.flat_dtype))
        writer.commit()

    result = CliRunner().invoke(main, ["inspect", "--json", str(store.root / key)])

    assert result.exit_code == 1
    assert json.loads(result.stdout)["non_finite_values"] == layout.numel


def test_an_interrupt_exits_130(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = _misfiled_round(LocalStore(tmp_path / "store"))[0]

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("gradshard.cli.aggregate.inspect_update", interrupted)
    result = CliRunner().invoke(main, ["inspect", str(path)])

    assert result.exit_code == 130
    assert result.stderr.endswith("error: interrupted\n")


@pytest.mark.parametrize(("flags", "info", "warning"), [([], False, True), (["-v"], True, True),
                                                        (["-q"], False, False)])
def test_verbose_logs_round_plan_and_runs_and_quiet_only_errors(tmp_path: Path, flags: list[str], info: bool,
                                                                warning: bool) -> None:
    store = LocalStore(tmp_path / "store")
    _misfiled_round(store)

    result = CliRunner().invoke(main, [*flags, "aggregate", "--store", str(store.root), "--round", "0",
                                       "--shards", "2", "--executor", "inline"])

    assert result.exit_code == 0, result.output
    assert ("INFO gradshard.aggregation.driver: round 0: 1 client updates accepted, 3 rejected" in result.stderr) \
        == info
    assert ("INFO gradshard.aggregation.driver: round 0: plan sharded of 2 invocations (m=2, numel=" in result.stderr
            and ") over 1 clients" in result.stderr) == info
    assert ("round 0, run 1: 2 of 2 invocations ok" in result.stderr) == info
    assert ("WARNING gradshard.format.round: update of client 'client-0001' rejected" in result.stderr) == warning
    assert "\x1b" not in result.stderr


def test_the_gradshard_entry_point_exits_with_the_error_code(tmp_path: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "gradshard.cli", "inspect", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=60)

    assert done.returncode == 2
    assert done.stderr.startswith("error: Invalid value for 'PATH'")
    assert "(see 'gradshard inspect -h')" in done.stderr


# --- item 18: one default Lambda runtime ---------------------------------------------------------------------------
def test_library_and_cli_deploy_the_same_default_runtime(tmp_path: Path) -> None:
    import yaml

    from gradshard.deploy.aws import write_aws_deployment

    write_aws_deployment(tmp_path / "lib", vendor=False)
    cli = CliRunner().invoke(main, ["deploy", "aws", "--out", str(tmp_path / "cli"), "--no-vendor"])

    assert cli.exit_code == 0, cli.output
    runtimes = {yaml.safe_load((tmp_path / where / "template.yaml").read_text())["Resources"]["Function"]
                ["Properties"]["Runtime"] for where in ("lib", "cli")}
    assert runtimes == {"python3.12"}  # python3.11 (Amazon Linux 2) has too old a glibc for the pinned numpy


# --- item 17: the CIFAR-sized models train on digits; config validation ------------------------------------------
@pytest.mark.slow
def test_resnet18_trains_a_round_on_digits(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["train", "--store", str(tmp_path / "store"), "--model", "resnet18",
                                       "--clients", "2", "--rounds", "1", "--epochs", "1", "--batch-size", "64",
                                       "--shards", "2"])

    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "store" / "metrics.json").read_text())["rounds"][0]["aggregated"] == [
        "client-0000", "client-0001"]


def test_the_vgg16_input_is_a_32x32_image_its_features_can_halve_five_times() -> None:
    import torch

    from gradshard.fl.builtin import shape_for
    from gradshard.fl.data import Dataset
    from gradshard.fl.models import build_model

    x = np.arange(2 * 64, dtype=np.float32).reshape(2, 64)

    image = shape_for("vgg16", Dataset(x, np.zeros(2, dtype=np.int64), 10)).x

    assert image.shape == (2, 3, 32, 32) and image.flags.c_contiguous
    assert image[1, 2, 31, 31] == x[1, 63] and image[0, 0, 4, 0] == x[0, 8]
    features = build_model("vgg16").features  # type: ignore[union-attr]
    assert features(torch.from_numpy(image)).shape == (2, 512, 1, 1)


@pytest.mark.parametrize(("toml", "message"), [
    ("rounds = true", "rounds: Input should be a valid integer"),
    ("clients = 4\nmin_clients = 5", "min_clients = 5 is more than the 4 clients a round samples"),
    ("clients = 4\nper_round = 2\nmin_clients = 3", "min_clients = 3 is more than the 2 clients"),
    ("per_round = 2\nfraction = 0.5", "per_round = 2 and fraction = 0.5 are both set; keep one"),
    ("lr = false", "lr: Input should be a valid number"),
])
def test_train_refuses_an_invalid_config_in_one_line(tmp_path: Path, toml: str, message: str) -> None:
    config = tmp_path / "run.toml"
    config.write_text(toml + "\n")

    result = CliRunner().invoke(main, ["train", "--config", str(config), "--store", str(tmp_path / "store")])

    assert result.exit_code == 2
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())


def test_cost_refuses_negative_durations() -> None:
    result = CliRunner().invoke(main, ["cost", "-N", "4", "-M", "2", "--memory-mb", "1024",
                                       "--durations", "1.5,-2"])

    assert result.exit_code == 2
    assert "--durations" in result.stderr and "-2" in result.stderr and "negative" in result.stderr


@pytest.mark.slow
def test_train_exits_1_when_no_update_was_aggregated_in_any_round(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text('clients = 2\nrounds = 1\nepochs = 1\n[faults]\nclient-0000 = "crash"\nclient-0001 = "crash"\n')

    result = CliRunner().invoke(main, ["train", "--config", str(config), "--store", str(tmp_path / "store")])

    assert result.exit_code == 1, result.output
    assert "no client update was aggregated in any round" in result.stdout


# --- item 12: S3 failures through the command line ------------------------------------------------------------
def _aggregate_s3(location: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["aggregate", "--store", location, "--round", "0", "--executor", "inline"])
    return result.exit_code, result.stdout, result.stderr


def test_s3_missing_bucket_is_one_line_exit_3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)

    code, _, stderr = _aggregate_s3("s3://no-such-bucket-h11/run")

    assert code == 3
    assert stderr.startswith("error: bucket 'no-such-bucket-h11' does not exist at http://127.0.0.1")
    assert stderr.count("\n") == 1


def test_s3_refused_credentials_are_one_line_exit_3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from s3_server import BAD_ACCESS_KEY, FaultProxy

    proxy = FaultProxy(s3_endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", BAD_ACCESS_KEY)
    try:
        code, _, stderr = _aggregate_s3("s3://some-bucket/run")
    finally:
        proxy.close()

    assert code == 3
    assert stderr.startswith("error: checking bucket 'some-bucket': S3 refused access to s3://some-bucket/run/")
    assert stderr.count("\n") == 1


def test_s3_missing_credentials_are_one_line_exit_3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))

    code, _, stderr = _aggregate_s3("s3://some-bucket/run")

    assert code == 3
    assert stderr.startswith("error: checking bucket 'some-bucket': no usable AWS credentials for s3://some-bucket/")
    assert stderr.count("\n") == 1


def test_an_unreachable_s3_endpoint_fails_in_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    started = time.perf_counter()

    code, _, stderr = _aggregate_s3("s3://some-bucket/run")

    assert code == 3
    assert time.perf_counter() - started < 8
    assert stderr.startswith(f"error: checking bucket 'some-bucket': cannot reach the S3 endpoint for "
                             f"s3://some-bucket/run/ at http://127.0.0.1:{port}")
    assert stderr.count("\n") == 1


def test_demo_refuses_an_s3_store_and_creates_no_local_folder(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    result = CliRunner().invoke(main, ["demo", "--aggregate-only", "--store", "s3://b/x"])

    assert result.exit_code == 2
    assert "the demo runs on a local directory" in result.stderr
    assert list(tmp_path.iterdir()) == []


class _DyingStore(LocalStore):
    """A store whose server goes away: once ``dead``, every list and delete fails."""

    dead = False

    def list(self, prefix: str = "") -> list[str]:
        if self.dead:
            raise StoreError("connection refused (server gone)")
        return super().list(prefix)

    def delete(self, key: str) -> None:
        if self.dead:
            raise StoreError("connection refused (server gone)")
        super().delete(key)


def test_a_store_dying_mid_round_reports_why_the_round_failed_not_the_cleanup(tmp_path: Path) -> None:
    from gradshard.aggregation.driver import AggregateConfig, aggregate_round
    from gradshard.runtime import InlineExecutor
    from gradshard.runtime.executor import ProgressCallback
    from gradshard.runtime.report import InvocationReport
    from gradshard.topology import Plan

    class KilledMidRound(InlineExecutor):
        def run(self, plan: Plan, store: Store, on_done: ProgressCallback | None = None) -> list[InvocationReport]:
            store.dead = True  # type: ignore[attr-defined]
            raise StoreError("reading object 'rounds/000000/updates/client-0000.safetensors': the server is gone")

    store = _DyingStore(tmp_path / "store")
    make_round(store, 0, get_layout("synthetic-1000"), 2)

    with pytest.raises(StoreError, match="the server is gone"):
        aggregate_round(store, 0, KilledMidRound(), AggregateConfig(topology="lambda-fl"))
