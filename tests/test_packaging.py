"""The wheel installs and explains itself: built from this tree, installed with its base dependencies only (no torch,
boto3, ray, scikit-learn or matplotlib) into a fresh venv, the base commands run and ``gradshard train`` names
its extra.

Needs the package index (the build's setuptools, the base dependencies at the pins of requirements.txt); when pip
cannot reach it the test is skipped, saying so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import gradshard
from gradshard.cli.common import ExitCode

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "sklearn", "boto3", "botocore", "ray", "matplotlib", "flwr")
PIP_NETWORK = ("--timeout", "20", "--retries", "1")
#: What pip prints when it cannot reach an index (then the test skips rather than fails).
UNREACHABLE = ("NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
               "Name or service not known", "Network is unreachable", "ConnectTimeoutError", "ReadTimeoutError",
               "ProxyError", "Max retries exceeded", "Could not fetch URL")


def _run(args: list[str | Path], **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, timeout=600,
                          **kwargs)  # type: ignore[call-overload]


def _pip(args: list[str | Path], what: str) -> None:
    """Run a pip command; skip the test if pip could not reach the index, fail on any other error."""
    done = _run([*args, *PIP_NETWORK])
    if done.returncode == 0:
        return
    output = done.stdout + done.stderr
    reason = next((line.strip() for line in output.splitlines() if any(s in line for s in UNREACHABLE)), None)
    if reason is not None:
        pytest.skip(f"{what}: pip cannot reach the package index ({reason[:200]})")
    pytest.fail(f"{what} failed:\n{output[-4000:]}")


def _source_copy(tmp_path: Path) -> Path:
    """What the build reads, copied (setuptools writes build/ and an .egg-info next to the sources it builds)."""
    copy = tmp_path / "source"
    shutil.copytree(ROOT / "src", copy / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, copy / name)
    return copy


def _gradshard(venv: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return _run([venv / "bin" / "gradshard", *args], cwd=venv)


@pytest.mark.integration  # about 45 s (build, venv, install, eight commands): in `make test`, not test-fast
def test_the_wheel_installs_without_extras_runs_and_names_the_missing_extra(tmp_path: Path) -> None:
    dist, venv, store = tmp_path / "dist", tmp_path / "venv", tmp_path / "store"
    _pip([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", dist, _source_copy(tmp_path)],
         "building the wheel")
    (wheel,) = dist.glob("gradshard-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "gradshard/py.typed" in names
    dist_info = f"gradshard-{gradshard.__version__}.dist-info"
    assert f"{dist_info}/licenses/LICENSE" in names or f"{dist_info}/LICENSE" in names  # setuptools >= 77, older

    _run([sys.executable, "-m", "venv", venv]).check_returncode()
    _pip([venv / "bin" / "python", "-m", "pip", "install", "--quiet", "-c", ROOT / "requirements.txt", wheel],
         "installing the wheel's base dependencies")
    absent = _run([venv / "bin" / "python", "-c",
                   f"import importlib.util as u; print([m for m in {HEAVY!r} if u.find_spec(m)])"])
    assert absent.stdout.strip() == "[]", "the base install pulled in an extra"

    version = _gradshard(venv, "--version")
    assert version.returncode == 0 and gradshard.__version__ in version.stdout

    demo = _gradshard(venv, "demo", "--aggregate-only", "--layout", "mlp", "--clients", "2", "--shards", "2",
                      "--store", store)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "bit-identical" in demo.stdout
    for args in (["inspect", store / "rounds/000000/aggregate.safetensors"],
                 ["aggregate", "--store", store, "--round", "0", "--shards", "2", "--workers", "1"],
                 ["plan", "--params", "1e8", "--clients", "4", "--memory-limit", "1024"],
                 ["cost", "--arch", "sharded", "--clients", "4", "--shards", "2", "--memory-mb", "1024",
                  "--durations", "1,1", "--layout", "paper"],
                 ["gc", "--store", store, "--dry-run"]):
        done = _gradshard(venv, *args)
        assert done.returncode == 0, f"gradshard {args[0]}: {done.stdout}{done.stderr}"

    train = _gradshard(venv, "train", "--store", tmp_path / "train-store")
    assert train.returncode == ExitCode.MISSING_EXTRA
    assert train.stderr.count("\n") == 1 and "Traceback" not in train.stdout + train.stderr
    assert train.stderr.startswith("error: gradshard train needs PyTorch and scikit-learn")
    assert train.stderr.endswith("pip install 'gradshard[train]'\n")
