"""The SuperFed task: the elastic ResNet on 8×8 digits, whose ``train`` trains the subnetwork the round's plugin
assigned to the client.

The plugin puts ``{"subnet": i, "depth": [...], "channels": [...], "mids": [...]}`` into the client's options
(``TrainContext.options``). ``train`` extracts that subnetwork from the received global supernet, trains it with the
default loop, writes it back into the supernet (the elements outside it stay bit-for-bit as received, so their
delta is exactly 0) and returns the coverage in :class:`~gradshard.fl.task.Scores`, which the client function
writes into the update's metadata. Without options it trains the whole supernet (an ordinary FedAvg run).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from gradshard.fl import data as fldata
from gradshard.fl.builtin import _load, shape_for
from gradshard.fl.task import Scores, Task, TrainContext, default_train
from gradshard.supernet.model import ElasticResNet, Subnet, extract, write_back


def subnet_from_options(options: Any) -> Subnet | None:
    if not options:
        return None
    mids = options.get("mids")
    return Subnet(tuple(int(d) for d in options["depth"]), tuple(int(c) for c in options["channels"]),
                  None if mids is None else tuple(int(c) for c in mids))


def supernet_task(widths: list[int] | tuple[int, ...] = (16, 32, 64), depths: list[int] | tuple[int, ...] = (2, 2, 2),
                  group_size: int = 4, classes: int = 10, data: str = "digits", test_fraction: float = 0.2,
                  seed: int = 0, mids: list[int] | tuple[int, ...] | None = None) -> Task:
    """The elastic ResNet on a bundled image data set (1×side×side images); ``mids``: the blocks' inner widths
    (default the stage widths)."""

    def make() -> nn.Module:
        return ElasticResNet(tuple(widths), tuple(depths), classes, 1, group_size, mids)

    def load() -> tuple[fldata.Dataset, fldata.Dataset]:
        train, test = _load(data, test_fraction, seed)
        return shape_for("cnn", train), shape_for("cnn", test)

    plain = Task(model=make, data=load, name="supernet")

    def train(model: nn.Module, dataset: fldata.Dataset, context: TrainContext) -> Scores:
        sub = subnet_from_options(context.options)
        if sub is None:
            return default_train(plain, model, dataset, context)
        assert isinstance(model, ElasticResNet)
        small = extract(model, sub)
        local = dataclasses.replace(context, anchor=tuple(p.detach().clone() for p in small.parameters()))
        scores = default_train(plain, small, dataset, local)
        extents = write_back(model, small)
        return Scores(scores.loss, scores.accuracy, coverage=extents)

    return Task(model=make, data=load, train=train, name="supernet")
