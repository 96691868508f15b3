"""The optional extras: the extra -> modules -> hint map, its agreement with pyproject.toml, and the one-line CLI
error (exit code 4) when a command's extra is missing (simulated: the module set to None in sys.modules)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from gradshard.cli.common import ExitCode
from gradshard.cli.main import main
from gradshard.errors import GradshardError, MissingExtraError
from gradshard.extras import EXTRAS, extra_of_module, has_extra, missing_modules, require_extra
from gradshard.store import S3Store

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
HEAVY = ("torch", "sklearn", "boto3", "botocore", "ray", "matplotlib", "flwr")


def _hide(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Make ``modules`` unimportable for this test (``import x`` raises ModuleNotFoundError)."""
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


def test_a_missing_module_raises_a_typed_error_naming_the_extra_and_the_install(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _hide(monkeypatch, "sklearn")

    with pytest.raises(MissingExtraError) as info:
        require_extra("train", "gradshard train")

    error = info.value
    assert isinstance(error, GradshardError) and isinstance(error, ImportError)
    assert (error.extra, error.feature, error.missing, error.name) == ("train", "gradshard train", ("sklearn",),
                                                                        "sklearn")
    assert str(error) == ("gradshard train needs PyTorch and scikit-learn (not installed: sklearn): "
                          "pip install 'gradshard[train]'")


@pytest.mark.parametrize("extra", sorted(EXTRAS))
def test_every_extra_is_missing_when_its_modules_are(monkeypatch: pytest.MonkeyPatch, extra: str) -> None:
    _hide(monkeypatch, *EXTRAS[extra].modules)

    assert not has_extra(extra)
    assert missing_modules(extra) == list(EXTRAS[extra].modules)
    with pytest.raises(MissingExtraError, match=rf"pip install 'gradshard\[{extra}\]'$"):
        require_extra(extra, "a feature")


def test_modules_map_back_to_their_extra() -> None:
    assert extra_of_module("matplotlib.figure") == "plots"
    assert extra_of_module("botocore.exceptions") == "s3"
    assert extra_of_module("sklearn") == "train"
    assert extra_of_module("numpy") is None


def test_the_extras_agree_with_pyproject() -> None:
    optional = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    assert set(EXTRAS) | {"all"} == set(optional)
    assert optional["all"] == [f"gradshard[{','.join(sorted(EXTRAS, key=list(optional).index))}]"]


def test_an_s3_store_without_boto3_says_which_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide(monkeypatch, "boto3", "botocore")

    with pytest.raises(MissingExtraError, match=r"the S3 store s3://bucket/run/ needs boto3 .*gradshard\[s3\]"):
        S3Store("bucket", "run")


@pytest.mark.parametrize(("args", "hidden", "extra"), [
    (["train", "--store", "{tmp}/store"], ("torch",), "train"),
    (["demo"], ("sklearn",), "train"),
    (["aggregate", "--store", "s3://bucket/run", "--round", "0"], ("boto3", "botocore"), "s3"),
    (["aggregate", "--store", "{tmp}", "--round", "0", "--executor", "ray"], ("ray",), "ray"),
    (["plan", "--sweep", "--out", "{tmp}/sweep"], ("matplotlib",), "plots"),
    (["compare", "--store", "{tmp}", "--round", "0"], ("matplotlib",), "plots"),
    (["deploy", "aws", "--out", "{tmp}/deploy"], ("boto3",), "s3"),
])
def test_a_command_without_its_extra_prints_one_line_and_exits_4(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, args: list[str], hidden: tuple[str, ...],
        extra: str) -> None:
    _hide(monkeypatch, *hidden)
    monkeypatch.delitem(sys.modules, "gradshard.runtime.ray", raising=False)  # imported again, without ray

    result = CliRunner().invoke(main, [a.format(tmp=tmp_path) for a in args])

    assert result.exit_code == ExitCode.MISSING_EXTRA == 4
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert result.stderr.endswith(f"pip install 'gradshard[{extra}]'\n")
    assert "Traceback" not in result.output
    assert not (tmp_path / "store").exists()  # train checks before it creates the store


def test_an_unguarded_import_of_an_extras_module_still_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    def unguarded(*args: object, **kwargs: object) -> None:
        import matplotlib  # noqa: F401

    _hide(monkeypatch, "matplotlib")
    monkeypatch.setattr("gradshard.cli.cost.require_extra", lambda extra, feature: None)
    monkeypatch.setattr("gradshard.cli.cost.sweep", unguarded)

    result = CliRunner().invoke(main, ["plan", "--sweep"])

    assert result.exit_code == ExitCode.MISSING_EXTRA
    assert result.stderr == ("error: this command needs matplotlib (not installed: matplotlib): "
                             "pip install 'gradshard[plots]'\n")


def test_the_base_commands_import_no_extra() -> None:
    code = ("import importlib, sys; from gradshard.cli.main import COMMANDS; "
            "[importlib.import_module(module) for module in COMMANDS.values()]; "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""
