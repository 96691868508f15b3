"""The client function: read the global model and this client's data, train with the run's task, write the delta.

The task (:mod:`gradshard.fl.task`) is imported by reference inside the function's process; its data comes from the
store (written by the driver) or from the task's own ``client_data``. It runs on any executor like an aggregator
does (the local executor forks it from a zygote with torch preloaded).
With ``dp`` set, training is DP-SGD (:mod:`gradshard.privacy.dpsgd`) and the update carries the round's release.
Training is deterministic on the CPU — one thread, deterministic algorithms, a seed derived from (run seed, round,
client) — so running a client twice (a retry, or a driver restarted mid-round) writes the same update.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.numpy import load as load_safetensors

from gradshard.core.digests import DigestName
from gradshard.core.layout import ModelLayout
from gradshard.extras import missing_extra_error
from gradshard.fl.attacks import parse_attack, poison_labels, poison_update
from gradshard.fl.data import Dataset
from gradshard.fl.models import build_model, load_numpy_state, seed_everything
from gradshard.fl.secure import SecureUpload, upload_masked
from gradshard.fl.task import Task, TaskError, TaskRef, TrainContext, load_task
from gradshard.fl.urls import ClientUrls
from gradshard.format.compact import compact_of, write_compact_update
from gradshard.format.keys import residual_key, root_update_key, update_key
from gradshard.format.quantized import write_quantized_update
from gradshard.format.sparse import k_of, parse_compression, top_k, write_topk_update
from gradshard.format.update import UpdateMeta, read_flat
from gradshard.format.writer import write_update
from gradshard.privacy.accountant import Release
from gradshard.privacy.client_ledger import release_extra
from gradshard.privacy.config import ClientDP
from gradshard.privacy.dpsgd import train_private
from gradshard.runtime.registry import register, register_runtime
from gradshard.store import Store
from gradshard.store.presigned import PresignedStore

try:
    import torch
except ModuleNotFoundError as exc:  # the train extra: name it instead of a bare "No module named 'torch'"
    raise missing_extra_error("train", "gradshard.fl (federated training)") from exc


class ClientTask(BaseModel):
    """Everything one client invocation needs; JSON-able so any executor can carry it."""

    model_config = ConfigDict(extra="forbid")

    round: int = Field(ge=0)
    client: str
    task: TaskRef
    partition: int = Field(default=0, ge=0, description="this client's index among the run's clients")
    partitions: int = Field(default=1, ge=1)
    model_key: str
    model_sha256: str
    kept_key: str = ""
    data_key: str = Field(default="", description="the client's data in the store; empty: the task loads it")
    epochs: int = Field(default=1, ge=1)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=0.05, gt=0)
    momentum: float = Field(default=0.0, ge=0, lt=1)
    mu: float = Field(default=0.0, ge=0, description="FedProx proximal weight (0: FedAvg)")
    seed: int = 0
    chunk_elems: int = Field(ge=1)
    digest: DigestName = "xxh3_64"  # the round's chunk digest algorithm
    fault: str = Field(default="", description="testing only: crash | nan | sleep:<seconds>")
    output_key: str = Field(default="", description="where the update goes; empty: the client's update key (the "
                                                    "server's FLTrust root update goes to its own key)")
    urls: ClientUrls | None = Field(default=None, description="presigned URLs to read and write through instead "
                                                              "of the function's store (gradshard.store.presigned)")
    compression: str = Field(default="none", description="upload as float ('none'), block-wise int8 ('int8') or "
                                                         "the largest entries ('topk:<fraction>')")
    residual_from: int | None = Field(default=None, ge=0, description="error feedback: the earlier round whose "
                                                                      "residual this client adds to its update "
                                                                      "(residual_key); None: none")
    residual_out: bool = Field(default=False, description="error feedback: write what this round's top-k update "
                                                          "leaves out to residual_key(round, client)")
    attack: str = Field(default="", description="a simulated Byzantine client: sign-flip | scale:<s> | noise:<sigma> "
                                                "| label-flip (gradshard.fl.attacks); empty: honest")
    dp: ClientDP | None = Field(default=None, description="client DP-SGD (Opacus); None: ordinary training")
    secure: SecureUpload | None = Field(default=None, description="secure aggregation: upload the update "
                                                                   "quantized and masked (gradshard.fl.secure)")
    signing_key: str = Field(default="", description="path of the client's private key PEM: its update is signed "
                                                     "(rounds that require signatures); empty: unsigned")
    options: dict[str, Any] = Field(default_factory=dict, description="this client's options from the run's round "
                                                                      "plugin (TrainContext.options)")

    @model_validator(mode="after")
    def _known_output(self) -> ClientTask:
        if self.output_key not in ("", root_update_key(self.round)):
            raise ValueError(f"a client function writes its own update or the round's root update "
                             f"({root_update_key(self.round)}), not {self.output_key[:80]!r}")
        if self.residual_from is not None and self.residual_from >= self.round:
            raise ValueError(f"a client carries the residual of an earlier round, not of round {self.residual_from} "
                             f"into round {self.round}")
        if self.secure is not None and (self.compression != "none" or self.signing_key):
            raise ValueError("a masked update is neither compressed nor signed")
        if (self.residual_out or self.residual_from is not None) and not self.compression.startswith("topk"):
            raise ValueError(f"error feedback is for top-k updates; this task's compression is "
                             f"{self.compression[:40]!r}")
        return self


def task_seed(seed: int, r: int, client: str) -> int:
    """A 32-bit seed for (run seed, round, client), stable across processes (unlike ``hash``)."""
    digest = hashlib.sha256(f"{seed}/{r}/{client}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def load_arrays(store: Store, key: str) -> dict[str, npt.NDArray[Any]]:
    """A small safetensors object (client data, kept buffers) read whole."""
    return dict(load_safetensors(store.get(key)))


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
    epsilon: float | None = Field(default=None, description="client DP-SGD: this round's ε at delta")
    delta: float | None = None
    release: Release | None = Field(default=None, description="client DP-SGD: this round's release (z, q, steps)")


def client_dataset(task: ClientTask, user: Task, store: Store) -> Dataset:
    """This client's data: its object in the store, or what the task's ``client_data`` loads."""
    if task.data_key:
        arrays = load_arrays(store, task.data_key)
        return Dataset(arrays["x"], arrays["y"], int(arrays["classes"][0]) if "classes" in arrays
                       else int(arrays["y"].max()) + 1 if arrays["y"].size else 1)
    if user.client_data is None:
        raise TaskError(f"task {user.name!r} has no client_data() and the driver wrote no data for {task.client}")
    data = user.client_data(task.partition, task.partitions)
    if not isinstance(data, Dataset):
        raise TaskError(f"task {user.name!r}: client_data() returned a {type(data).__name__}, not a "
                        "gradshard.fl.data.Dataset (make one with from_arrays or from_torch_dataset)")
    return data


def train_client(task: ClientTask, store: Store) -> ClientResult:
    """Train one client for one round and write ``rounds/<r>/updates/<client>.safetensors`` (the weight delta)."""
    if task.fault == "crash":
        os._exit(7)
    if task.urls is not None:  # the driver's presigned URLs: this task's objects, and only those
        store = PresignedStore(task.urls.gets, task.urls.puts)
    started = time.perf_counter()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    seed = task_seed(task.seed, task.round, task.client)
    seed_everything(seed)
    user = load_task(task.task)
    model = user.build()
    layout = ModelLayout.from_state_dict(model.state_dict())
    averaged = layout.aggregated()
    global_flat = read_flat(store, task.model_key, averaged, "global model")
    kept = load_arrays(store, task.kept_key) if task.kept_key else {}
    load_numpy_state(model, layout.assemble(averaged.unflatten(global_flat), kept))
    data = client_dataset(task, user, store)
    attack = parse_attack(task.attack) if task.attack else None
    if attack is not None and attack.on_data:
        data = Dataset(data.x, poison_labels(attack, data.y, data.num_classes), data.num_classes)
    context = TrainContext(round=task.round, client=task.client, epochs=task.epochs, batch_size=task.batch_size,
                           lr=task.lr, momentum=task.momentum, mu=task.mu, seed=seed,
                           anchor=tuple(p.detach().clone() for p in model.parameters()), options=task.options)
    private = train_private(user, model, data, context, task.dp) if task.dp is not None else None
    scores = private.scores if private is not None else user.fit(model, data, context)
    # Training is over: the state is read in place (no snapshot copy) and the delta formed in its one flat buffer
    floating, _ = layout.split_state(model.state_dict())
    delta = averaged.flatten(floating)
    delta -= global_flat
    if task.residual_from is not None:  # error feedback: what earlier top-k updates left out
        delta += read_flat(store, residual_key(task.residual_from, task.client), averaged, f"{task.client} residual")
    if attack is not None:
        poison_update(attack, delta, seed)
    if task.fault == "nan":
        delta[0] = np.nan
    if task.fault.startswith("sleep:"):
        time.sleep(float(task.fault.removeprefix("sleep:")))
    meta = UpdateMeta(client=task.client, round=task.round, examples=len(data), layout_digest=averaged.digest(),
                      chunk_elems=task.chunk_elems, base_model=task.model_sha256, digest=task.digest,
                      coverage=_coverage(scores.coverage),
                      extra={"loss": f"{scores.loss:.6g}", "accuracy": f"{scores.accuracy:.6g}",
                             **(release_extra(private.release, private.delta) if private is not None else {})})
    signer = None
    if task.signing_key:  # cryptography loads only for signed runs
        from gradshard.security.keys import load_private_key

        signer = load_private_key(task.signing_key)
    key = task.output_key or update_key(task.round, task.client)
    if task.secure is not None:  # secure aggregation: quantized and masked; the server sees only the survivors' sum
        upload_masked(store, key, task.secure, averaged, delta, meta)
    elif meta.coverage is not None:  # a subnetwork: upload only its elements (a compact update)
        compact = compact_of(averaged, meta.coverage, delta)
        write_compact_update(store, key, averaged, meta.coverage, compact, dataclasses.replace(meta, coverage=None),
                             signer=signer)
    elif task.compression == "int8":
        write_quantized_update(store, key, averaged, delta, meta, signer=signer)
    elif task.compression != "none":
        k = k_of(parse_compression(task.compression)[1], averaged.numel)
        keep = top_k(delta, k)
        if task.residual_out:  # written first: a residual whose update never arrived is never carried
            left = delta.copy()
            left[keep] = 0.0
            write_update(store, residual_key(task.round, task.client), averaged, left,
                         dataclasses.replace(meta, kind="residual", coverage=None, extra={}))
        write_topk_update(store, key, averaged, delta, meta, k=k, keep=keep, signer=signer)
    else:
        write_update(store, key, averaged, delta, meta, signer=signer)
    return ClientResult(examples=len(data), loss=scores.loss, train_accuracy=scores.accuracy,
                        train_s=time.perf_counter() - started,
                        epsilon=private.epsilon if private is not None else None,
                        delta=private.delta if private is not None else None,
                        release=private.release if private is not None else None)


def _coverage(coverage: Any) -> dict[str, tuple[int, ...]] | None:
    """The trained part the task reported (Scores.coverage) as the update's coverage; None: everything."""
    return None if coverage is None else {name: tuple(extent) for name, extent in coverage.items()}


# Client functions run in a runtime with torch preloaded (which would add hundreds of MiB to every aggregation
# function's baseline if the numpy runtime had it).
register_runtime("torch", preload=("torch",))
register("train_client", train_client, args=ClientTask, result=ClientResult, runtime="torch",
         scope=lambda task: {"round": task.round, "client": task.client})
