"""Secure aggregation in training (``[secure_aggregation]``): the clients of every round run the SecAgg+-style
protocol of :mod:`gradshard.security.secagg` as client functions, and the round aggregates with reducer
``secagg:<bits>``, so the server sees only the sum of the surviving clients' updates.

A round plugin (:class:`SecureAggregationPlugin`) drives it around the usual client step:

1. **Keys** (``secagg_advertise``, one invocation per client): each client derives the round's two X25519 key pairs
   from its own secret and publishes the public keys (``rounds/<r>/secagg/adverts/<client>.json``). The driver
   writes the directory of the clients that did (``directory.json``, with the threshold ``t``).
2. **Shares** (``secagg_share``): each client sends every peer its encrypted Shamir shares through the store. A
   client that does not share completely is left out and the remaining clients agree again (the keys are derived,
   so nothing else changes); a client left out is not in the directory and fails its training step naming why.
3. **Masked updates**: the training step (``train_client``) quantizes the client's delta (clip, ``bits`` fraction
   bits, stochastic rounding) and uploads it masked. A client that fails here has dropped after masking.
4. **Unmasking** (``secagg_reveal``): the survivors (clients whose masked update is in the store, fixed once in
   ``survivors.json``) reveal their shares of the survivors' self-mask seeds and of the dropped clients' mask keys;
   the aggregation reconstructs the masks from ``t`` of them and removes them shard by shard.

Each client function keeps no state between its invocations: what it needs is derived from its secret (32 random
bytes: ``<client>.secagg`` in ``keys_dir``, mode 0600, made if missing; without ``keys_dir`` a temporary directory,
so a restarted run cannot finish a round its clients began), which each of its steps is handed in its arguments.
This is a simulation, and says so: the trainer that makes the secrets and hands them over could read them; in a
deployment each client holds its own. For the same reason a client cannot remember what it revealed, so "never
reveal both secrets of one peer" holds per invocation, not against a server that asks again with another list of
survivors (the driver asks once per round and records the list). With presigned clients every step gets URLs of
exactly the records it reads and writes (the training step also a GET of the directory), so client functions need
no store credentials.

With ``aggregation.weighting = "examples"`` (the default) each client masks its delta times its weight (its example
count ÷ the largest, written in the directory) and the aggregate is the survivors' weighted mean; with
``"uniform"``, their mean.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from gradshard.aggregation.driver import AggregateConfig
from gradshard.aggregation.secure import (
    KeyDirectory,
    directory_key,
    read_directory,
    reveal_key,
    share_key,
    write_directory,
    write_reveal,
)
from gradshard.core.layout import ModelLayout
from gradshard.errors import GradshardError, SecurityError
from gradshard.fl.plugin import RoundPlugin
from gradshard.fl.urls import ClientUrls
from gradshard.format.keys import check_client_id, client_data_key, secagg_prefix, update_key
from gradshard.format.masked import write_masked_update
from gradshard.format.update import UpdateMeta, read_header
from gradshard.runtime.registry import register
from gradshard.security.secagg import Advertised, SecAggClient
from gradshard.store import Store
from gradshard.topology import Plan
from gradshard.topology.base import Invocation

if TYPE_CHECKING:
    from gradshard.fl.client import ClientTask
    from gradshard.fl.driver import Trainer

log = logging.getLogger(__name__)
_SECRET_BYTES = 32
_MAX_RECORD = 1 << 16


class SecureAggregationConfig(BaseModel):
    """``[secure_aggregation]``: fixed-point bits and clip of the clients' quantized updates and the unmasking
    threshold as a fraction of the clients that agreed keys (``t = ⌊fraction·n⌋ + 1``, at least 2)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: int = Field(default=16, ge=1, le=30, description="fixed-point fraction bits (reducer secagg:<bits>)")
    clip: float = Field(default=8.0, gt=0, allow_inf_nan=False,
                        description="each element of a client's delta is clipped to [-clip, clip] before quantizing")
    threshold: float = Field(default=0.5, gt=0, lt=1,
                             description="the share of key-agreeing clients whose reveals unmask a round")

    def threshold_for(self, n: int) -> int:
        return min(n, max(2, int(self.threshold * n) + 1))


class SecureUpload(BaseModel):
    """What a training client needs to upload its update masked (``ClientTask.secure``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: int = Field(ge=1, le=30)
    clip: float = Field(gt=0, allow_inf_nan=False)
    secret: str = Field(pattern=r"^[0-9a-f]{64}$", repr=False, description="the client's secret (32 bytes, hex)")


class SecAggStep(BaseModel):
    """One client's protocol step of round ``round`` (keys, shares or reveal)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    round: int = Field(ge=0)
    client: str
    secret: str = Field(pattern=r"^[0-9a-f]{64}$", repr=False, description="the client's secret (32 bytes, hex)")
    peers: list[str] = Field(default_factory=list, description="keys: the clients asked to agree keys")
    survivors: list[str] = Field(default_factory=list, description="reveal: the clients whose masked update arrived")
    urls: ClientUrls | None = Field(default=None, description="presigned URLs of exactly what the step reads and "
                                                              "writes, instead of the function's store")


class SecAggStepResult(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    written: int


def advert_key(r: int, client: str) -> str:
    return f"{secagg_prefix(r)}/adverts/{check_client_id(client)}.json"


def survivors_key(r: int) -> str:
    return f"{secagg_prefix(r)}/survivors.json"


# --- the client functions --------------------------------------------------------------------------------------------
def read_secret(path: str) -> bytes:
    """A client's secret: a regular file of exactly 32 bytes."""
    file = Path(path)
    try:
        if not file.is_file() or file.is_symlink():
            raise SecurityError(f"the client secret {path[:200]!r} is not a regular file")
        secret = file.read_bytes()
    except OSError as exc:
        raise SecurityError(f"cannot read the client secret {path[:200]!r}: {exc.strerror}") from None
    if len(secret) != _SECRET_BYTES:
        raise SecurityError(f"the client secret {path[:200]!r} has {len(secret)} bytes, not {_SECRET_BYTES}")
    return secret


def _agent(store: Store, r: int, client: str, secret: str) -> tuple[SecAggClient, KeyDirectory]:
    """The client's side of round ``r`` against the round's directory (it must be in it)."""
    directory = read_directory(store, r)
    if client not in directory.clients:
        raise SecurityError(f"client {client!r} is not in round {r}'s secure-aggregation key directory (it did not "
                            "complete the key agreement)")
    agent = SecAggClient(client, r, list(directory.clients), directory.threshold, bytes.fromhex(secret))
    return agent, directory


def _store_of(step: SecAggStep, store: Store) -> Store:
    """The step's presigned view when the driver gave it URLs, else the function's store."""
    if step.urls is None:
        return store
    from gradshard.store.presigned import PresignedStore

    return PresignedStore(step.urls.gets, step.urls.puts)


def secagg_advertise(step: SecAggStep, store: Store) -> SecAggStepResult:
    """Publish the client's public keys of the round."""
    store = _store_of(step, store)
    peers = sorted({*step.peers, step.client})
    if len(peers) < 2:
        raise SecurityError("secure aggregation needs at least two clients")
    advert = SecAggClient(step.client, step.round, peers, 2, bytes.fromhex(step.secret)).advertise()
    store.put(advert_key(step.round, step.client), json.dumps({"mask_key": advert.mask_key,
                                                               "share_key": advert.share_key}).encode())
    return SecAggStepResult(written=1)


def secagg_share(step: SecAggStep, store: Store) -> SecAggStepResult:
    """Send every peer of the directory its encrypted shares of the client's mask key and self-mask seed."""
    store = _store_of(step, store)
    agent, directory = _agent(store, step.round, step.client, step.secret)
    blobs = agent.share(directory.clients)
    for peer, blob in blobs.items():
        store.put(share_key(step.round, step.client, peer), blob)
    return SecAggStepResult(written=len(blobs))


def secagg_reveal(step: SecAggStep, store: Store) -> SecAggStepResult:
    """Reveal what unmasking the survivors' sum needs, from the shares the peers sent this client."""
    store = _store_of(step, store)
    agent, directory = _agent(store, step.round, step.client, step.secret)
    agent.share(directory.clients)  # the client's own shares, derived again (it kept nothing)
    inbox = {peer: store.get(share_key(step.round, peer, step.client)) for peer in directory.clients
             if peer != step.client}
    revealed = agent.reveal(inbox, directory.clients, step.survivors)
    write_reveal(store, step.round, step.client, revealed)
    return SecAggStepResult(written=len(revealed))


def upload_masked(store: Store, key: str, secure: SecureUpload, layout: ModelLayout,
                  delta: npt.NDArray[np.float32], meta: UpdateMeta) -> None:
    """The training client's upload: its delta quantized (× its weight in the directory, if any) and masked for the
    round's directory."""
    agent, directory = _agent(store, meta.round, meta.client, secure.secret)
    masked = agent.masked(delta, directory.clients, bits=secure.bits, clip=secure.clip,
                          weight=1.0 if directory.weights is None else directory.weights[meta.client])
    write_masked_update(store, key, layout, masked, meta)


for _name, _fn in (("secagg_advertise", secagg_advertise), ("secagg_share", secagg_share),
                   ("secagg_reveal", secagg_reveal)):
    register(_name, _fn, args=SecAggStep, result=SecAggStepResult,
             scope=lambda step: {"round": step.round, "client": step.client})


# --- the driver's side ------------------------------------------------------------------------------------------------
def client_secrets(trainer: Trainer) -> dict[str, str]:
    """One secret per simulated client (``<client>.secagg`` in the trainer's keys directory; made if missing, kept
    if present): ``client -> secret`` (hex), what each of the client's steps is handed."""
    from gradshard.fl.driver import client_ids

    directory = trainer.keys_directory()
    out = {}
    for client in client_ids(trainer.config.clients):
        path = directory / f"{client}.secagg"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(_SECRET_BYTES))
        out[client] = read_secret(str(path)).hex()
    return out


class SecureAggregationPlugin(RoundPlugin):
    """Runs the protocol's key agreement before a round's clients and the unmasking step after them."""

    def __init__(self, config: SecureAggregationConfig) -> None:
        self.config = config
        self._secrets: dict[str, str] | None = None
        self._examples: dict[str, int] = {}  # client -> its data set's example count (weighting 'examples')

    @property
    def name(self) -> str:
        return "secure-aggregation"

    def secrets(self, trainer: Trainer) -> dict[str, str]:
        if self._secrets is None:
            self._secrets = client_secrets(trainer)
        return self._secrets

    def prepare(self, trainer: Trainer) -> None:
        if trainer.config.aggregation.weighting != "uniform" and not trainer.data_in_store:
            raise GradshardError("[secure_aggregation] weights each client by its example count, which the driver "
                                 "knows only for data it split itself; this task loads each client's own data: set "
                                 "aggregation.weighting = 'uniform'")
        if not trainer.config.keys_dir:
            log.warning("secure aggregation: the clients' secrets are in a temporary directory, so a restarted run "
                        "cannot finish a round its clients began (that round keeps the model); set keys_dir to "
                        "keep them")

    def aggregation(self, trainer: Trainer, r: int, cohort: list[str], options: Any,
                    base: AggregateConfig) -> AggregateConfig:
        return base.model_copy(update={"reducer": f"secagg:{self.config.bits}"})

    def _weights(self, trainer: Trainer, clients: list[str]) -> dict[str, float] | None:
        """With weighting 'examples': each client's example count ÷ the largest (from the client data sets in the
        store), the weight it masks its update with; None: uniform."""
        if trainer.config.aggregation.weighting == "uniform":
            return None
        for client in clients:  # a client's data set never changes during a run: its header is read once
            if client not in self._examples:
                key = client_data_key(client)
                with trainer.store.open_reader(key) as reader:
                    self._examples[client] = max(1, read_header(reader, key, client).tensors["y"].shape[0])
        counts = {c: self._examples[c] for c in clients}
        largest = max(counts.values())
        return {c: n / largest for c, n in counts.items()}

    def client_task(self, trainer: Trainer, task: ClientTask) -> ClientTask:
        secure = SecureUpload(bits=self.config.bits, clip=self.config.clip, secret=self.secrets(trainer)[task.client])
        update: dict[str, Any] = {"secure": secure}
        if task.urls is not None and trainer.store.exists(directory_key(task.round)):  # it reads the directory too
            extra = trainer.presign([directory_key(task.round)], [])
            update["urls"] = ClientUrls(gets={**task.urls.gets, **extra.gets}, puts=task.urls.puts)
        return task.model_copy(update=update)

    def _step(self, trainer: Trainer, r: int, client: str, reads: list[str], writes: list[str],
              **fields: Any) -> SecAggStep:
        """A client's protocol step, with presigned URLs of exactly ``reads`` and ``writes`` when clients have no
        store credentials."""
        urls = trainer.presign(reads, writes) if trainer.presigned_clients else None
        return SecAggStep(round=r, client=client, secret=self.secrets(trainer)[client], urls=urls, **fields)

    def _share_step(self, trainer: Trainer, r: int, client: str, agreed: list[str]) -> SecAggStep:
        return self._step(trainer, r, client, [directory_key(r)],
                          [share_key(r, client, p) for p in agreed if p != client])

    def _run(self, trainer: Trainer, function: str, steps: list[SecAggStep]) -> None:
        plan = Plan(function, tuple(Invocation(f"{function}-{s.client}", function, s, 64 << 20) for s in steps))
        for report in trainer.client_executor.run(plan, trainer.store):
            if not report.ok:
                log.warning("round %d: %s failed: %s: %s", steps[0].round, report.invocation, report.error_type,
                            str(report.error)[:300])

    def before_clients(self, trainer: Trainer, r: int, cohort: list[str]) -> None:
        store = trainer.store
        if store.exists(directory_key(r)):  # agreed before a restart: the clients may already have masked against it
            agreed = sorted(read_directory(store, r).clients)
            self._run(trainer, "secagg_share", [  # shares a crash interrupted are made again, the same bytes
                self._share_step(trainer, r, c, agreed) for c in agreed
                if not all(store.exists(share_key(r, c, p)) for p in agreed if p != c)])
            return
        members = sorted(cohort)
        while len(members) >= 2:
            self._run(trainer, "secagg_advertise", [
                self._step(trainer, r, c, [], [advert_key(r, c)], peers=members) for c in members
                if not store.exists(advert_key(r, c))])
            adverts = [a for a in (self._advert(store, r, c) for c in members) if a is not None]
            if len(adverts) < 2:
                break
            threshold = self.config.threshold_for(len(adverts))
            agreed = sorted(a.client for a in adverts)
            write_directory(store, r, adverts, threshold, self._weights(trainer, agreed))
            self._run(trainer, "secagg_share", [self._share_step(trainer, r, c, agreed) for c in agreed])
            shared = [c for c in agreed if all(store.exists(share_key(r, c, p)) for p in agreed if p != c)]
            if shared == agreed:
                log.info("round %d: %d clients agreed keys for secure aggregation (threshold %d)", r, len(agreed),
                         threshold)
                return
            store.delete(directory_key(r))
            members = shared  # agree again without the clients that did not share
        log.warning("round %d: fewer than two clients agreed keys; the round cannot aggregate securely", r)

    @staticmethod
    def _survivors(store: Store, r: int, directory: dict[str, Advertised]) -> list[str]:
        """The survivors recorded before a restart: a bounded JSON list of clients of the directory."""
        key = survivors_key(r)
        try:
            if store.size(key) > _MAX_RECORD:
                raise ValueError("too large")
            survivors = json.loads(store.get(key))
            if not isinstance(survivors, list) or not all(isinstance(c, str) and c in directory for c in survivors):
                raise ValueError("not a list of clients of the round's key directory")
        except ValueError as exc:
            raise GradshardError(f"{key} is not the round's record of survivors ({exc}); the store was altered: "
                                 "use a new store") from None
        return survivors

    @staticmethod
    def _advert(store: Store, r: int, client: str) -> Advertised | None:
        key = advert_key(r, client)
        if not store.exists(key) or store.size(key) > _MAX_RECORD:
            return None
        try:
            raw = json.loads(store.get(key))
            keys = [str(raw["mask_key"]), str(raw["share_key"])]
            if any(len(bytes.fromhex(k)) != 32 for k in keys):
                raise ValueError("an X25519 public key has 32 bytes (64 hex digits)")
            return Advertised(client, keys[0], keys[1])
        except (ValueError, KeyError, TypeError) as exc:  # the client is left out of the round's key agreement
            log.warning("round %d: ignoring the malformed key advert of %s: %s", r, client, str(exc)[:200])
            return None

    def after_clients(self, trainer: Trainer, r: int, cohort: list[str]) -> None:
        store = trainer.store
        if not store.exists(directory_key(r)):
            return
        directory, threshold, _ = read_directory(store, r)
        if store.exists(survivors_key(r)):  # asked once: a restarted round reveals against the same list
            survivors = self._survivors(store, r, directory)
        else:
            survivors = sorted(c for c in directory if store.exists(update_key(r, c)))
            store.put(survivors_key(r), json.dumps(survivors).encode())
        if len(survivors) < threshold:  # the aggregation fails naming the count; the model stays as it was
            log.warning("round %d: %d masked updates arrived, %d are needed to unmask", r, len(survivors), threshold)
            return
        self._run(trainer, "secagg_reveal", [
            self._step(trainer, r, c, [directory_key(r), *(share_key(r, p, c) for p in directory
                                                            if p != c and store.exists(share_key(r, p, c)))],
                       [reveal_key(r, c)], survivors=survivors)
            for c in survivors if not store.exists(reveal_key(r, c))])
