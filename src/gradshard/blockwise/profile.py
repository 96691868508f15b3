"""``profile_stage``: train one stage for a few steps so the executor measures its peak memory.

A block-wise run with memory budgets runs one invocation per stage on the client executor before its first round;
the executor's measured peak resident memory of each is that stage's need (what a client function training the
stage takes, interpreter and torch included: the same measure its memory cap enforces). The batch is zeros in the
model's input shape — memory depends on shapes, not values.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from gradshard.blockwise.config import BlockwiseConfig
from gradshard.blockwise.model import BlockwiseModel
from gradshard.blockwise.task import train_stage
from gradshard.fl import client as _client  # noqa: F401 - registers the torch runtime this function runs in
from gradshard.fl.data import Dataset
from gradshard.fl.task import TaskRef, TrainContext, load_task
from gradshard.runtime.registry import register
from gradshard.store import Store


class ProfileArgs(BaseModel):
    """One stage's profile: the block-wise task, the stage, the batch and the optimizer settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: TaskRef
    stage: int = Field(ge=0)
    batch_size: int = Field(ge=1)
    steps: int = Field(default=3, ge=1)
    lr: float = Field(default=0.01, gt=0)
    momentum: float = Field(default=0.0, ge=0, lt=1)


class ProfileResult(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: int
    trainable: int  # parameters the stage updates (head included)


def profile_stage(args: ProfileArgs, store: Store) -> ProfileResult:
    """Train stage ``args.stage`` for ``steps`` batches of zeros (one epoch over ``steps × batch_size`` examples)."""
    torch.set_num_threads(1)
    task = load_task(args.task)
    model = task.build()
    assert isinstance(model, BlockwiseModel)
    config = BlockwiseConfig.model_validate(args.task.options["config"])
    shape = args.task.options["input_shape"]
    n = args.steps * args.batch_size
    data = Dataset(np.zeros((n, *shape), dtype=np.float32), np.arange(n, dtype=np.int64) % model.classes,
                   model.classes)
    context = TrainContext(round=0, client="profile", epochs=1, batch_size=args.batch_size, lr=args.lr,
                           momentum=args.momentum, mu=0.0, seed=0)
    train_stage(task, model, args.stage, config, data, context)
    trainable = sum(p.numel() for p in model.stage(args.stage, config.co_adapt).parameters())
    return ProfileResult(stage=args.stage, trainable=trainable)


register("profile_stage", profile_stage, args=ProfileArgs, result=ProfileResult, runtime="torch")
