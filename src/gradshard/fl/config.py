"""The configuration of a federated training run: validated models that map one to one onto a TOML file."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from gradshard.aggregation.driver import AggregateConfig
from gradshard.blockwise.config import BlockwiseConfig
from gradshard.errors import GradshardError
from gradshard.fl.attacks import parse_attack
from gradshard.fl.secure import SecureAggregationConfig
from gradshard.fl.server import ServerOptimizer
from gradshard.format.sparse import parse_compression
from gradshard.privacy.config import PrivacyConfig
from gradshard.supernet.config import SupernetConfig

#: A float field that takes an int but refuses ``true``/``false`` (pydantic's lax mode reads a bool as 1.0 / 0.0).
StrictFloat = Annotated[float, Field(strict=True)]


class DataConfig(BaseModel):
    """Which bundled data set, and how it is split among clients."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["digits", "synthetic"] = "digits"
    partition: Literal["iid", "dirichlet"] = "dirichlet"
    alpha: StrictFloat = Field(default=0.5, gt=0)
    test_fraction: StrictFloat = Field(default=0.2, gt=0, lt=1)


class TrainConfig(BaseModel):
    """A federated training run; maps one to one onto a TOML file (``gradshard train --config``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(default="mlp", description="a built-in task's model (mlp, cnn, convnet, resnet18, vgg16)")
    task: str = Field(default="", description="a task of your own: 'package.module:name' or '/path/file.py:name' "
                                             "(replaces model and data.name)")
    task_options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of a task factory")
    data: DataConfig = DataConfig()
    clients: StrictInt = Field(default=20, ge=1)
    per_round: StrictInt | None = Field(default=None, ge=1, description="clients sampled per round (default: all)")
    fraction: StrictFloat | None = Field(default=None, gt=0, le=1, description="or a fraction of the clients")
    rounds: StrictInt = Field(default=20, ge=1)
    # Defaults as in the acceptance test: 20 non-IID digits clients reach >= 0.93 test accuracy within 20 rounds.
    epochs: StrictInt = Field(default=5, ge=1)
    batch_size: StrictInt = Field(default=16, ge=1)
    lr: StrictFloat = Field(default=0.1, gt=0)
    momentum: StrictFloat = Field(default=0.9, ge=0, lt=1, description="clients' SGD momentum")
    mu: StrictFloat = Field(default=0.0, ge=0, description="FedProx proximal weight; 0 is FedAvg")
    server: ServerOptimizer = ServerOptimizer()
    aggregation: AggregateConfig = AggregateConfig()
    min_clients: StrictInt = Field(default=1, ge=1)
    deadline_s: StrictFloat = Field(default=300.0, gt=0, description="client functions still running then are late")
    seed: StrictInt = 0
    sampling: Literal["fixed", "poisson"] = Field(
        default="fixed", description="how a round samples clients: fixed (per_round of them, without replacement) or "
                                     "poisson (each client with probability per_round / clients)")
    privacy: PrivacyConfig = PrivacyConfig()
    stop_when_all_fail: bool = Field(default=True, description="a round whose every client failed stops the run")
    faults: dict[str, str] = Field(default_factory=dict,
                                   description="testing: '<client>' or '<round>/<client>' -> crash | nan | sleep:<s>")
    compression: str = Field(
        default="none", description="how clients upload their updates: float32 ('none'), block-wise int8 with a "
                                    "scale per chunk ('int8', gradshard.format.quantized: a quarter of the bytes) or "
                                    "the largest entries ('topk:<fraction>', gradshard.format.sparse)")
    error_feedback: bool = Field(
        default=True, description="with compression 'topk:<f>': each client adds what its earlier top-k updates left "
                                  "out (its residual, kept in the store per client) before choosing the top k, so "
                                  "nothing it trained is dropped for good (error feedback); no effect otherwise")
    root_examples: int = Field(default=100, ge=1, description="aggregation.reducer 'fltrust': examples of the server's "
                                                             "root data set, sampled from the training data")
    attacks: dict[str, str] = Field(default_factory=dict,
                                    description="simulated Byzantine clients: '<client>' -> sign-flip | scale:<s> | "
                                                "noise:<sigma> | label-flip (gradshard.fl.attacks)")
    keys_dir: str = Field(default="", description="with aggregation.require_signatures: the directory of the "
                                                  "simulated clients' private keys (<client>.pem; made if missing, "
                                                  "reused if present); empty: a temporary directory for the run")
    supernet: SupernetConfig | None = Field(
        default=None, description="SuperFed: train a supernet whose subnetworks the clients train (docs/superfed.md)")
    blockwise: BlockwiseConfig | None = Field(
        default=None, description="block-wise training for memory-limited clients (docs/blockwise.md)")
    secure_aggregation: SecureAggregationConfig | None = Field(
        default=None, description="secure aggregation: clients upload masked updates, the server learns only the "
                                  "survivors' mean (docs/secure-aggregation.md)")

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        try:
            parse_compression(self.compression)
        except GradshardError as exc:
            raise ValueError(str(exc)) from None
        known = {f"client-{i:04d}" for i in range(self.clients)}
        for client, attack in self.attacks.items():
            if client not in known:
                raise ValueError(f"attacks names client {client[:40]!r}, which the run does not have; its clients "
                                 f"are client-0000 .. client-{self.clients - 1:04d}")
            try:
                parse_attack(attack)
            except GradshardError as exc:
                raise ValueError(str(exc)) from None
        if self.per_round is not None and self.fraction is not None:
            raise ValueError(f"per_round = {self.per_round} and fraction = {self.fraction} are both set; keep one "
                             "(they say the same thing: how many clients a round samples)")
        if self.privacy.central is not None and self.aggregation.weighting != "uniform":
            raise ValueError(f"central DP needs aggregation.weighting = 'uniform' (it is "
                             f"{self.aggregation.weighting!r}): example counts come from the clients, so with them "
                             "a client's influence, and the noise needed to hide it, has no bound")
        if self.privacy.central is not None and self.aggregation.central_dp is not None:
            raise ValueError("set central DP once: [privacy.central] (the trainer fills in the sampling) or "
                             "[aggregation.central_dp], not both")
        methods = [t for t, v in (("supernet", self.supernet), ("blockwise", self.blockwise),
                                  ("secure_aggregation", self.secure_aggregation)) if v is not None]
        if len(methods) > 1:
            raise ValueError(f"{' and '.join(f'[{t}]' for t in methods)} are round methods of their own; a run uses "
                             "one")
        if self.aggregation.reducer.startswith("secagg") and self.secure_aggregation is None:
            raise ValueError("in training, secure aggregation is the [secure_aggregation] table (it runs the clients' "
                             "key agreement and masking, and sets the reducer); remove aggregation.reducer")
        if self.secure_aggregation is not None:
            problem = ("aggregation.reducer must stay 'mean' (the table sets secagg)"
                       if self.aggregation.reducer != "mean" else
                       "compression must be 'none' (a masked update is not compressed)" if self.compression != "none"
                       else "central DP cannot see the updates it would clip" if (
                           self.privacy.central is not None or self.aggregation.central_dp) else
                       "signed updates are not masked ones" if self.aggregation.require_signatures else None)
            if problem is not None:
                raise ValueError(f"[secure_aggregation]: {problem}")
        for table, value in (("supernet", self.supernet), ("blockwise", self.blockwise)):
            if value is not None and self.server.name != "fedavg":
                raise ValueError(f"[{table}] needs server.name = 'fedavg' (it is {self.server.name!r}): an element no "
                                 "client trained has a zero delta, which only plain FedAvg leaves unchanged")
            if value is not None and (self.privacy.central is not None or self.aggregation.central_dp):
                raise ValueError(f"[{table}] aggregates with reducer coverage-mean, which central DP cannot use")
            if value is not None and self.aggregation.topology not in ("sharded", "flat"):
                raise ValueError(f"[{table}] aggregates with reducer coverage-mean, which topology "
                                 f"{self.aggregation.topology!r} cannot run (it sums weighted partials); use "
                                 "aggregation.topology = 'sharded' or 'flat'")
        if self.blockwise is not None:
            known = {f"client-{i:04d}" for i in range(self.clients)}
            unknown = sorted(set(self.blockwise.budgets_mib) - known)
            if unknown:
                raise ValueError(f"[blockwise] budgets_mib names clients the run does not have: {unknown[:5]}; the "
                                 f"run's clients are client-0000 .. client-{self.clients - 1:04d}")
        if self.blockwise is not None and self.blockwise.schedule == "pace" and self.blockwise.pace is None \
                and self.rounds < self.blockwise.stages:
            raise ValueError(f"[blockwise] schedule 'pace' needs at least one round per stage: {self.rounds} rounds, "
                             f"{self.blockwise.stages} stages")
        if self.min_clients > self.sample_size():
            raise ValueError(f"min_clients = {self.min_clients} is more than the {self.sample_size()} clients a "
                             "round samples: no round could aggregate; lower min_clients or sample more clients")
        return self

    def sample_size(self) -> int:
        if self.per_round is not None:
            return min(self.per_round, self.clients)
        if self.fraction is not None:
            return max(1, round(self.fraction * self.clients))
        return self.clients
