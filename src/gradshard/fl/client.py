"""The client function: read the global model and this client's data from the store, train, write the delta.

It runs on any executor like an aggregator does (the local executor forks it from a zygote with torch preloaded).
Training is deterministic on the CPU — one thread, deterministic algorithms, a seed derived from (run seed, round,
client) — so running a client twice (a retry, or a driver restarted mid-round) writes the same update.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field
from safetensors.numpy import load as load_safetensors

from gradshard.core.digests import DigestName
from gradshard.core.layout import ModelLayout
from gradshard.extras import missing_extra_error
from gradshard.fl.models import build_model, load_numpy_state, seed_everything, state_to_numpy
from gradshard.format.keys import update_key
from gradshard.format.update import UpdateMeta, read_flat
from gradshard.format.writer import write_update
from gradshard.runtime.registry import register, register_runtime
from gradshard.store import Store

try:
    import torch
except ModuleNotFoundError as exc:  # the train extra: name it instead of a bare "No module named 'torch'"
    raise missing_extra_error("train", "gradshard.fl (federated training)") from exc


class ClientTask(BaseModel):
    """Everything one client invocation needs; JSON-able so any executor can carry it."""

    model_config = ConfigDict(extra="forbid")

    round: int = Field(ge=0)
    client: str
    model: str
    num_classes: int = Field(ge=2)
    model_key: str
    model_sha256: str
    kept_key: str = ""
    data_key: str
    epochs: int = Field(default=1, ge=1)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=0.05, gt=0)
    momentum: float = Field(default=0.0, ge=0, lt=1)
    mu: float = Field(default=0.0, ge=0, description="FedProx proximal weight (0: FedAvg)")
    seed: int = 0
    chunk_elems: int = Field(ge=1)
    digest: DigestName = "xxh3_64"  # the round's chunk digest algorithm
    fault: str = Field(default="", description="testing only: crash | nan | sleep:<seconds>")


def task_seed(seed: int, r: int, client: str) -> int:
    """A 32-bit seed for (run seed, round, client), stable across processes (unlike ``hash``)."""
    digest = hashlib.sha256(f"{seed}/{r}/{client}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def load_arrays(store: Store, key: str) -> dict[str, npt.NDArray[Any]]:
    """A small safetensors object (client data, kept buffers) read whole."""
    return dict(load_safetensors(store.get(key)))


def _train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, task: ClientTask,
           anchor: list[torch.Tensor]) -> tuple[float, float]:
    """Local SGD epochs (with FedProx's ``mu/2 ||w - w_global||²`` when ``mu > 0``); mean loss and accuracy."""
    opt = torch.optim.SGD(model.parameters(), lr=task.lr, momentum=task.momentum)
    gen = torch.Generator().manual_seed(task_seed(task.seed, task.round, task.client))
    model.train()
    losses, correct, seen = [], 0, 0
    for _ in range(task.epochs):
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), task.batch_size):
            idx = order[start : start + task.batch_size]
            opt.zero_grad()
            logits = model(x[idx])
            loss = torch.nn.functional.cross_entropy(logits, y[idx])
            if task.mu > 0:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True))
                loss = loss + task.mu / 2 * prox
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            losses.append(float(loss.detach()))
            correct += int((logits.argmax(1) == y[idx]).sum())
            seen += len(idx)
    return float(np.mean(losses)), correct / max(1, seen)


def warm_up() -> None:
    """Run one tiny training step so torch's lazy initialisation (~1.2 s: optimizer, autograd) happens once, in the
    runtime's zygote, instead of in every client invocation forked from it."""
    model = build_model("mlp", 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = torch.nn.functional.cross_entropy(model(torch.zeros(2, 64)), torch.zeros(2, dtype=torch.long))
    loss.backward()  # type: ignore[no-untyped-call]
    opt.step()


class ClientResult(BaseModel):
    """What a client invocation reports (its update is in the store)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    examples: int
    loss: float
    train_accuracy: float
    train_s: float


def train_client(task: ClientTask, store: Store) -> ClientResult:
    """Train one client for one round and write ``rounds/<r>/updates/<client>.safetensors`` (the weight delta)."""
    if task.fault == "crash":
        os._exit(7)
    started = time.perf_counter()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    seed_everything(task_seed(task.seed, task.round, task.client))
    model = build_model(task.model, task.num_classes)
    layout = ModelLayout.from_state_dict(model.state_dict())
    averaged = layout.aggregated()
    global_flat = read_flat(store, task.model_key, averaged, "global model")
    kept = load_arrays(store, task.kept_key) if task.kept_key else {}
    load_numpy_state(model, layout.assemble(averaged.unflatten(global_flat), kept))
    data = load_arrays(store, task.data_key)
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"]).long()
    anchor = [p.detach().clone() for p in model.parameters()]
    loss, accuracy = _train(model, x, y, task, anchor)
    floating, _ = layout.split_state(state_to_numpy(model))
    delta = averaged.flatten(floating) - global_flat
    if task.fault == "nan":
        delta[0] = np.nan
    if task.fault.startswith("sleep:"):
        time.sleep(float(task.fault.removeprefix("sleep:")))
    meta = UpdateMeta(client=task.client, round=task.round, examples=len(y), layout_digest=averaged.digest(),
                      chunk_elems=task.chunk_elems, base_model=task.model_sha256, digest=task.digest,
                      extra={"loss": f"{loss:.6g}", "accuracy": f"{accuracy:.6g}"})
    write_update(store, update_key(task.round, task.client), averaged, delta, meta)
    return ClientResult(examples=len(y), loss=loss, train_accuracy=accuracy, train_s=time.perf_counter() - started)


# Client functions run in a runtime with torch preloaded (which would add hundreds of MiB to every aggregation
# function's baseline if the numpy runtime had it).
register_runtime("torch", preload=("torch",))
register("train_client", train_client, args=ClientTask, result=ClientResult, runtime="torch")
