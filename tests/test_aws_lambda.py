"""Tests of the AWS Lambda support: the invoke contract's handler, the LambdaExecutor and the deployment files.

AWS cannot be reached from here. The executor talks to a local emulator of the Lambda Invoke API
(tests/lambda_emulator.py) that runs the real handler from the unzipped package.zip in an isolated interpreter;
the template is checked with cfn-lint. The package is built once per module (a few seconds).
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cfnlint.api
import pytest
import yaml
from click.testing import CliRunner
from conftest import new_s3_store
from lambda_emulator import Function, LambdaEmulator

from gradshard.aggregation.driver import AggregateConfig, aggregate_round
from gradshard.cli.main import main
from gradshard.core.zoo import synthetic
from gradshard.demo.synthetic import make_round
from gradshard.deploy.aws import LAMBDA_RUNTIMES, cloudformation_template, to_yaml, write_aws_deployment
from gradshard.errors import GradshardError
from gradshard.format.keys import aggregate_key
from gradshard.runtime import LocalExecutor
from gradshard.runtime.aws_lambda import CONTRACT, LambdaExecutor, handler, invoke_event
from gradshard.store import LocalStore, MemoryStore, S3Store
from gradshard.topology.base import Invocation, Plan
from gradshard.units import MIB

FUNCTION = "gradshard-test"
SHORT = "gradshard-short"  # a function with a 2 s timeout


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """package.zip and friends, vendored from this environment (its CPython; glibc check off: for local emulation)."""
    out = tmp_path_factory.mktemp("deploy")
    write_aws_deployment(out, memory_mb=1024, runtime=f"python3.{sys.version_info.minor}", check_glibc=False)
    return out


@pytest.fixture(scope="module")
def package_dir(deployment: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("package")
    with zipfile.ZipFile(deployment / "package.zip") as archive:
        archive.extractall(target)
    return target


@pytest.fixture
def emulator(package_dir: Path) -> Iterator[LambdaEmulator]:
    functions = {FUNCTION: Function(FUNCTION, package_dir, memory_mb=1024, timeout_s=60.0),
                 SHORT: Function(SHORT, package_dir, memory_mb=1024, timeout_s=2.0)}
    with LambdaEmulator(functions) as running:
        yield running


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy credentials and region, and no config files, so boto3 never looks for real ones."""
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


def make_executor(emulator: LambdaEmulator, **options: Any) -> LambdaExecutor:
    options = {"region": "us-east-1", "allow_local_store": True, "workers": 2, "timeout_s": 60.0, **options}
    return LambdaExecutor(options.pop("function_name", FUNCTION), endpoint_url=emulator.endpoint_url, **options)


def adhoc(function: str, args: dict[str, Any] | None = None, memory_bytes: int = 0) -> Plan:
    return Plan("adhoc", (Invocation("only", function, args or {}, memory_bytes),))


class NoCalls:
    """A Lambda client that fails the test if anything is invoked."""

    def invoke(self, **kwargs: Any) -> Any:
        raise AssertionError(f"Lambda was invoked: {kwargs}")


# --- the handler -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("event", "named"), [
    ({"contract": 2, "invocation": "a", "function": "noop", "args": {}, "store": {}}, "field 'contract'"),
    ({"contract": 1, "invocation": "a", "function": "noop", "args": {}}, "field 'store'"),
    ({"contract": 1, "invocation": "a", "function": "noop", "args": {}, "store": {}, "x": 1}, "field 'x'"),
    ({"contract": 1, "invocation": "a", "function": "noop", "args": [], "store": {}}, "field 'args'"),
    ({"contract": 1, "invocation": "a", "function": "nope", "args": {}, "store": {}}, "unknown function 'nope'"),
    ("not an event", "the invoke event"),
])
def test_bad_events_get_a_clear_error_naming_the_field(event: Any, named: str) -> None:
    # Execute
    response = handler(event, None)

    # Assert
    assert response["ok"] is False
    assert response["error_type"] == "ValidationError"  # deterministic: the executor does not retry it
    assert named in response["error"]
    assert "Traceback" not in response["error"]


def test_handler_runs_the_contract_and_adds_the_context(tmp_path: Path) -> None:
    # Prepare
    class Context:
        aws_request_id = "req-1"
        memory_limit_in_mb = "2048"  # Lambda's Python runtime gives a string

    store = LocalStore(tmp_path, fsync=False)
    event = invoke_event(Invocation("only", "noop", {}, 0), store.spec())

    # Execute
    response = handler(json.loads(json.dumps(event)), Context())

    # Assert
    assert event["contract"] == CONTRACT
    assert response["ok"] is True, response
    assert response["request_id"] == "req-1"
    assert response["memory_limit_mb"] == 2048
    assert set(response) >= {"result", "duration_s", "io", "peak_rss_bytes"}


# --- the executor, without any Lambda ----------------------------------------------------------------------------
def test_invocation_over_the_function_memory_is_refused_at_once(tmp_path: Path) -> None:
    # Prepare
    executor = LambdaExecutor(FUNCTION, memory_mb=512, baseline_mb=128, allow_local_store=True, client=NoCalls())

    # Execute
    (report,) = executor.run(adhoc("noop", memory_bytes=400 * MIB), LocalStore(tmp_path, fsync=False))

    # Assert
    assert not report.ok
    assert report.error_type == "MemoryLimitError"
    assert report.attempts == 1
    assert "528 MiB" in (report.error or "") and "512 MiB" in (report.error or "")


@pytest.mark.parametrize(("store_kind", "allow_local"), [("memory", True), ("local", False), ("s3-loopback", False)])
def test_stores_a_lambda_cannot_reach_are_refused(tmp_path: Path, store_kind: str, allow_local: bool) -> None:
    # Prepare
    stores = {"memory": MemoryStore, "local": lambda: LocalStore(tmp_path, fsync=False),
              "s3-loopback": lambda: S3Store("bucket", "run", endpoint_url="http://127.0.0.1:9")}
    store = stores[store_kind]()
    executor = LambdaExecutor(FUNCTION, memory_mb=1024, allow_local_store=allow_local, client=NoCalls())

    # Execute
    (report,) = executor.run(adhoc("noop"), store)

    # Assert
    assert report.error_type == "PlanError"
    assert report.attempts == 1
    assert "cannot reach" in (report.error or "")


# --- the executor through the local Invoke-API emulator ----------------------------------------------------------
@pytest.mark.integration
@pytest.mark.usefixtures("aws_env")
def test_round_through_the_contract_is_byte_identical_to_the_local_executor(
        tmp_path: Path, emulator: LambdaEmulator) -> None:
    # Prepare: one round, copied, so each executor aggregates its own
    layout = synthetic(300_000, tensor_elems=70_000)
    make_round(LocalStore(tmp_path / "local", fsync=False), 0, layout, 5, seed=3)
    shutil.copytree(tmp_path / "local", tmp_path / "lambda")
    local_store, lambda_store = (LocalStore(tmp_path / name, fsync=False) for name in ("local", "lambda"))
    config = AggregateConfig(topology="sharded", shards=3)
    executor = make_executor(emulator)  # memory read from the function's configuration

    # Execute
    with LocalExecutor(workers=2, retries=0) as local:
        expected = aggregate_round(local_store, 0, local, config)
    result = aggregate_round(lambda_store, 0, executor, config)

    # Assert
    assert executor.memory_mb == 1024
    assert lambda_store.get(aggregate_key(0)) == local_store.get(aggregate_key(0))
    assert len(result.reports) == len(expected.reports) == 3
    assert [c.status for c in emulator.calls] == ["ok"] * 3
    for report in result.reports:
        assert report.ok, report.error
        assert report.memory_cap_bytes == 1024 * MIB
        assert report.peak_rss_bytes is not None and report.peak_rss_bytes > 10 * MIB
        assert report.bytes_read > 0 and report.bytes_written > 0


@pytest.mark.integration
@pytest.mark.usefixtures("aws_env")
def test_round_on_s3_through_the_contract_uses_the_vendored_boto3(
        tmp_path: Path, emulator: LambdaEmulator, s3_store: S3Store) -> None:
    # Prepare: the same round (same seed) on the local S3 server and in a local directory
    layout = synthetic(200_000, tensor_elems=50_000)
    local_store = LocalStore(tmp_path, fsync=False)
    for store in (s3_store, local_store):
        make_round(store, 0, layout, 5, seed=5)
    config = AggregateConfig(topology="sharded", shards=2)

    # Execute
    with LocalExecutor(workers=2, retries=0) as local:
        aggregate_round(local_store, 0, local, config)
    result = aggregate_round(s3_store, 0, make_executor(emulator, memory_mb=1024), config)

    # Assert
    assert s3_store.get(aggregate_key(0)) == local_store.get(aggregate_key(0))
    assert all(r.ok and r.gets > 0 for r in result.reports), [r.error for r in result.reports]


@pytest.mark.integration
@pytest.mark.usefixtures("aws_env")
def test_function_error_gives_a_retryable_failed_report(tmp_path: Path, emulator: LambdaEmulator) -> None:
    # Prepare
    executor = make_executor(emulator, memory_mb=1024, retries=1)

    # Execute
    (report,) = executor.run(adhoc("crash"), LocalStore(tmp_path, fsync=False))

    # Assert
    assert not report.ok
    assert report.error_type == "LambdaFunctionError"
    assert report.retryable
    assert report.attempts == 2
    assert "Unhandled" in (report.error or "") and "exit status 3" in (report.error or "")


@pytest.mark.integration
@pytest.mark.usefixtures("aws_env")
def test_function_timeout_gives_a_retryable_failed_report(tmp_path: Path, emulator: LambdaEmulator) -> None:
    # Prepare
    executor = make_executor(emulator, function_name=SHORT, memory_mb=1024, retries=0)

    # Execute
    (report,) = executor.run(adhoc("sleep", {"seconds": 30}), LocalStore(tmp_path, fsync=False))

    # Assert
    assert report.error_type == "LambdaFunctionError"
    assert report.retryable
    assert "Sandbox.Timedout" in (report.error or "") and "timed out after 2.00 seconds" in (report.error or "")
    assert report.wall_s < 10


@pytest.mark.integration
@pytest.mark.usefixtures("aws_env")
def test_missing_function_is_reported_by_name(tmp_path: Path, emulator: LambdaEmulator) -> None:
    # Prepare
    executor = make_executor(emulator, function_name="no-such-function", memory_mb=1024, retries=0)

    # Execute
    (report,) = executor.run(adhoc("noop"), LocalStore(tmp_path, fsync=False))

    # Assert
    assert report.error_type == "ResourceNotFoundException"
    assert "no-such-function" in (report.error or "") and "deploy" in (report.error or "")
    assert emulator.calls == []


@pytest.mark.usefixtures("aws_env")
def test_reading_the_memory_of_a_missing_function_fails_clearly(emulator: LambdaEmulator) -> None:
    with pytest.raises(GradshardError, match="no-such-function"):
        make_executor(emulator, function_name="no-such-function")


# --- deployment files --------------------------------------------------------------------------------------------
def lint_problems(template_text: str) -> list[str]:
    """cfn-lint's errors and warnings (informational matches left out)."""
    matches = cfnlint.api.lint(template_text, regions=["us-east-1"])
    return [str(m) for m in matches if m.rule.id[0] in "EW"]


def test_template_passes_cfn_lint(deployment: Path) -> None:
    # Execute
    text = (deployment / "template.yaml").read_text()

    # Assert
    assert lint_problems(text) == []
    template = yaml.safe_load(text)
    function = template["Resources"]["Function"]["Properties"]
    assert function["Handler"] == "gradshard.runtime.aws_lambda.handler"
    assert function["Runtime"] == f"python3.{sys.version_info.minor}"
    assert template["Parameters"]["MemorySize"]["Default"] == 1024
    code_key = template["Parameters"]["CodeKey"]["Default"]
    assert code_key.startswith("gradshard/package-") and code_key in (deployment / "DEPLOY.md").read_text()


def test_cfn_lint_catches_a_broken_template() -> None:
    # Prepare
    template = cloudformation_template(memory_mb=3008, timeout_s=900, architecture="x86_64", runtime="python3.11",
                                       code_key="k")
    template["Parameters"]["MemorySize"]["Default"] = 20_000  # above Lambda's 10240

    # Execute
    problems = lint_problems(to_yaml(template))

    # Assert
    assert any("E2015" in p for p in problems), problems


def test_template_yaml_reads_back_as_written() -> None:
    template = cloudformation_template(memory_mb=512, timeout_s=60, architecture="arm64", runtime="python3.12",
                                       code_key="gradshard/package-x.zip")
    assert yaml.safe_load(to_yaml(template)) == template


def test_vendored_package_holds_the_handler_and_numpy(deployment: Path) -> None:
    # Execute
    with zipfile.ZipFile(deployment / "package.zip") as archive:
        names = archive.namelist()

    # Assert
    assert "gradshard/runtime/aws_lambda.py" in names
    assert "numpy/__init__.py" in names and "pydantic_core/__init__.py" in names
    assert names == sorted(names)
    assert not [n for n in names if n.endswith(".pyc") or "/tests/" in n]


def test_unvendored_deployment_writes_pins_and_build_script(tmp_path: Path) -> None:
    # Execute
    first = write_aws_deployment(tmp_path / "a", vendor=False, architecture="arm64", runtime="python3.12")
    second = write_aws_deployment(tmp_path / "b", vendor=False, architecture="arm64", runtime="python3.12")

    # Assert
    assert first.requirements is not None and first.build_script is not None
    pins = first.requirements.read_text().split()
    assert {p.split("==")[0].lower().replace("_", "-") for p in pins} >= {"numpy", "pydantic", "boto3", "psutil"}
    assert all("==" in p for p in pins)
    script = first.build_script.read_text()
    assert "--python-version 3.12" in script and "--platform manylinux2014_aarch64" in script
    assert "--platform manylinux_2_34_aarch64" in script
    assert subprocess.run(["bash", "-n", str(first.build_script)], check=False).returncode == 0
    with zipfile.ZipFile(first.package) as archive:
        assert not [n for n in archive.namelist() if not n.startswith("gradshard/")]
    assert first.package.read_bytes() == second.package.read_bytes()  # deterministic
    assert first.code_key is None  # known only once build.sh has completed the package
    assert "the 12 hex digits build.sh printed" in (tmp_path / "a" / "DEPLOY.md").read_text()


def test_vendoring_for_another_python_is_refused(tmp_path: Path) -> None:
    with pytest.raises(GradshardError, match="--no-vendor"):
        write_aws_deployment(tmp_path, runtime="python3.13")
    assert not (tmp_path / "package.zip").exists()


def test_vendoring_checks_the_runtime_glibc(tmp_path: Path) -> None:
    # Prepare: the wheels installed here, as a plain python3.11 deployment would vendor them
    from gradshard.deploy.aws import _distributions, glibc_warnings

    too_new = glibc_warnings(_distributions(), LAMBDA_RUNTIMES["python3.11"])

    # Execute / Assert: refused exactly when some wheel needs a newer glibc than Amazon Linux 2's 2.26
    if too_new:
        with pytest.raises(GradshardError, match=r"glibc 2\.26"):
            write_aws_deployment(tmp_path, runtime="python3.11")
    assert glibc_warnings(_distributions(), LAMBDA_RUNTIMES["python3.12"]) == []


def test_cli_writes_the_files(tmp_path: Path) -> None:
    # Execute
    result = CliRunner().invoke(main, ["deploy", "aws", "--out", str(tmp_path), "--no-vendor", "--memory-mb", "2048",
                                       "--arch", "arm64", "--runtime", "python3.12"])

    # Assert
    assert result.exit_code == 0, result.output
    for name in ("package.zip", "template.yaml", "DEPLOY.md", "requirements.txt", "build.sh"):
        assert name in result.output
        assert (tmp_path / name).is_file()
    template = yaml.safe_load(io.StringIO((tmp_path / "template.yaml").read_text()))
    assert template["Parameters"]["MemorySize"]["Default"] == 2048
    assert template["Resources"]["Function"]["Properties"]["Architectures"] == ["arm64"]


# --- training with every function on Lambda ----------------------------------------------------------------------
IMAGE = "gradshard-image"  # a container-image function: gradshard with torch installed


@pytest.mark.integration
@pytest.mark.usefixtures("aws_env")
def test_training_through_the_lambda_contract_gives_the_local_model_bytes(tmp_path: Path, s3_store: S3Store) -> None:
    # Prepare: the same two-round run, once on local worker processes and a local directory, once with every
    # function (clients, shards, server step) invoked through the Invoke API of an image function, on the local S3
    # server (as on AWS: the functions reach the store over S3)
    from gradshard.fl.config import DataConfig, TrainConfig
    from gradshard.fl.driver import Trainer
    from gradshard.format.keys import model_key

    config = TrainConfig(model="mlp", data=DataConfig(name="digits", partition="iid"), clients=3, rounds=2, epochs=1,
                         batch_size=32, lr=0.1, seed=0, aggregation=AggregateConfig(shards=2))
    source = Path(__import__("gradshard").__file__).parents[1]  # where the image has gradshard installed
    functions = {IMAGE: Function(IMAGE, source, memory_mb=2048, timeout_s=120.0, image=True)}
    local_store = LocalStore(tmp_path / "local", fsync=False)

    # Execute
    with LocalExecutor(workers=2) as local:
        Trainer(local_store, config, local).run()
    with LambdaEmulator(functions) as emulator:
        executor = LambdaExecutor(IMAGE, endpoint_url=emulator.endpoint_url, region="us-east-1",
                                  allow_local_store=True, workers=2, timeout_s=120.0)  # (the S3 server is loopback)
        Trainer(s3_store, config, executor).run()

    # Assert: every round's model is the same bytes; every function ran on the emulated Lambda
    for r in (1, 2):
        assert s3_store.get(model_key(r)) == local_store.get(model_key(r))
    assert {c.status for c in emulator.calls} == {"ok"}
    assert len(emulator.calls) == 2 * (3 + 2 + 2)  # per round: 3 clients, 2 shards, 2 server-step shards


def test_train_with_the_lambda_executor_needs_the_function(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["train", "--executor", "lambda", "--rounds", "1", "--store", str(tmp_path)])
    assert result.exit_code == 2
    assert "--lambda-function" in result.stderr


def _credential_less_clients_and_a_local_run(tmp_path: Path, config: Any) -> tuple[dict[str, Function], LocalStore]:
    """The image function and a client function with no credentials at all; and the same run done locally."""
    from gradshard.fl.driver import Trainer

    source = Path(__import__("gradshard").__file__).parents[1]
    functions = {IMAGE: Function(IMAGE, source, memory_mb=2048, timeout_s=120.0, image=True),
                 "clients": Function("clients", source, memory_mb=2048, timeout_s=120.0, image=True,
                                     credentials=False)}
    local_store = LocalStore(tmp_path / "local", fsync=False)
    with LocalExecutor(workers=2) as local:
        Trainer(local_store, config, local).run()
    return functions, local_store


@pytest.mark.integration
@pytest.mark.usefixtures("aws_env")
def test_clients_without_credentials_train_through_presigned_urls_only(tmp_path: Path, s3_store: S3Store) -> None:
    # Prepare: client functions whose role reaches nothing (no credentials at all); the driver presigns, per task, a
    # GET of each object the client reads and a PUT of its own update
    from gradshard.errors import TrainingError
    from gradshard.fl.config import DataConfig, TrainConfig
    from gradshard.fl.driver import Trainer
    from gradshard.format.keys import model_key

    config = TrainConfig(model="mlp", data=DataConfig(name="digits", partition="iid"), clients=3, rounds=1, epochs=1,
                         batch_size=32, lr=0.1, seed=0, aggregation=AggregateConfig(shards=2))
    functions, local_store = _credential_less_clients_and_a_local_run(tmp_path, config)

    with LambdaEmulator(functions) as emulator:
        def executor(name: str, retries: int = 2) -> LambdaExecutor:
            return LambdaExecutor(name, endpoint_url=emulator.endpoint_url, region="us-east-1", retries=retries,
                                  allow_local_store=True, workers=2, timeout_s=120.0)

        # Execute: without URLs the credential-less clients cannot even read the model ...
        with pytest.raises(TrainingError, match="every client failed"):
            Trainer(s3_store, config, executor(IMAGE), executor("clients", retries=0)).run()
        # ... with them, the run is the local run, byte for byte
        fresh = new_s3_store(s3_store.endpoint_url or "")
        Trainer(fresh, config, executor(IMAGE), executor("clients"), presigned_clients=True).run()

    assert fresh.get(model_key(1)) == local_store.get(model_key(1))



@pytest.mark.integration
@pytest.mark.usefixtures("aws_env")
def test_secure_aggregation_runs_with_credential_less_lambda_clients(tmp_path: Path, s3_store: S3Store) -> None:
    # Prepare: client functions with no credentials; every protocol step and the training step reach only the URLs
    # the driver presigned for them
    from gradshard.fl.config import DataConfig, TrainConfig
    from gradshard.fl.driver import Trainer
    from gradshard.fl.secure import SecureAggregationConfig
    from gradshard.format.keys import model_key

    config = TrainConfig(model="mlp", data=DataConfig(name="digits", partition="iid"), clients=3, rounds=1, epochs=1,
                         batch_size=32, lr=0.1, seed=0, aggregation=AggregateConfig(shards=2),
                         keys_dir=str(tmp_path / "keys"), secure_aggregation=SecureAggregationConfig())
    functions, local_store = _credential_less_clients_and_a_local_run(tmp_path, config)

    # Execute
    with LambdaEmulator(functions) as emulator:
        def executor(name: str) -> LambdaExecutor:
            return LambdaExecutor(name, endpoint_url=emulator.endpoint_url, region="us-east-1", allow_local_store=True,
                                  workers=2, timeout_s=120.0)

        Trainer(s3_store, config, executor(IMAGE), executor("clients"), presigned_clients=True).run()

    # Assert: the local run's model, byte for byte; the protocol's steps ran on the client function
    assert s3_store.get(model_key(1)) == local_store.get(model_key(1))
    steps = [c.function for c in emulator.calls if c.function == "clients"]
    assert len(steps) == 3 * 4  # per client: advertise, share, train, reveal
