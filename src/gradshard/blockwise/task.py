"""The block-wise task: any task whose model is an ``nn.Sequential``, wrapped so a client trains one stage.

``blockwise_task(base, config, input_shape, batch_size)`` builds :class:`~gradshard.blockwise.model.BlockwiseModel`
around the base task's model (blocks cut by the config, output modules sized on a zero batch of ``input_shape``),
keeps the base task's data, loss, optimizer and evaluation, and trains the stage the round's plugin put into the
client's options (``{"stage": t}``):

- blocks before t (less the co-adapted modules) are frozen: run without autograd and in eval mode, so neither their
  activations are kept nor their normalisation statistics move;
- block t, the co-adapted modules and head t are trained with the curriculum mentor's loss
  ``loss(out(z_t), y) − λ₁ᵗ·nHSIC(z_t, X) − λ₂ᵗ·nHSIC(logits, Y)`` (the base task's loss, cross-entropy by default);
- the result names what was trained (``Scores.coverage``: whole tensors), so the client uploads only those elements
  and every other element of the model stays bit for bit as it was.

Without options (no plugin) it trains the whole model like the base task.
"""

from __future__ import annotations

from typing import Any

import torch

from gradshard.blockwise.blocks import BlockSplit, child_sizes, split_sequential, stage_loss
from gradshard.blockwise.config import BlockwiseConfig
from gradshard.blockwise.model import BlockwiseModel
from gradshard.fl import data as fldata
from gradshard.fl.task import Scores, Task, TaskError, TaskRef, TrainContext, load_task


def zero_batch(input_shape: list[int] | tuple[int, ...], batch_size: int) -> torch.Tensor:
    """A batch of zeros in the model's input shape (what sizes blocks and heads: only shapes matter)."""
    return torch.zeros(batch_size, *input_shape)


def make_split(body: torch.nn.Module, config: BlockwiseConfig, sample: torch.Tensor) -> BlockSplit:
    """The config's blocks of ``body``: explicit bounds, or T blocks balanced by parameters or by memory."""
    if config.bounds is not None:
        return split_sequential(body, config.bounds)
    sizes = child_sizes(body, sample) if config.balance == "memory" else None
    return split_sequential(body, config.blocks, sizes)


def blockwise_task(base: dict[str, Any], config: dict[str, Any], input_shape: list[int], batch_size: int = 32
                   ) -> Task:
    """The base task (a :class:`TaskRef` as JSON) trained block-wise with ``config`` (a ``[blockwise]`` table)."""
    inner = load_task(TaskRef.model_validate(base))
    settings = BlockwiseConfig.model_validate(config)

    def make() -> BlockwiseModel:
        body = inner.build()
        if not isinstance(body, torch.nn.Sequential):
            raise TaskError(f"task {inner.name!r}: block-wise training needs an nn.Sequential model (its forward is "
                            f"its children in order), got {type(body).__name__}; built-in: --model convnet")
        sample = zero_batch(input_shape, batch_size)
        return BlockwiseModel(body, make_split(body, settings, sample), sample[:2],
                              init_from_classifier=settings.head_init != "random", later=settings.head_init == "later")

    def train(model: torch.nn.Module, data: fldata.Dataset, context: TrainContext) -> Scores:
        if "stage" not in context.options:
            return inner.fit(model, data, context)
        assert isinstance(model, BlockwiseModel)
        t = int(context.options["stage"])
        if not 0 <= t < model.split.blocks:
            raise TaskError(f"stage {t} does not exist: the model has {model.split.blocks} blocks")
        loss, accuracy = train_stage(inner, model, t, settings, data, context)
        state = model.state_dict()  # integer buffers (BatchNorm's counters) are not aggregated: not in the coverage
        extents = {name: tuple(state[name].shape) for name in model.stage_tensors(t, settings.co_adapt)
                   if state[name].is_floating_point()}
        return Scores(loss, accuracy, coverage=extents)

    def evaluate(model: torch.nn.Module, data: fldata.Dataset) -> Scores:
        body = model.body if isinstance(model, BlockwiseModel) else model
        return inner.score(body, data)

    return Task(model=make, data=inner.data, client_data=inner.client_data, test_data=inner.test_data,
                loss=inner.loss, optimizer=inner.optimizer, train=train, evaluate=evaluate,
                name=f"blockwise({inner.name})")


def train_stage(inner: Task, model: BlockwiseModel, t: int, settings: BlockwiseConfig, data: fldata.Dataset,
                context: TrainContext) -> tuple[float, float]:
    """``epochs`` passes of stage t over a seeded shuffle; mean loss and accuracy (of head t) over the batches."""
    model.reload_head(t)  # head_init "later": the output module starts from the last block's current values
    stage = model.stage(t, settings.co_adapt)
    model.train()
    for module in stage.frozen:
        module.eval()  # frozen: no running statistics move either
    params = stage.parameters()
    opt = inner.optimizer(params, context) if inner.optimizer is not None else \
        torch.optim.SGD(params, lr=context.lr, momentum=context.momentum)
    lambda_x, lambda_y = settings.lambdas(t)
    x_all, y_all = torch.from_numpy(data.x), torch.from_numpy(data.y)
    gen = torch.Generator().manual_seed(context.seed)
    losses, correct, seen = [], 0, 0
    for _ in range(context.epochs):
        order = torch.randperm(len(y_all), generator=gen)
        for start in range(0, len(y_all), context.batch_size):
            idx = order[start : start + context.batch_size]
            x, y = x_all[idx], y_all[idx]
            opt.zero_grad()
            z, logits = stage(x)
            # nHSIC needs two samples; a one-example batch trains on the task's loss alone
            lx, ly = (lambda_x, lambda_y) if len(idx) > 1 else (0.0, 0.0)
            loss = stage_loss(logits, y, z, x, model.classes, lx, ly, settings.sigma,
                              criterion=inner.compute_loss)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            losses.append(float(loss.detach()))
            correct += int((logits.argmax(1) == y).sum())
            seen += len(idx)
    return sum(losses) / max(1, len(losses)), correct / max(1, seen)

