"""The same round gives the same bytes on every runtime and store: local processes or Ray tasks, a local directory
or S3 (the session's moto server), through the ``gradshard aggregate`` command on an ``s3://`` store, and a whole
training run with ``gradshard train --executor ray``."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from click.testing import CliRunner
from conftest import new_s3_store

from gradshard.aggregation.compare import compare_round
from gradshard.aggregation.driver import AggregateConfig, aggregate_round
from gradshard.cli.main import main
from gradshard.core.zoo import synthetic
from gradshard.demo.synthetic import make_round
from gradshard.format.keys import aggregate_key, model_key
from gradshard.runtime import Executor, LocalExecutor
from gradshard.runtime.ray import RayExecutor
from gradshard.store import LocalStore, Store
from gradshard.units import MIB

pytestmark = pytest.mark.integration

# 12 MB per update: the S3 uploads of updates and of the aggregate span several 5 MiB parts.
LAYOUT = synthetic(3_000_000, tensor_elems=500_000)


@pytest.fixture(scope="module")
def ray_node(s3_endpoint: str) -> Iterator[None]:
    """A local Ray, started after the S3 credentials are in the environment its workers inherit."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 * MIB)
    yield
    ray.shutdown()


def aggregate(store: Store, executor: Executor, config: AggregateConfig) -> bytes:
    make_round(store, 1, LAYOUT, 5, seed=11)
    result = aggregate_round(store, 1, executor, config)
    assert all(r.ok for r in result.reports)
    return store.get(result.output_key)


@pytest.mark.parametrize("config", [AggregateConfig(topology="sharded", shards=3, parallel_reads=2),
                                    AggregateConfig(topology="lambda-fl", group_size=2)], ids=["sharded", "lambda-fl"])
def test_the_same_round_is_bit_identical_on_local_ray_and_s3(ray_node: None, s3_endpoint: str, tmp_path: Path,
                                                             config: AggregateConfig) -> None:
    # Prepare
    outputs: dict[tuple[str, str], bytes] = {}

    # Execute: every executor on every store
    with LocalExecutor(workers=2) as local, RayExecutor(workers=2) as on_ray:
        for runtime, executor in (("local", local), ("ray", on_ray)):
            for kind in ("local", "s3"):
                store = (LocalStore(tmp_path / runtime, fsync=False) if kind == "local"
                         else new_s3_store(s3_endpoint))
                outputs[(runtime, kind)] = aggregate(store, executor, config)

    # Assert
    reference = outputs[("local", "local")]
    assert len(reference) > 2 * 5 * MIB
    assert {key: out == reference for key, out in outputs.items()} == dict.fromkeys(outputs, True)


def test_sharded_on_s3_is_bit_identical_to_flat_on_local(s3_endpoint: str, tmp_path: Path) -> None:
    # Execute
    with LocalExecutor(workers=2) as executor:
        sharded = aggregate(new_s3_store(s3_endpoint), executor, AggregateConfig(topology="sharded", shards=4,
                                                                                parallel_reads=4))
        flat = aggregate(LocalStore(tmp_path, fsync=False), executor, AggregateConfig(topology="flat"))

    # Assert
    assert sharded == flat


def test_aggregate_command_runs_on_an_s3_store(s3_endpoint: str, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the endpoint comes from the AWS environment, as for any S3-compatible service
    store = new_s3_store(s3_endpoint, prefix="cli")
    make_round(store, 1, LAYOUT, 5, seed=11)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    local = LocalStore(tmp_path, fsync=False)
    with LocalExecutor(workers=2) as executor:
        expected = aggregate(local, executor, AggregateConfig(topology="sharded", shards=2))

    # Execute
    result = CliRunner().invoke(main, ["aggregate", "--store", f"s3://{store.bucket}/cli", "--round", "1",
                                       "--shards", "2", "--parallel-reads", "3", "--memory-mb", "256"])

    # Assert
    assert result.exit_code == 0, result.output
    assert "published rounds/000001/aggregate.safetensors" in result.output
    assert store.get(aggregate_key(1)) == expected


def test_aggregate_command_names_a_missing_bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)

    # Execute
    result = CliRunner().invoke(main, ["aggregate", "--store", "s3://no-such-bucket/x", "--round", "1"])

    # Assert: a gradshard error, one line on stderr
    assert result.exit_code == 3
    assert "bucket 'no-such-bucket' does not exist at http://127.0.0.1" in result.stderr


USER_TASK = """
import torch
from sklearn.datasets import load_wine

from gradshard.fl.data import from_arrays, stratified_split
from gradshard.fl.task import Task


def data():
    x, y = load_wine(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    train, test = stratified_split(y, 0.25, seed=0)
    return from_arrays(x[train], y[train], 3), from_arrays(x[test], y[test], 3)


task = Task(model=lambda: torch.nn.Sequential(torch.nn.Linear(13, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)),
            data=data, name="wine")
"""


def test_training_with_the_ray_executor_gives_the_models_of_a_local_run(tmp_path: Path) -> None:
    # Prepare: each run in its own process, as a user runs it (this one starts and stops its own local Ray); the
    # task is the user's own package, importable from the driver's working directory only (the functions get it
    # through the task reference, on Ray as locally)
    (tmp_path / "usertasks").mkdir()
    (tmp_path / "usertasks" / "__init__.py").write_text("")
    (tmp_path / "usertasks" / "wine.py").write_text(USER_TASK)
    flags = ["--rounds", "2", "--clients", "4", "--epochs", "1", "--workers", "2", "--task", "usertasks.wine:task"]
    runs = {}

    # Execute
    for executor in ("local", "ray"):
        store = tmp_path / executor
        done = subprocess.run([sys.executable, "-m", "gradshard.cli", "train", "--store", str(store),
                               "--executor", executor, *flags], capture_output=True, text=True, timeout=300,
                              cwd=tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        runs[executor] = [(store / model_key(r)).read_bytes() for r in range(3)]

    # Assert
    assert runs["ray"] == runs["local"]


def test_compare_runs_every_architecture_on_an_s3_store(s3_endpoint: str) -> None:
    # Prepare
    store = new_s3_store(s3_endpoint)
    make_round(store, 0, synthetic(200_000), 6)

    # Execute
    result = compare_round(store, 0)

    # Assert: all four ran and published; GradsSharding is exact, the trees within float tolerance
    assert [r.architecture for r in result.rows] == ["flat", "sharded", "lambda-fl", "lifl"]
    assert all(r.status == "ok" and r.output_visible for r in result.rows)
    assert result.row("sharded").exact
    assert all((result.row(t).max_rel_error or 0) < 1e-6 for t in ("lambda-fl", "lifl"))
    assert not [k for k in store.list() if "/partials/" in k]
