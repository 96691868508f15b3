"""Federated training rounds whose state lives in the store, so a killed driver continues where it stopped.

Round r turns ``models/<r>`` into ``models/<r+1>``:

1. sample the cohort (deterministic from the seed and r) and open the round (``rounds/<r>/round.json``);
2. invoke a client function for every cohort member that has no update yet (late ones hit the deadline and are
   recorded; crashed and bad ones are recorded and left out);
3. aggregate the deltas with the configured topology (``rounds/<r>/aggregate.safetensors``);
4. apply the server optimizer shard by shard (``models/<r+1>`` and ``server/<r+1>/<slot>``);
5. evaluate and write ``metrics/<r>.json``.

Every step first looks for its output and skips if it is there; every output appears atomically; clients are
deterministic. So a driver killed at any point and started again produces the same models, and no update is lost
or counted twice (an update is one object per (round, client)).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError
from safetensors.numpy import save as save_safetensors

from gradshard.aggregation.driver import AggregateConfig, aggregate_round
from gradshard.core import checksum
from gradshard.core.layout import ModelLayout
from gradshard.core.reducers import parse_reducer
from gradshard.core.shards import ShardPlan
from gradshard.errors import GradshardError, InvocationError, RoundError, TrainingError
from gradshard.extras import missing_extra_error
from gradshard.fl import data as fldata
from gradshard.fl.builtin import builtin_ref, shape_for
from gradshard.fl.client import ClientTask, load_arrays
from gradshard.fl.config import TrainConfig
from gradshard.fl.models import load_numpy_state, seed_everything, state_to_numpy
from gradshard.fl.plugin import PluginRound, RoundPlugin, plugin_for_config
from gradshard.fl.server import ServerStepArgs, ServerStepResult
from gradshard.fl.task import Task, TaskError, TaskRef, load_task, parse_task, ref_of
from gradshard.fl.urls import ClientUrls
from gradshard.format.compact import open_client_update
from gradshard.format.keys import (
    CONFIG_KEY,
    KEPT_KEY,
    ROOT_DATA_KEY,
    TEST_DATA_KEY,
    aggregate_key,
    client_data_key,
    client_reports_key,
    manifest_key,
    metrics_key,
    model_key,
    plugin_key,
    residual_key,
    residual_prefix,
    root_update_key,
    server_reports_key,
    spec_key,
    state_key,
    update_key,
)
from gradshard.format.round import RoundSpec, load_manifest, load_spec, open_round
from gradshard.format.update import UpdateMeta, open_update, read_flat
from gradshard.format.writer import ObjectUpload, merge_digests, write_update
from gradshard.privacy import client_ledger as dp_ledger
from gradshard.privacy.accountant import Release
from gradshard.privacy.config import CentralDPRound
from gradshard.runtime.executor import Executor
from gradshard.runtime.registry import parse_result
from gradshard.runtime.report import InvocationReport
from gradshard.store import S3Store, Store
from gradshard.topology.base import Invocation, Plan

try:
    import torch  # the train extra, checked here
except ModuleNotFoundError as exc:  # the train extra: name it instead of a bare "No module named 'torch'"
    raise missing_extra_error("train", "gradshard.fl (federated training)") from exc

log = logging.getLogger(__name__)
ROOT_CLIENT = "server-root"  # FLTrust: who trains the server's root update (a server function, not a client)


@dataclass
class RoundMetrics:
    """What one round did and measured (also stored as ``metrics/<r>.json``)."""

    round: int
    cohort: list[str]
    aggregated: list[str]
    rejected: dict[str, str]
    failed: dict[str, str]
    test_loss: float
    test_accuracy: float
    client_loss: float | None
    client_seconds: float
    aggregate_seconds: float
    server_seconds: float
    wall_seconds: float
    resumed: bool = False
    central_dp: dict[str, Any] | None = None  # this round's release: clip, σ, clipped clients, ε so far
    client_privacy: dp_ledger.ClientPrivacyRound | None = None  # client DP-SGD runs only
    plugin: dict[str, Any] | None = None  # the round plugin's own metrics (runs with a plugin only)
    idle: dict[str, str] | None = None  # sampled clients the plugin sat out, and why (runs with a plugin only)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        for name in ("plugin", "idle"):
            if d[name] is None:  # runs without a plugin keep their metrics as they were
                del d[name]
        privacy = d.pop("client_privacy")
        if privacy is not None:
            d["client_privacy"] = privacy.model_dump(mode="json")
        return d


def _reasons(by_client: dict[str, str], most: int = 4) -> str:
    """``"a, b: why; c: other"``: clients grouped by reason, the first ``most`` reasons."""
    groups: dict[str, list[str]] = {}
    for client, why in by_client.items():
        groups.setdefault(why, []).append(client)
    parts = [f"{', '.join(clients[:3])}{f' (+{len(clients) - 3})' if len(clients) > 3 else ''}: {why}"
             for why, clients in list(groups.items())[:most]]
    more = f"; and {len(groups) - most} more reasons" if len(groups) > most else ""
    return "; ".join(parts) + more


def client_ids(n: int) -> list[str]:
    return [f"client-{i:04d}" for i in range(n)]


def sample_cohort(config: TrainConfig, r: int) -> list[str]:
    """The round's clients, seeded by (run seed, round), sorted (the same after a restart): ``fixed`` draws
    ``sample_size()`` without replacement; ``poisson`` takes each client with probability sample_size / clients
    (the sampler central DP's accountant amplifies by), so a round may have more, fewer or no clients."""
    ids = client_ids(config.clients)
    rng = np.random.default_rng([config.seed, r])
    if config.sampling == "poisson":
        keep = rng.random(config.clients) < config.sample_size() / config.clients
        return [client for client, kept in zip(ids, keep, strict=True) if kept]
    return sorted(rng.choice(ids, size=config.sample_size(), replace=False).tolist())


def aggregation_config(config: TrainConfig) -> AggregateConfig:
    """The run's aggregation settings, with ``[privacy.central]`` turned into the round's central DP: the mean
    divides by the expected cohort, and the accountant amplifies by the run's sampler."""
    central = config.privacy.central
    if central is None:
        return config.aggregation
    dp = CentralDPRound(clip=central.clip, noise_multiplier=central.noise_multiplier, sampler=config.sampling,
                        population=config.clients, expected_clients=config.sample_size(), delta=central.delta,
                        max_epsilon=central.max_epsilon, key_file=central.key_file)
    return config.aggregation.model_copy(update={"central_dp": dp})


def _put_dataset(store: Store, key: str, data: fldata.Dataset) -> None:
    _put_arrays(store, key, {"x": np.ascontiguousarray(data.x), "y": np.ascontiguousarray(data.y),
                             "classes": np.array([data.num_classes], dtype=np.int64)})


def _reports_json(r: int, function: str, reports: list[InvocationReport], exclude: set[str] | None = None) -> bytes:
    """The invocation reports of one kind of function of round ``r``, as stored next to the aggregation's."""
    return json.dumps({"round": r, "function": function,
                       "reports": [rep.model_dump(mode="json", exclude=exclude) for rep in reports]}, indent=1).encode()


def _put_arrays(store: Store, key: str, arrays: dict[str, Any]) -> None:
    store.put(key, save_safetensors(arrays))


def _with_defaults(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored run config with the fields an older gradshard did not write filled in with their defaults (so a
    run started before a new option existed still resumes); as stored when it does not validate."""
    try:
        return json.loads(TrainConfig.model_validate(stored).model_dump_json())  # type: ignore[no-any-return]
    except ValueError:
        return stored


class Trainer:
    """Runs a :class:`TrainConfig` on a store; client and aggregation functions go to the given executors.

    What is trained is a :class:`~gradshard.fl.task.Task`: ``task`` (an object held by an importable module, a
    ``"module:name"`` / ``"file.py:name"`` reference, or a :class:`TaskRef`), else ``config.task``, else the built-in
    ``config.model`` on ``config.data`` (or on ``datasets``, the caller's own ``(train, test)``).
    ``plugin`` shapes every round (:mod:`gradshard.fl.plugin`); by default the one the config asks for, if any
    (its ``[supernet]`` table), and a plugin may supply the task when none is given.
    """

    def __init__(self, store: Store, config: TrainConfig, executor: Executor, client_executor: Executor | None = None,
                 datasets: tuple[fldata.Dataset, fldata.Dataset] | None = None,
                 task: Task | TaskRef | str | None = None, plugin: RoundPlugin | None = None,
                 presigned_clients: bool = False) -> None:
        if presigned_clients and not isinstance(store, S3Store):
            raise GradshardError("presigned_clients needs an S3 store: the driver presigns each client's URLs")
        self.presigned_clients = presigned_clients
        self.store, self.config = store, config
        self.executor, self.client_executor = executor, client_executor or executor
        self.plugin = plugin if plugin is not None else plugin_for_config(config)
        self.task_ref, self.task = self._resolve(task, datasets)
        if datasets is not None and not config.task and task is None:
            datasets = (shape_for(config.model, datasets[0]), shape_for(config.model, datasets[1]))
        self._datasets = datasets
        self._model = self.task.build()
        self.layout = ModelLayout.from_state_dict(self._model.state_dict())
        self.averaged = self.layout.aggregated()
        if self.averaged.numel == 0:
            raise TaskError(f"task {self.task.name!r}: the model has no floating-point parameters to train")
        if config.privacy.client is not None:  # refuse before any round what no client could train privately
            from gradshard.privacy.dpsgd import check_private

            check_private(self.task, self._model, mu=config.mu)
        self.chunk_elems = checksum.default_chunk_elems(self.averaged.numel)
        # error feedback: top-k clients carry what their uploads left out (not with a plugin's compact uploads)
        self.error_feedback = (config.error_feedback and config.compression.startswith("topk")
                               and self.plugin is None)
        self._aggregated: dict[int, frozenset[str]] = {}  # round -> the clients its aggregate counted (metrics)
        self._signing_keys: dict[str, str] | None = None  # client -> private key path (signed runs)
        self._keys_tmp: tempfile.TemporaryDirectory[str] | None = None

    def _resolve(self, task: Task | TaskRef | str | None,
                 datasets: tuple[fldata.Dataset, fldata.Dataset] | None) -> tuple[TaskRef, Task]:
        c = self.config
        if datasets is not None and not c.task and task is None:  # the built-in model's shape of the caller's data
            datasets = (shape_for(c.model, datasets[0]), shape_for(c.model, datasets[1]))
        if isinstance(task, Task):
            ref = ref_of(task)
            if self.plugin is None or self.plugin.wrap_task(c, ref, datasets) == ref:
                return ref, task
        elif isinstance(task, str):
            ref = parse_task(task)
        elif isinstance(task, TaskRef):
            ref = task
        elif c.task:
            ref = parse_task(c.task, c.task_options)
        elif self.plugin is not None and (supplied := self.plugin.task(c)) is not None:
            ref = supplied
        else:
            ref = builtin_ref(c.model, c.data.name, c.data.test_fraction, c.seed, datasets=datasets)
        if self.plugin is not None:
            wrapped = self.plugin.wrap_task(c, ref, datasets)
            if wrapped != ref:
                return wrapped, load_task(wrapped)
        return ref, load_task(ref)

    @property
    def datasets(self) -> tuple[fldata.Dataset, fldata.Dataset] | None:
        """The run's ``(train, test)`` when the driver partitions the data (None: each client loads its own)."""
        if self._datasets is None and self.task.data is not None:
            data = self.task.data()
            if not (isinstance(data, tuple) and len(data) == 2 and all(isinstance(d, fldata.Dataset) for d in data)):
                raise TaskError(f"task {self.task.name!r}: data() must return (train, test) Datasets, got "
                                f"{type(data).__name__}")
            self._datasets = data
        return self._datasets

    @property
    def uses_root(self) -> bool:
        """Whether the server trains its own root update every round (FLTrust)."""
        return parse_reducer(self.config.aggregation.reducer).name == "fltrust"

    @property
    def data_in_store(self) -> bool:
        """Whether the driver writes every client's data to the store (else the task's client_data loads it)."""
        return self._datasets is not None or self.task.data is not None

    # --- the run's fixed inputs ----------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Write the config, client data and the initial model once; a restarted run checks it is the same run.

        Only ``rounds`` may change between starts (a run is extended, or stopped early, on the same store)."""
        blob = self.config.model_dump_json(indent=1).encode()
        if self.store.exists(CONFIG_KEY):
            stored, wanted = _with_defaults(json.loads(self.store.get(CONFIG_KEY))), json.loads(blob)
            differ = sorted(k for k in stored.keys() | wanted.keys()
                            if k != "rounds" and stored.get(k) != wanted.get(k))
            if differ:
                raise GradshardError(f"the store already holds a different run ({CONFIG_KEY} differs in "
                                     f"{', '.join(differ)}); use a new store")
        if self.uses_root and not self.data_in_store:
            raise GradshardError("reducer fltrust trains the server's root update on a sample of the run's training "
                                 "data, which this task keeps to itself (it has client_data but no data()); give the "
                                 "task a data() or use another reducer")
        if not self.store.exists(model_key(0)):
            self._write_client_data()
            self._write_initial_model()
        self.store.put(CONFIG_KEY, blob)
        if self.plugin is not None:
            self.plugin.prepare(self)

    def _write_client_data(self) -> None:
        datasets = self.datasets
        if datasets is None:  # each client loads its own; the server's test set still goes to the store
            assert self.task.test_data is not None
            test = self.task.test_data()
            if not isinstance(test, fldata.Dataset):
                raise TaskError(f"task {self.task.name!r}: test_data() must return a Dataset, got "
                                f"{type(test).__name__}")
            _put_dataset(self.store, TEST_DATA_KEY, test)
            return
        train, test = datasets
        d = self.config.data
        if d.partition == "iid":
            parts = fldata.partition_iid(train, self.config.clients, seed=self.config.seed)
        else:
            parts = fldata.partition_dirichlet(train, self.config.clients, alpha=d.alpha, seed=self.config.seed)
        for client, part in zip(client_ids(self.config.clients), fldata.client_datasets(train, parts), strict=True):
            _put_dataset(self.store, client_data_key(client), part)
        _put_dataset(self.store, TEST_DATA_KEY, test)
        if self.uses_root:  # FLTrust: the server's root data set, a seeded uniform sample of the training data
            rng = np.random.default_rng([self.config.seed, 0x600D])
            picked = np.sort(rng.choice(len(train), size=min(self.config.root_examples, len(train)), replace=False))
            _put_dataset(self.store, ROOT_DATA_KEY, fldata.Dataset(train.x[picked], train.y[picked],
                                                                   train.num_classes))

    def _write_initial_model(self) -> None:
        seed_everything(self.config.seed)
        model = self.task.build()
        floating, kept = self.layout.split_state(state_to_numpy(model))
        if kept:
            _put_arrays(self.store, KEPT_KEY, kept)
        write_update(self.store, model_key(0), self.averaged, self.averaged.flatten(floating), self._model_meta(0))

    def _model_meta(self, r: int) -> UpdateMeta:
        return UpdateMeta(client="server", round=r, examples=1, layout_digest=self.averaged.digest(),
                          chunk_elems=self.chunk_elems, kind="model")

    def model_sha(self, r: int) -> str:
        with open_update(self.store, model_key(r), "global model", self.averaged) as upd:
            return upd.sha256

    # --- one round -------------------------------------------------------------------------------------------------
    def fault(self, r: int, client: str) -> str:
        return self.config.faults.get(f"{r}/{client}", self.config.faults.get(client, ""))

    def _open(self, r: int) -> RoundSpec:
        if self.store.exists(spec_key(r)):
            return load_spec(self.store, r)
        # a signature needs a cryptographic chunk digest: blake3 (the faster one) when signatures are required
        spec = RoundSpec.create(r, self.averaged, chunk_elems=self.chunk_elems, base_model=self.model_sha(r),
                                cohort=self._within_budget(r, sample_cohort(self.config, r)),
                                min_clients=self.config.min_clients,
                                digest="blake3" if self.config.aggregation.require_signatures else "xxh3_64")
        open_round(self.store, spec)
        return spec

    def keys_directory(self) -> Path:
        """Where the simulated clients' private keys and secrets are: ``keys_dir`` (made 0700 if missing), or a
        temporary directory the trainer keeps while it lives."""
        if self.config.keys_dir:
            directory = Path(self.config.keys_dir)
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            return directory
        if self._keys_tmp is None:
            self._keys_tmp = tempfile.TemporaryDirectory(prefix="gradshard-keys-")
        return Path(self._keys_tmp.name)

    def signing_keys(self) -> dict[str, str]:
        """With ``aggregation.require_signatures``: one key pair per simulated client, private keys as
        ``<client>.pem`` in ``keys_dir`` (or a temporary directory the trainer keeps while it lives), public keys
        registered in the store's registry; ``client -> private key path``. Empty when signatures are not required.
        """
        if not self.config.aggregation.require_signatures:
            return {}
        if self._signing_keys is None:
            from gradshard.security import keys
            from gradshard.security.registry import KeyRegistry

            directory = self.keys_directory()
            registry, paths = KeyRegistry(self.store), {}
            for client in client_ids(self.config.clients):
                path = directory / f"{client}.pem"
                key = keys.load_private_key(path) if path.exists() else keys.generate()
                if not path.exists():
                    keys.save_private_key(key, path)
                registry.register(client, key.public_key())
                paths[client] = str(path.resolve())
            self._signing_keys = paths
        return self._signing_keys

    def plugin_record(self, r: int) -> PluginRound | None:
        """The round plugin's recorded decisions for round ``r`` (None: the round has none yet, or no plugin)."""
        key = plugin_key(r)
        if self.plugin is None or not self.store.exists(key):
            return None
        try:
            record = PluginRound.model_validate_json(self.store.get(key))
        except ValidationError as exc:
            first = exc.errors()[0]
            raise GradshardError(f"{key} is not a valid record of a round plugin's decisions "
                                 f"({'.'.join(str(p) for p in first['loc']) or 'the record'}: {first['msg']}); "
                                 "the store was altered: use a new store") from None
        if record.plugin != self.plugin.name:
            raise GradshardError(f"{key} was written by plugin {record.plugin!r}, but this run's plugin is "
                                 f"{self.plugin.name!r}; use a new store")
        return record

    def _plugin_round(self, spec: RoundSpec) -> PluginRound | None:
        """The plugin's decisions for the round: recorded before any client runs, read back after a restart."""
        if self.plugin is None:
            return None
        recorded = self.plugin_record(spec.round)
        if recorded is not None:
            return recorded
        r, cohort = spec.round, list(spec.cohort or [])
        options = self.plugin.client_options(self, r, cohort)
        aggregation = self.plugin.aggregation(self, r, cohort, options, aggregation_config(self.config))
        record = PluginRound(plugin=self.plugin.name, round=r, client_options=options, aggregation=aggregation,
                             idle=self.plugin.idle(self, r, cohort), memory=self.plugin.client_memory(self, r, cohort),
                             notes=self.plugin.notes(self, r, cohort))
        self.store.put(plugin_key(r), record.model_dump_json(indent=1).encode())
        return record

    def presign(self, reads: list[str], writes: list[str]) -> ClientUrls:
        """Presigned URLs (``presigned_clients``): a GET of each whole object in ``reads`` (with its size) and a PUT
        of each key in ``writes``; valid for the round's deadline and five minutes more (at most 7 days)."""
        assert isinstance(self.store, S3Store)
        expires = int(min(7 * 86400, self.config.deadline_s + 300))
        gets = {}
        for key in reads:
            size = self.store.size(key)
            gets[key] = (self.store.presign_range(key, 0, size, expires) if size else "", size)
        return ClientUrls(gets=gets, puts={key: self.store.presign_put(key, expires) for key in writes})

    def _urls(self, task: ClientTask, output: str) -> ClientUrls:
        """Presigned URLs for ``task``: a GET of each object it reads, a PUT of ``output`` (and its residual)."""
        reads = [k for k in (task.model_key, task.kept_key, task.data_key) if k]
        writes = [output]
        if task.residual_from is not None:
            reads.append(residual_key(task.residual_from, task.client))
        if task.residual_out:
            writes.append(residual_key(task.round, task.client))
        return self.presign(reads, writes)

    def _residual_round(self, client: str, r: int) -> int | None:
        """Error feedback: the last round before ``r`` whose aggregate counted ``client``'s update, if its residual
        of that round is stored (a client whose update was rejected or lost carries the one before)."""
        for k in range(r - 1, -1, -1):
            if k not in self._aggregated:
                record = json.loads(self.store.get(metrics_key(k))) if self.store.exists(metrics_key(k)) else {}
                self._aggregated[k] = frozenset(record.get("aggregated", []))
            if client in self._aggregated[k]:
                return k if self.store.exists(residual_key(k, client)) else None
        return None

    def _drop_carried_residuals(self, r: int, aggregated: list[str]) -> None:
        """Error feedback: once round ``r`` counted a client, its residuals of earlier rounds are never read again."""
        for client in aggregated:
            for key in self.store.list(residual_prefix(client)):
                if key < residual_key(r, client):
                    self.store.delete(key)

    def _client_plan(self, spec: RoundSpec, record: PluginRound | None = None) -> Plan:
        c = self.config
        signing = self.signing_keys()
        kept = KEPT_KEY if self.store.exists(KEPT_KEY) else ""
        invocations = []
        index = {client: i for i, client in enumerate(client_ids(c.clients))}
        for client in spec.cohort or []:
            if self.store.exists(update_key(spec.round, client)):
                continue  # written before a restart: never trained (or counted) twice
            if record is not None and client in record.idle:
                continue  # the plugin sat it out (e.g. no stage fits its memory budget)
            task = ClientTask(round=spec.round, client=client, task=self.task_ref, partition=index[client],
                              partitions=c.clients, model_key=model_key(spec.round), model_sha256=spec.base_model,
                              kept_key=kept, data_key=client_data_key(client) if self.data_in_store else "",
                              epochs=c.epochs, batch_size=c.batch_size, lr=c.lr, momentum=c.momentum, mu=c.mu,
                              seed=c.seed, chunk_elems=spec.chunk_elems, digest=spec.digest,
                              fault=self.fault(spec.round, client), attack=c.attacks.get(client, ""),
                              compression=c.compression,
                              residual_from=self._residual_round(client, spec.round) if self.error_feedback
                              else None,
                              residual_out=self.error_feedback,
                              dp=c.privacy.client,
                              signing_key=signing.get(client, ""),
                              options=record.client_options.get(client, {}) if record is not None else {})
            if self.presigned_clients:
                task = task.model_copy(update={"urls": self._urls(task, update_key(spec.round, client))})
            if self.plugin is not None:  # (after the URLs: a plugin adds those of what it has the client read)
                task = self.plugin.client_task(self, task)
            invocations.append(Invocation(f"client-{client}", "train_client", task, self.averaged.nbytes * 8,
                                          memory_cap_bytes=record.memory.get(client) if record is not None else None))
        if self.uses_root and not self.store.exists(root_update_key(spec.round)):
            # FLTrust: the server's own update, trained like a client's on the root data set, to its own key
            root = ClientTask(round=spec.round, client=ROOT_CLIENT, task=self.task_ref, model_key=model_key(spec.round),
                              model_sha256=spec.base_model, kept_key=kept, data_key=ROOT_DATA_KEY, epochs=c.epochs,
                              batch_size=c.batch_size, lr=c.lr, momentum=c.momentum, seed=c.seed,
                              chunk_elems=spec.chunk_elems, digest=spec.digest,
                              output_key=root_update_key(spec.round))
            if self.presigned_clients:
                root = root.model_copy(update={"urls": self._urls(root, root_update_key(spec.round))})
            invocations.append(Invocation(f"server-{ROOT_CLIENT}", "train_client", root, self.averaged.nbytes * 8))
        return Plan("clients", tuple(invocations))

    def _server_step(self, r: int, shards: int) -> None:
        """models/<r> + aggregate of round r -> models/<r+1> and the optimizer state, shard by shard."""
        opt = self.config.server
        numel = self.averaged.numel
        plan_ranges = ShardPlan.contiguous(numel, min(shards, -(-numel // self.chunk_elems)),
                                           align=self.chunk_elems).ranges
        outputs = {slot: ObjectUpload.begin(self.store, state_key(r + 1, slot), self.averaged,
                                            self._model_meta(r + 1)) for slot in opt.slots}
        outputs["model"] = ObjectUpload.begin(self.store, model_key(r + 1), self.averaged, self._model_meta(r + 1))
        try:
            invocations = []
            for s, (start, stop) in enumerate(plan_ranges):
                args = ServerStepArgs(
                    layout=self.averaged.to_json(), start=start, stop=stop, optimizer=opt, model_key=model_key(r),
                    delta_key=aggregate_key(r),
                    state_keys={slot: state_key(r, slot) if r > 0 else "" for slot in opt.slots},
                    model_out=outputs["model"].target(),
                    state_out={slot: outputs[slot].target() for slot in opt.slots})
                invocations.append(Invocation(f"server-{s:04d}", "server_step", args, 8 << 20))
            reports = self.executor.run(Plan("server", tuple(invocations)), self.store)
            # Without the results (every chunk's digest, committed below): the record is about time and memory.
            self.store.put(server_reports_key(r), _reports_json(r, "server_step", reports, exclude={"result"}))
            failed = [r_ for r_ in reports if not r_.ok]
            if failed or len(reports) != len(invocations):
                # Not a RoundError: the round's updates are fine, so the driver stops (and a restart redoes the
                # step) instead of leaving the model unchanged and dropping the round's updates.
                raise InvocationError(f"server step of round {r} failed: "
                                      + "; ".join(f"{f.invocation}: {f.error_type}: {f.error}" for f in failed))
            for name in [*opt.slots, "model"]:  # the model last: its existence marks the step done
                outputs[name].commit(merge_digests(
                    parse_result(rep.function, rep.result, ServerStepResult).checksums[name] for rep in reports))
        except BaseException:
            for pending in outputs.values():
                pending.abort()
            raise

    def _copy_model(self, r: int) -> None:
        """A round that could not aggregate leaves the model (and optimizer state) unchanged."""
        flat = read_flat(self.store, model_key(r), self.averaged, "global model")
        for slot in self.config.server.slots:  # before round 0 the state is zeros (server_step starts from them)
            state = (read_flat(self.store, state_key(r, slot), self.averaged, f"server state {slot}") if r > 0
                     else np.zeros(self.averaged.numel, dtype=np.float32))
            write_update(self.store, state_key(r + 1, slot), self.averaged, state, self._model_meta(r + 1))
        write_update(self.store, model_key(r + 1), self.averaged, flat, self._model_meta(r + 1))

    def load_model(self, r: int) -> torch.nn.Module:
        """The task's model holding ``models/<r>``."""
        model = self.task.build()
        kept = load_arrays(self.store, KEPT_KEY) if self.store.exists(KEPT_KEY) else {}
        flat = read_flat(self.store, model_key(r), self.averaged, "global model")
        load_numpy_state(model, self.layout.assemble(self.averaged.unflatten(flat), kept))
        return model

    def test_set(self) -> fldata.Dataset:
        """The run's test set (from the store)."""
        test = load_arrays(self.store, TEST_DATA_KEY)
        classes = int(test["classes"][0]) if "classes" in test else int(test["y"].max(initial=0)) + 1
        return fldata.Dataset(test["x"], test["y"], classes)

    def evaluate(self, r: int) -> tuple[float, float]:
        """Test loss and accuracy of ``models/<r>`` (the task's evaluation on the run's test set)."""
        scores = self.task.score(self.load_model(r), self.test_set())
        return scores.loss, scores.accuracy

    def run_round(self, r: int) -> RoundMetrics:
        started = time.perf_counter()
        resumed = self.store.exists(spec_key(r))
        spec = self._open(r)
        record = self._plugin_round(spec)
        t0 = time.perf_counter()
        # Once the round is aggregated (or its model kept) before a restart, its clients are not run again: a late
        # update would not count any more, and training would only repeat the deadline wait.
        settled = self.store.exists(aggregate_key(r)) or self.store.exists(model_key(r + 1))
        if not settled and self.plugin is not None:
            self.plugin.before_clients(self, r, list(spec.cohort or []))
        plan = Plan("clients", ()) if settled else self._client_plan(spec, record)
        client_reports = self.client_executor.run(plan, self.store)
        if not settled and self.plugin is not None:
            self.plugin.after_clients(self, r, list(spec.cohort or []))
        if plan.invocations:
            self._record_client_reports(r, client_reports)
        tasks = {inv.id: inv.args for inv in plan.invocations if isinstance(inv.args, ClientTask)}
        failed = {tasks[rep.invocation].client: f"{rep.error_type}: {rep.error}"
                  for rep in client_reports if not rep.ok}
        if settled:
            idle = record.idle if record is not None else {}
            failed = {c: "no update before the round was aggregated (before a restart)" for c in spec.cohort or []
                      if not self.store.exists(update_key(r, c)) and c not in idle}
        client_privacy = self._account_clients(r, list(spec.cohort or []))
        t1 = time.perf_counter()
        aggregated: list[str] = []
        rejected: dict[str, str] = {}
        central_dp = None
        try:
            if not self.store.exists(aggregate_key(r)):
                if settled:  # the model was kept unchanged before a restart; the round stays unaggregated
                    raise RoundError(f"round {r} could not aggregate (before a restart)")
                aggregate_round(self.store, r, self.executor,
                                record.aggregation if record is not None else aggregation_config(self.config))
            manifest = load_manifest(self.store, manifest_key(r))
            aggregated, rejected = [c.client for c in manifest.clients], dict(manifest.rejected)
            central_dp = manifest.privacy
            t2 = time.perf_counter()
            if not self.store.exists(model_key(r + 1)):
                shards = (self.config.aggregation.for_executor(self.executor).m
                          if self.config.aggregation.topology == "sharded" else 1)
                self._server_step(r, shards)
        except RoundError as exc:
            why = str(exc) + (f"; failed clients: {_reasons(failed)}" if failed else "")
            log.warning("round %d could not aggregate (%s); the model stays as it was", r, why)
            rejected = rejected or {"(round)": why}
            t2 = time.perf_counter()
            if not self.store.exists(model_key(r + 1)):
                self._copy_model(r)
        t3 = time.perf_counter()
        test_loss, test_accuracy = self.evaluate(r + 1)
        losses = self._client_losses(r, aggregated)
        metrics = RoundMetrics(round=r, cohort=list(spec.cohort or []), aggregated=aggregated, rejected=rejected,
                               failed=failed, test_loss=test_loss, test_accuracy=test_accuracy,
                               client_loss=float(np.mean(losses)) if losses else None, client_seconds=t1 - t0,
                               aggregate_seconds=t2 - t1, server_seconds=t3 - t2,
                               wall_seconds=time.perf_counter() - started, resumed=resumed,
                               client_privacy=client_privacy, central_dp=central_dp,
                               plugin=self.plugin.evaluate(self, r) if self.plugin is not None else None,
                               idle=dict(record.idle) if record is not None else None)
        self.store.put(metrics_key(r), json.dumps(metrics.to_dict(), indent=1).encode())
        self._aggregated[r] = frozenset(aggregated)
        if self.error_feedback:
            self._drop_carried_residuals(r, aggregated)
        if self.config.stop_when_all_fail and metrics.cohort and len(failed) == len(metrics.cohort):
            raise TrainingError(f"round {r}: every client failed ({_reasons(failed)}); the run stops (set "
                                "stop_when_all_fail = false to keep the model and go on)")
        return metrics

    # --- client DP-SGD accounting (gradshard.privacy.client_ledger) -----------------------------------------------
    def _within_budget(self, r: int, cohort: list[str]) -> list[str]:
        """The cohort without the clients whose composed ε would pass ``max_epsilon`` after round ``r``.

        Decided before training (the client is not invoked, so it releases nothing) and recorded in its ledger. This
        round's release is predicted as the client's last one (its data and the run's settings do not change), or,
        for a client that has not trained yet, from its data in the store; a task whose clients load their own data
        cannot be predicted before a client's first round, which is therefore not checked."""
        dp = self.config.privacy.client
        if dp is None or dp.max_epsilon is None:
            return cohort
        kept = []
        for client in cohort:
            ledger = dp_ledger.load_ledger(self.store, client, dp.delta)
            predicted = self._predicted_release(client, ledger)
            after = ledger.composed(extra=(predicted,) if predicted is not None else ())
            if after > dp.max_epsilon:
                why = (f"privacy budget: composed ε would be {after:.3f} > max_epsilon {dp.max_epsilon} after round "
                       f"{r} (δ = {dp.delta})")
                dp_ledger.record_exclusion(self.store, client, r, why, dp.delta)
                log.info("round %d: %s left out: %s", r, client, why)
            else:
                kept.append(client)
        return kept

    def _predicted_release(self, client: str, ledger: dp_ledger.ClientLedger) -> Release | None:
        dp = self.config.privacy.client
        assert dp is not None
        if ledger.rounds:
            return ledger.rounds[max(ledger.rounds)].release
        if not self.data_in_store:
            return None
        examples = len(load_arrays(self.store, client_data_key(client))["y"])
        return dp_ledger.predicted_release(dp.noise_multiplier, examples, self.config.batch_size, self.config.epochs)

    def _account_clients(self, r: int, cohort: list[str]) -> dp_ledger.ClientPrivacyRound | None:
        """Record the release of every update of round ``r`` in the store (idempotent: keyed by round) and sum up.

        Every update that reached the store counts — a rejected one was released too."""
        dp = self.config.privacy.client
        if dp is None:
            return None
        participants = []
        for client in cohort:
            key = update_key(r, client)
            if not self.store.exists(key):
                continue
            try:
                with open_client_update(self.store, key, client, self.averaged) as upd:
                    found = dp_ledger.release_from_extra(upd.meta.extra)
            except GradshardError as exc:  # unreadable: the aggregation rejects it too
                log.warning("round %d: %s's update is unreadable (%s); its release is not accounted", r, client, exc)
                continue
            if found is None:
                raise TrainingError(f"round {r}: {client}'s update carries no DP-SGD release although the run has "
                                    "[privacy.client]; it was not trained by this run's client function")
            release, delta = found
            dp_ledger.record_release(self.store, client, r, release, delta)
            participants.append(client)
        return dp_ledger.round_summary(self.store, r, dp.delta, participants)

    def _record_client_reports(self, r: int, reports: list[InvocationReport]) -> None:
        """``rounds/<r>/client_reports.json``: this start's client reports over those of an earlier start (a
        restarted round invokes only the clients without an update, so the others keep their first report)."""
        key = client_reports_key(r)
        earlier = json.loads(self.store.get(key))["reports"] if self.store.exists(key) else []
        rerun = {rep.invocation for rep in reports}
        kept = [InvocationReport.model_validate(d) for d in earlier if d["invocation"] not in rerun]
        self.store.put(key, _reports_json(r, "train_client", [*kept, *reports]))

    def _client_losses(self, r: int, clients: list[str]) -> list[float]:
        """The training losses the aggregated clients wrote into their updates (the same after a restart)."""
        losses = []
        for client in clients:
            with open_client_update(self.store, update_key(r, client), client, self.averaged) as upd:
                if "loss" in upd.meta.extra:  # (updates written by other tools need not say)
                    losses.append(float(upd.meta.extra["loss"]))
        return losses

    def completed_rounds(self) -> int:
        """Rounds whose metrics exist (the next round to run)."""
        r = 0
        while self.store.exists(metrics_key(r)):
            r += 1
        return r

    def run(self, on_round: Callable[[RoundMetrics], None] | None = None) -> list[dict[str, Any]]:
        """Run (or resume) every round; returns the metrics of all rounds, including earlier runs' rounds."""
        self.prepare()
        for r in range(self.completed_rounds(), self.config.rounds):
            metrics = self.run_round(r)
            if on_round is not None:
                on_round(metrics)
        history = [json.loads(self.store.get(metrics_key(r))) for r in range(self.config.rounds)]
        if not any(m["aggregated"] for m in history):
            last = history[-1]
            why = {**last.get("failed", {}), **last.get("rejected", {})}
            raise TrainingError("no client update was aggregated in any round: the model is still the initial one"
                                + (f" (last round: {_reasons(why)})" if why else ""))
        return history

