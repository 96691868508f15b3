"""Bring your own task: a tabular task (breast_cancer) and an LSTM task train through ``gradshard train --task``
on capped client functions; failures of a task are loud (the CLI exits non-zero with the reason, the API raises)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from gradshard.cli.main import main
from gradshard.errors import TrainingError
from gradshard.fl.config import TrainConfig
from gradshard.fl.driver import Trainer
from gradshard.fl.task import TaskError, TaskRef, load_task, parse_task
from gradshard.format.keys import model_key
from gradshard.runtime import InlineExecutor
from gradshard.store import LocalStore

TABULAR = '''
import numpy as np
import torch
from sklearn.datasets import load_breast_cancer

from gradshard.fl.data import from_arrays, stratified_split
from gradshard.fl.task import Task


def data():
    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)  # standardised: the 30 features span 5 orders of magnitude
    train, test = stratified_split(y, 0.25, seed=0)
    return from_arrays(x[train], y[train], 2), from_arrays(x[test], y[test], 2)


def model():
    return torch.nn.Sequential(torch.nn.Linear(30, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


task = Task(model=model, data=data, name="breast-cancer")
'''

LSTM = '''
import numpy as np
import torch

from gradshard.fl.data import from_arrays
from gradshard.fl.task import Task

LENGTH, VOCAB = 12, 10


class Classifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 8)
        self.lstm = torch.nn.LSTM(8, 16, batch_first=True)
        self.head = torch.nn.Linear(16, 2)

    def forward(self, x):
        out, _ = self.lstm(self.embed(x.long()))
        return self.head(out[:, -1])


def sequences(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, VOCAB, size=(n, LENGTH))
    y = ((x >= VOCAB // 2).sum(1) > LENGTH // 2).astype(np.int64)  # most tokens high: counted along the sequence
    return from_arrays(x, y, 2)


def client_data(partition, partitions):  # loaded inside the client function: data never leaves the client
    return sequences(200, seed=100 + partition)


def optimizer(params, context):
    return torch.optim.Adam(params, lr=0.02)


task = Task(model=Classifier, client_data=client_data, test_data=lambda: sequences(400, seed=1), optimizer=optimizer,
            name="lstm")
'''


def write_task(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return path


def train_cli(tmp_path: Path, store: str, task: str, *extra: str) -> object:
    args = ["train", "--store", str(tmp_path / store), "--task", task, "--clients", "4", "--rounds", "3",
            "--epochs", "2", "--batch-size", "16", "--lr", "0.05", "--partition", "iid", "--client-memory-mb", "1024",
            "--memory-mb", "256", *extra]
    return CliRunner().invoke(main, args)


def rounds_of(out: Path) -> list[dict[str, Any]]:
    rounds: list[dict[str, Any]] = json.loads((out / "metrics.json").read_text())["rounds"]
    return rounds


def final_model(tmp_path: Path, store: str, rounds: int) -> bytes:
    return LocalStore(tmp_path / store).get(model_key(rounds))


@pytest.mark.integration
def test_a_tabular_task_on_breast_cancer_learns_and_sharded_equals_flat(tmp_path: Path) -> None:
    # Prepare
    path = write_task(tmp_path, "tabular", TABULAR)

    # Execute: the same run with GradsSharding (M = 3) and with one flat aggregator
    sharded = train_cli(tmp_path, "sharded", f"{path}:task", "--shards", "3", "--rounds", "2")
    flat = train_cli(tmp_path, "flat", f"{path}:task", "--topology", "flat", "--rounds", "2")

    # Assert: 30 features, 2 classes; chance (the majority class) is 0.63
    assert sharded.exit_code == 0, sharded.output
    assert flat.exit_code == 0, flat.output
    accuracy = rounds_of(tmp_path / "sharded")[-1]["test_accuracy"]
    print(f"breast_cancer test accuracy after 2 rounds: {accuracy:.4f}")
    assert accuracy >= 0.9
    assert final_model(tmp_path, "sharded", 2) == final_model(tmp_path, "flat", 2)


@pytest.mark.integration
def test_an_lstm_task_with_client_side_data_learns(tmp_path: Path) -> None:
    # Prepare: a package on a path of its own (function processes start isolated: they get it from the reference)
    package = tmp_path / "mytasks"
    package.mkdir()
    (package / "__init__.py").write_text("")
    write_task(package, "sequences", LSTM)
    sys.path.insert(0, str(tmp_path))
    try:
        ref = parse_task("mytasks.sequences:task")
        result = train_cli(tmp_path, "store", "mytasks.sequences:task", "--shards", "2", "--epochs", "4")
    finally:
        sys.path.remove(str(tmp_path))

    # Assert: binary labels, chance 0.5
    assert ref.paths == (str(tmp_path.resolve()),)
    assert result.exit_code == 0, result.output
    rounds = rounds_of(tmp_path / "store")
    print("LSTM test accuracy per round:", [r["test_accuracy"] for r in rounds])
    assert rounds[-1]["test_accuracy"] >= 0.85, [r["test_accuracy"] for r in rounds]


@pytest.mark.integration
def test_a_task_whose_training_raises_fails_the_run_with_its_message(tmp_path: Path) -> None:
    # Prepare
    path = write_task(tmp_path, "broken", TABULAR + textwrap.dedent('''
        def broken_train(model, data, context):
            raise RuntimeError("boom from my task")

        task = Task(model=model, data=data, train=broken_train, name="broken")
        '''))

    # Execute
    result = train_cli(tmp_path, "store", f"{path}:task")

    # Assert: every client failed in round 0: the run stops, exit 1, the reason on stderr
    assert result.exit_code == 1, result.output
    assert "every client failed" in result.stderr and "boom from my task" in result.stderr
    assert "Traceback" not in result.output


def test_a_task_file_that_raises_on_import_is_a_one_line_error(tmp_path: Path) -> None:
    path = write_task(tmp_path, "bad", "raise ValueError('no data here')\n")

    result = train_cli(tmp_path, "store", f"{path}:task")

    assert result.exit_code == 3, result.output
    assert "importing" in result.stderr and "ValueError: no data here" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(("spec", "message"), [
    ("nocolon", "give 'package.module:name'"),
    ("missing_file.py:task", "no such file"),
    ("no_such_module_xyz:task", "no module named 'no_such_module_xyz'"),
    ("os.path:not-an-identifier", "give 'package.module:name'"),
])
def test_bad_task_references_are_refused(tmp_path: Path, spec: str, message: str) -> None:
    with pytest.raises(TaskError, match=message):
        parse_task(spec, base=tmp_path)


def test_a_task_attribute_that_is_not_a_task_is_refused(tmp_path: Path) -> None:
    path = write_task(tmp_path, "notask", "task = 42\n")

    with pytest.raises(TaskError, match="is a int, not a Task"):
        load_task(TaskRef(target=f"{path}:task"))


def test_a_task_factory_gets_the_options(tmp_path: Path) -> None:
    path = write_task(tmp_path, "factory", TABULAR + textwrap.dedent('''
        def make(hidden=16):
            return Task(model=lambda: torch.nn.Linear(30, hidden), data=data, name=f"linear-{hidden}")
        '''))

    task = load_task(TaskRef(target=f"{path.resolve()}:make", options={"hidden": 3}))

    assert task.name == "linear-3" and task.build().out_features == 3


def test_the_python_api_raises_when_every_client_fails(tmp_path: Path) -> None:
    # Prepare: the inline executor runs the clients in this process
    path = write_task(tmp_path, "broken_api", TABULAR + textwrap.dedent('''
        def broken_train(model, data, context):
            raise RuntimeError("diverged on purpose")

        task = Task(model=model, data=data, train=broken_train, name="broken")
        '''))
    config = TrainConfig(task=str(path.resolve()) + ":task", clients=2, rounds=2, epochs=1)
    trainer = Trainer(LocalStore(tmp_path / "store"), config, InlineExecutor())

    # Execute / Assert
    with pytest.raises(TrainingError, match=r"round 0: every client failed.*diverged on purpose"):
        trainer.run()
