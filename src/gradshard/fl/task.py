"""Tasks: what a federated run trains — a model, its data, its loss and optimizer, local training, evaluation.

A :class:`Task` is the user's side of training, in the shape of Flower's ClientApp ``train``/``evaluate``
functions or of a ``torch.nn.Module`` + data set pair. Only ``model`` is required:

- ``model()`` builds a fresh ``torch.nn.Module`` (any architecture: an MLP, a CNN, an LSTM, a transformer);
- the data, either ``data()`` → ``(train, test)`` :class:`~gradshard.fl.data.Dataset` s that the driver partitions
  among the clients and writes to the store (``from_arrays`` and ``from_torch_dataset`` make them), or
  ``client_data(partition, partitions)`` → the data of one client, loaded *inside* the client function (data that
  never leaves the client, or a ``flwr-datasets`` partitioner), with ``test_data()`` for the server's evaluation;
- ``loss(logits, y)`` (default cross-entropy) and ``optimizer(parameters, context)`` (default SGD with the run's
  ``lr`` and ``momentum``);
- ``train(model, data, context)`` replaces the whole local loop and ``evaluate(model, data)`` the evaluation; both
  return :class:`Scores`.

Function processes find the task by reference (:class:`TaskRef`): ``"package.module:name"`` or
``"path/to/file.py:name"``, where ``name`` is a :class:`Task` or a function returning one (called with the
reference's ``options``). The reference carries the import root of the task's package, which the function processes
append to their ``sys.path`` (they start isolated, so the driver's working directory is not on it), so a task runs
on the local and Ray executors alike. A task object given to the Python API is found in the module that defines it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from gradshard.errors import GradshardError

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from gradshard.fl.data import Dataset

EVAL_BATCH = 256  # examples evaluated at once (bounds the evaluation's activations)


class TaskError(GradshardError):
    """A task cannot be found, imported or used; the message names the task and what is wrong."""


@dataclass(frozen=True)
class Scores:
    """Mean loss and accuracy over the examples seen.

    ``coverage``, set only by a ``train`` that trained part of the model (a SuperFed subnetwork), names what it
    trained: tensor name -> leading extent per dimension (:mod:`gradshard.core.coverage`; tensors not named were
    not trained and must be left unchanged). The client writes it into its update, so the reducer
    ``coverage-mean`` averages every element over the clients that trained it. None: everything was trained.
    """

    loss: float
    accuracy: float
    coverage: Mapping[str, tuple[int, ...]] | None = None


@dataclass(frozen=True)
class TrainContext:
    """What one client's local training is given besides the model and its data.

    ``seed`` is the 32-bit seed of (run seed, round, client): use it for shuffling so a retried client writes the
    same update. ``anchor`` holds the global model's parameters (FedProx's ``mu/2 ||w - w_global||²``).
    ``options`` are this client's options for the round from the run's round plugin (:mod:`gradshard.fl.plugin`),
    e.g. the subnetwork it trains; empty without a plugin.
    """

    round: int
    client: str
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    mu: float
    seed: int
    anchor: tuple[Tensor, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    """A model, its data and how to train and evaluate it (see the module docstring for each field)."""

    model: Callable[[], nn.Module]
    data: Callable[[], tuple[Dataset, Dataset]] | None = None
    client_data: Callable[[int, int], Dataset] | None = None
    test_data: Callable[[], Dataset] | None = None
    loss: Callable[[Tensor, Tensor], Tensor] | None = None
    optimizer: Callable[[Iterable[Any], TrainContext], torch.optim.Optimizer] | None = None
    train: Callable[[nn.Module, Dataset, TrainContext], Scores] | None = None
    evaluate: Callable[[nn.Module, Dataset], Scores] | None = None
    name: str = "task"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not callable(self.model):
            raise TaskError(f"task {self.name!r}: model must be a function returning a torch.nn.Module")
        if self.data is None and (self.client_data is None or self.test_data is None):
            raise TaskError(f"task {self.name!r} has no data: give data() -> (train, test), or client_data(partition, "
                            "partitions) together with test_data()")
        for name in ("data", "client_data", "test_data", "loss", "optimizer", "train", "evaluate"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise TaskError(f"task {self.name!r}: {name} must be callable, got {type(value).__name__}")

    # --- what the client and the driver call --------------------------------------------------------------------
    def build(self) -> nn.Module:
        """A fresh model; refuses anything that is not a ``torch.nn.Module``."""
        from torch import nn

        model = self.model()
        if not isinstance(model, nn.Module):
            raise TaskError(f"task {self.name!r}: model() returned {type(model).__name__}, not a torch.nn.Module")
        return model

    def compute_loss(self, logits: Tensor, y: Tensor) -> Tensor:
        if self.loss is not None:
            return self.loss(logits, y)
        import torch

        return torch.nn.functional.cross_entropy(logits, y)

    def fit(self, model: nn.Module, data: Dataset, context: TrainContext) -> Scores:
        """Local training: the task's own ``train`` or :func:`default_train`."""
        scores = (self.train or (lambda m, d, c: default_train(self, m, d, c)))(model, data, context)
        return _checked_scores(self.name, "train", scores)

    def score(self, model: nn.Module, data: Dataset) -> Scores:
        """Evaluation: the task's own ``evaluate`` or :func:`default_evaluate`."""
        scores = (self.evaluate or (lambda m, d: default_evaluate(self, m, d)))(model, data)
        return _checked_scores(self.name, "evaluate", scores)


def _checked_scores(task: str, what: str, scores: Any) -> Scores:
    if not isinstance(scores, Scores):
        raise TaskError(f"task {task!r}: {what}() must return gradshard.fl.task.Scores, got {type(scores).__name__}")
    coverage = None if scores.coverage is None else \
        {str(name): tuple(int(e) for e in extent) for name, extent in scores.coverage.items()}
    return Scores(float(scores.loss), float(scores.accuracy), coverage)


def default_train(task: Task, model: nn.Module, data: Dataset, context: TrainContext) -> Scores:
    """``epochs`` passes of minibatch training over a seeded shuffle, with the task's loss and optimizer (SGD by
    default) and FedProx's proximal term when ``mu > 0``; mean loss and accuracy over the batches."""
    import torch

    params = list(model.parameters())
    if task.optimizer is not None:
        opt = task.optimizer(params, context)
    else:
        opt = torch.optim.SGD(params, lr=context.lr, momentum=context.momentum)
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    gen = torch.Generator().manual_seed(context.seed)
    model.train()
    losses, correct, seen = [], 0, 0
    for _ in range(context.epochs):
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), context.batch_size):
            idx = order[start : start + context.batch_size]
            opt.zero_grad()
            logits = model(x[idx])
            loss = task.compute_loss(logits, y[idx])
            if context.mu > 0:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), context.anchor, strict=True))
                loss = loss + context.mu / 2 * prox
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            losses.append(float(loss.detach()))
            correct += int((logits.argmax(1) == y[idx]).sum())
            seen += len(idx)
    return Scores(sum(losses) / max(1, len(losses)), correct / max(1, seen))


def default_evaluate(task: Task, model: nn.Module, data: Dataset) -> Scores:
    """Mean loss (weighted by batch size) and accuracy over ``data``, in batches of :data:`EVAL_BATCH`."""
    import torch

    model.eval()
    total, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data), EVAL_BATCH):
            x = torch.from_numpy(data.x[start : start + EVAL_BATCH])
            y = torch.from_numpy(data.y[start : start + EVAL_BATCH])
            logits = model(x)
            total += float(task.compute_loss(logits, y)) * len(y)
            correct += int((logits.argmax(1) == y).sum())
    n = max(1, len(data))
    return Scores(total / n, correct / n)


# --- references ------------------------------------------------------------------------------------------------
class TaskRef(BaseModel):
    """How a function process finds a task: ``target`` (``"module:name"`` or ``"/abs/file.py:name"``), the import
    roots to append to ``sys.path`` and the keyword arguments for a task factory. JSON-able."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str = Field(min_length=3, max_length=4096)
    paths: tuple[str, ...] = ()
    options: dict[str, Any] = Field(default_factory=dict)

    @property
    def is_file(self) -> bool:
        return self.target.rpartition(":")[0].endswith(".py")


def parse_task(spec: str, options: dict[str, Any] | None = None, *, base: Path | None = None) -> TaskRef:
    """``"pkg.module:name"`` or ``"path/to/file.py:name"`` (relative to ``base``, default the working directory) as
    a :class:`TaskRef` with absolute paths; the module or file is checked to exist (not imported)."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise TaskError(f"task {spec!r}: give 'package.module:name' or 'path/to/file.py:name'")
    opts = dict(options or {})
    if where.endswith(".py"):
        path = ((base or Path.cwd()) / where).resolve()
        if not path.is_file():
            raise TaskError(f"task {spec!r}: no such file {str(path)!r}")
        return TaskRef(target=f"{path}:{name}", paths=(), options=opts)
    if not all(part.isidentifier() for part in where.split(".")):
        raise TaskError(f"task {spec!r}: {where!r} is not a module name (or a path ending in .py)")
    top = where.split(".")[0]
    try:
        found = importlib.util.find_spec(top)
    except (ImportError, ValueError) as exc:
        raise TaskError(f"task {spec!r}: cannot find module {top!r}: {exc}") from None
    if found is None:
        raise TaskError(f"task {spec!r}: no module named {top!r} on the Python path")
    return TaskRef(target=f"{where}:{name}", paths=_import_roots(top, found), options=opts)


def _import_roots(top: str, spec: Any) -> tuple[str, ...]:
    """The directory holding the top-level package or module ``top`` (what a process needs on ``sys.path``)."""
    if spec.submodule_search_locations:
        return tuple(sorted({str(Path(p).resolve().parent) for p in spec.submodule_search_locations}))
    if spec.origin and spec.origin not in ("built-in", "frozen"):
        return (str(Path(spec.origin).resolve().parent),)
    return ()


def ref_of(task: Task) -> TaskRef:
    """The reference of a task object: the module attribute that holds it (a script's ``__main__`` becomes its
    file). Raises :class:`TaskError` if no importable module holds it."""
    candidates = [getattr(task.model, "__module__", None), "__main__"]
    candidates += [name for name in list(sys.modules) if name not in candidates]
    for module_name in candidates:
        module = sys.modules.get(module_name) if module_name else None
        if module_name is None or module is None:
            continue
        names = [k for k, v in list(vars(module).items()) if v is task and k.isidentifier()]
        if not names:
            continue
        if module_name == "__main__" or getattr(module, "__name__", "").startswith(_FILE_MODULE_PREFIX):
            file = getattr(module, "__file__", None)
            if file and file.endswith(".py"):
                return TaskRef(target=f"{Path(file).resolve()}:{names[0]}", options=task.options)
            continue
        spec = getattr(module, "__spec__", None)
        roots = _import_roots(module_name.split(".")[0], importlib.util.find_spec(module_name.split(".")[0])) \
            if spec is not None else ()
        return TaskRef(target=f"{module_name}:{names[0]}", paths=roots, options=task.options)
    raise TaskError(f"task {task.name!r} is not held by any importable module: function processes find a task by "
                    "reference; define it at the top level of a module or a .py file and pass it there (or as "
                    "'module:name' / 'file.py:name')")


_FILE_MODULE_PREFIX = "gradshard_task_"
_cache: dict[str, Task] = {}
_lock = threading.RLock()  # reentrant: a task factory may load another task (a wrapper)


def load_task(ref: TaskRef) -> Task:
    """The task ``ref`` names, imported once per process (a factory is called with ``ref.options``)."""
    key = ref.model_dump_json()
    with _lock:
        if key not in _cache:
            _cache[key] = _load(ref)
        return _cache[key]


def _load(ref: TaskRef) -> Task:
    where, _, name = ref.target.rpartition(":")
    for root in ref.paths:
        if root not in sys.path:
            sys.path.append(root)  # appended: the task's package must not shadow the standard library
    try:
        module = _import_file(where) if ref.is_file else importlib.import_module(where)
    except TaskError:
        raise
    except Exception as exc:  # the user's module failed to import: say which and why
        raise TaskError(f"task {ref.target!r}: importing {where!r} failed: {type(exc).__name__}: {exc}") from exc
    if not hasattr(module, name):
        raise TaskError(f"task {ref.target!r}: {where!r} has no attribute {name!r}")
    value = getattr(module, name)
    if not isinstance(value, Task):
        if not callable(value):
            raise TaskError(f"task {ref.target!r}: {name!r} is a {type(value).__name__}, not a Task or a function "
                            "returning one")
        try:
            value = value(**ref.options)
        except TaskError:
            raise
        except Exception as exc:
            raise TaskError(f"task {ref.target!r}: {name}(**{ref.options!r}) failed: {type(exc).__name__}: "
                            f"{exc}") from exc
        if not isinstance(value, Task):
            raise TaskError(f"task {ref.target!r}: {name}() returned a {type(value).__name__}, not a Task")
    elif ref.options:
        raise TaskError(f"task {ref.target!r}: options {sorted(ref.options)} were given but {name!r} is a Task, "
                        "not a function that takes them")
    return value


def _import_file(path: str) -> Any:
    """Import a ``.py`` file as a module of its own (a stable name from its path; re-imports reuse it)."""
    if not os.path.isfile(path):
        raise TaskError(f"task file {path!r} does not exist (function processes need the same path)")
    name = _FILE_MODULE_PREFIX + hashlib.sha256(path.encode()).hexdigest()[:16]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TaskError(f"task file {path!r} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module

