"""The SuperFed round plugin: assigns subnetworks, weights the round, evaluates the family.

Per round (decided once, recorded in ``rounds/<r>/plugin.json`` by the trainer, read back on resume):

- ``client_options``: each sampled client's subnetwork (index, depth, channels) from the policy; the sandwich
  policy's history is the earlier rounds' records;
- ``aggregation``: reducer ``coverage-mean`` and the weighting (``server`` with β weights, or uniform / examples).
  ``base_key`` stays empty on purpose: the trainer's updates are *deltas*, so an element no client covers gets a
  zero aggregate delta and the server step (FedAvg, lr 1: ``θ + 1·0``) keeps the previous model's value bit for
  bit; a base model there would be added to the model as if it were a delta;
- ``evaluate``: every evaluated subnetwork's test loss and accuracy, parameters and MACs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from gradshard.aggregation.driver import AggregateConfig
from gradshard.fl.plugin import RoundPlugin
from gradshard.fl.task import EVAL_BATCH, TaskRef
from gradshard.supernet import distribution
from gradshard.supernet.config import SupernetConfig
from gradshard.supernet.model import ElasticResNet, Subnet, macs, parameters, subnet_of

if TYPE_CHECKING:
    from gradshard.fl.config import TrainConfig
    from gradshard.fl.data import Dataset
    from gradshard.fl.driver import Trainer


class SupernetPlugin(RoundPlugin):
    """SuperFed on a :class:`Trainer` (see the module docstring)."""

    def __init__(self, config: SupernetConfig, classes: int = 10, image: int = 8) -> None:
        self.config = config
        self.specs = config.family_specs()
        self.subnets = [subnet_of(s.depth, s.width, config.widths, s.inner) for s in self.specs]
        with torch.device("meta"):
            self.shape = ElasticResNet(config.widths, config.depths, classes, 1, config.group_size)
        self.macs = [macs(self.shape, s, image) for s in self.subnets]
        self.params = [parameters(self.shape, s) for s in self.subnets]
        size = [(m, p) for m, p in zip(self.macs, self.params, strict=True)]
        self.largest = max(range(len(size)), key=lambda i: size[i])
        self.smallest = min(range(len(size)), key=lambda i: size[i])

    @property
    def name(self) -> str:
        return "supernet"

    def task(self, config: TrainConfig) -> TaskRef | None:
        c = self.config
        return TaskRef(target="gradshard.supernet.task:supernet_task",
                       options={"widths": list(c.widths), "depths": list(c.depths), "group_size": c.group_size,
                                "classes": self.shape.classes, "data": config.data.name,
                                "test_fraction": config.data.test_fraction, "seed": config.seed})

    def assignment(self, trainer: Trainer, r: int, cohort: list[str]) -> dict[str, int]:
        k, seed = len(self.subnets), trainer.config.seed
        if self.config.policy == "static":
            return distribution.assign_static(cohort, k)
        if self.config.policy == "random":
            return distribution.assign_random(cohort, k, seed, r)
        history = []
        for q in range(r):
            record = trainer.plugin_record(q)
            if record is not None:
                history.append({c: int(o["subnet"]) for c, o in record.client_options.items()})
        return distribution.assign_sandwich(cohort, k, self.largest, self.smallest, history, seed, r,
                                            self.config.sandwich_clients)

    def client_options(self, trainer: Trainer, r: int, cohort: list[str]) -> dict[str, dict[str, Any]]:
        return {client: {"subnet": i, "depth": list(self.subnets[i].depth),
                         "channels": list(self.subnets[i].channels), "mids": list(self.subnets[i].inner)}
                for client, i in self.assignment(trainer, r, cohort).items()}

    def beta(self, trainer: Trainer, r: int) -> float:
        c = self.config
        return distribution.beta(r, trainer.config.rounds, c.beta_start, c.beta_end, c.beta_share, c.schedule)

    def aggregation(self, trainer: Trainer, r: int, cohort: list[str],
                    options: Mapping[str, Mapping[str, Any]], base: AggregateConfig) -> AggregateConfig:
        update: dict[str, Any] = {"reducer": "coverage-mean", "weights": None}
        if self.config.weighting == "beta" and options:
            assignment = {client: int(o["subnet"]) for client, o in options.items()}
            update.update(weighting="server",
                          weights=distribution.beta_weights(assignment, self.largest, self.beta(trainer, r)))
        else:
            update["weighting"] = "examples" if self.config.weighting == "examples" else "uniform"
        return AggregateConfig.model_validate({**base.model_dump(), **update})

    def notes(self, trainer: Trainer, r: int, cohort: list[str]) -> dict[str, Any]:
        return {"beta": self.beta(trainer, r) if self.config.weighting == "beta" else None,
                "largest": self.largest, "smallest": self.smallest}

    def evaluate(self, trainer: Trainer, r: int) -> dict[str, Any]:
        model = trainer.load_model(r + 1)
        assert isinstance(model, ElasticResNet)
        test = trainer.test_set()
        chosen = self.config.evaluate if self.config.evaluate is not None else range(len(self.subnets))
        rows = []
        for i in chosen:
            loss, accuracy = score_subnet(model, self.subnets[i], test)
            rows.append({"index": i, "label": self.specs[i].label, "depth": list(self.subnets[i].depth),
                         "channels": list(self.subnets[i].channels), "mids": list(self.subnets[i].inner),
                         "params": self.params[i],
                         "macs": self.macs[i], "test_loss": loss, "test_accuracy": accuracy})
        record = trainer.plugin_record(r)
        return {"subnets": rows, "beta": record.notes.get("beta") if record is not None else None,
                "assignment": {c: int(o["subnet"]) for c, o in record.client_options.items()}
                if record is not None else {}}


def score_subnet(model: ElasticResNet, sub: Subnet, data: Dataset) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of subnetwork ``sub`` run inside the supernet."""
    model.eval()
    total, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data), EVAL_BATCH):
            x = torch.from_numpy(data.x[start : start + EVAL_BATCH])
            y = torch.from_numpy(data.y[start : start + EVAL_BATCH])
            logits = model(x, sub)
            total += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
    n = max(1, len(data))
    return total / n, correct / n
