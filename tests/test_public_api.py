"""The curated public API: importable as documented, lazy (no torch or boto3 for aggregation), typed (py.typed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import gradshard

USER_FILE = '''
from gradshard import (AggregateConfig, LocalExecutor, LocalStore, ModelLayout, RoundSpec, TrainConfig,
                       aggregate_round, get_layout, open_round)

store = LocalStore("store")
layout: ModelLayout = get_layout("mlp").aggregated()
open_round(store, RoundSpec.create(0, layout))
with LocalExecutor(workers=1) as executor:
    result = aggregate_round(store, 0, executor, AggregateConfig(shards=2))
shards: int = result.plan.params["m"]
config = TrainConfig(rounds=3)
'''


def test_every_public_name_resolves_to_its_definition() -> None:
    for name in gradshard.__all__:
        value = getattr(gradshard, name)
        assert value is not None
    assert gradshard.aggregate_round.__module__ == "gradshard.aggregation.driver"
    assert gradshard.Trainer.__name__ == "Trainer"


def test_unknown_attribute_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'aggregate'"):
        gradshard.aggregate  # noqa: B018


def test_import_prints_the_documented_function_and_loads_neither_torch_nor_boto3() -> None:
    code = ("import sys, gradshard; print(gradshard.aggregate_round); "
            "print('torch' in sys.modules, 'boto3' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = done.stdout.splitlines()
    assert lines[0].startswith("<function aggregate_round")
    assert lines[1] == "False False"


def test_package_ships_py_typed() -> None:
    assert (Path(gradshard.__file__).parent / "py.typed").is_file()


def _mypy(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    user = tmp_path / "user_code.py"
    user.write_text(source)
    return subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(user)],
                          capture_output=True, text=True, cwd=tmp_path)


def test_mypy_strict_passes_on_a_user_file_that_uses_the_public_api(tmp_path: Path) -> None:
    done = _mypy(tmp_path, USER_FILE)
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_strict_sees_the_real_types_of_the_public_api(tmp_path: Path) -> None:
    done = _mypy(tmp_path, USER_FILE + "wrong: str = result.round\n")
    assert done.returncode == 1
    assert 'Incompatible types in assignment (expression has type "int", variable has type "str")' in done.stdout
