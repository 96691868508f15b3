"""The configuration of a federated training run: validated models that map one to one onto a TOML file."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from gradshard.aggregation.driver import AggregateConfig
from gradshard.fl.server import ServerOptimizer


class DataConfig(BaseModel):
    """Which bundled data set, and how it is split among clients."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["digits", "synthetic"] = "digits"
    partition: Literal["iid", "dirichlet"] = "dirichlet"
    alpha: float = Field(default=0.5, gt=0)
    test_fraction: float = Field(default=0.2, gt=0, lt=1)


class TrainConfig(BaseModel):
    """A federated training run; maps one to one onto a TOML file (``gradshard train --config``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = "mlp"
    data: DataConfig = DataConfig()
    clients: int = Field(default=20, ge=1)
    per_round: int | None = Field(default=None, ge=1, description="clients sampled per round (default: all)")
    fraction: float | None = Field(default=None, gt=0, le=1, description="or a fraction of the clients")
    rounds: int = Field(default=20, ge=1)
    # Defaults as in the acceptance test: 20 non-IID digits clients reach >= 0.93 test accuracy within 20 rounds.
    epochs: int = Field(default=5, ge=1)
    batch_size: int = Field(default=16, ge=1)
    lr: float = Field(default=0.1, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1, description="clients' SGD momentum")
    mu: float = Field(default=0.0, ge=0, description="FedProx proximal weight; 0 is FedAvg")
    server: ServerOptimizer = ServerOptimizer()
    aggregation: AggregateConfig = AggregateConfig()
    min_clients: int = Field(default=1, ge=1)
    deadline_s: float = Field(default=300.0, gt=0, description="client functions still running then are late")
    seed: int = 0
    faults: dict[str, str] = Field(default_factory=dict,
                                   description="testing: '<client>' or '<round>/<client>' -> crash | nan | sleep:<s>")

    def sample_size(self) -> int:
        if self.per_round is not None:
            return min(self.per_round, self.clients)
        if self.fraction is not None:
            return max(1, round(self.fraction * self.clients))
        return self.clients
