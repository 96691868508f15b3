"""The block-wise round plugin: wraps the run's task, schedules stages by memory, aggregates the active blocks.

Per run (``prepare``): with memory budgets declared, each stage's need — given, or measured by one profiling
invocation per stage on the client executor (``blockwise/stages.json``, reused on resume) or estimated, then raised
by ``margin``.

Per round (decided once, recorded in ``rounds/<r>/plugin.json`` by the trainer, read back on resume):

- the round's stage s(r) from the schedule (round-robin or pace);
- ``client_options``: every client's stage — s(r) if its budget affords it, else the latest earlier stage it
  affords; ``idle``: the clients that afford none (not invoked); ``client_memory``: each budgeted client's function
  is capped at its budget, so a stage that does not fit fails with a memory error instead of passing unnoticed;
- ``aggregation``: reducer ``coverage-mean`` (each element averaged over the clients that trained it; elements
  nobody trained get a zero delta, and the shard plan covers only the trained chunks), weighted by examples or
  uniformly;
- ``evaluate``: the test accuracy of every stage's output module (how far each block has come) besides the model's.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gradshard.aggregation.driver import AggregateConfig
from gradshard.blockwise import schedule
from gradshard.blockwise.blocks import stage_memory_bytes
from gradshard.blockwise.config import BlockwiseConfig
from gradshard.blockwise.model import BlockwiseModel
from gradshard.errors import GradshardError
from gradshard.fl.plugin import RoundPlugin
from gradshard.fl.task import EVAL_BATCH, TaskRef, load_task
from gradshard.topology.base import Invocation, Plan
from gradshard.units import MIB

if TYPE_CHECKING:
    from gradshard.fl.config import TrainConfig
    from gradshard.fl.data import Dataset
    from gradshard.fl.driver import Trainer

STAGES_KEY = "blockwise/stages.json"


def input_shape_of(ref: TaskRef, datasets: tuple[Dataset, Dataset] | None = None) -> list[int]:
    """The shape of one input example: of the caller's data, else of the task's data (or test data)."""
    task = load_task(ref)
    data = datasets[1] if datasets is not None else task.data()[1] if task.data is not None else \
        task.test_data() if task.test_data is not None else None
    if data is None or len(data) == 0:
        raise GradshardError(f"task {task.name!r}: block-wise training needs the input shape; the task's data is "
                             "empty or missing")
    return [int(d) for d in data.x.shape[1:]]


class StageNeeds(BaseModel):
    """``blockwise/stages.json``: every stage's memory need in bytes and how it was found."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    need_bytes: list[Annotated[int, Field(strict=True, gt=0)]]
    how: str = Field(max_length=200)


def read_needs(blob: bytes, stages: int) -> list[int]:
    """The stored needs, validated (a malformed or foreign object is an error naming it, never a crash)."""
    try:
        needs = StageNeeds.model_validate_json(blob)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the record"
        raise GradshardError(f"{STAGES_KEY} in the store is not a valid record of stage memory needs ({where}: "
                             f"{first['msg']}); delete it to measure again") from None
    if len(needs.need_bytes) != stages:
        raise GradshardError(f"{STAGES_KEY} holds {len(needs.need_bytes)} stage needs but the run has {stages} "
                             "stages; delete it to measure again")
    return list(needs.need_bytes)


class BlockwisePlugin(RoundPlugin):
    """Block-wise training on a :class:`Trainer` (see the module docstring)."""

    def __init__(self, config: BlockwiseConfig) -> None:
        self.config = config
        self._need: list[int] | None = None
        self._decided: dict[int, tuple[dict[str, int], dict[str, str]]] = {}

    @property
    def name(self) -> str:
        return "blockwise"

    def wrap_task(self, config: TrainConfig, ref: TaskRef, datasets: tuple[Dataset, Dataset] | None = None
                  ) -> TaskRef:
        if ref.target == "gradshard.blockwise.task:blockwise_task":
            return ref
        return TaskRef(target="gradshard.blockwise.task:blockwise_task",
                       options={"base": ref.model_dump(mode="json"), "config": self.config.model_dump(mode="json"),
                                "input_shape": input_shape_of(ref, datasets), "batch_size": config.batch_size})

    # --- memory ----------------------------------------------------------------------------------------------------
    def prepare(self, trainer: Trainer) -> None:
        if not self.budgets(trainer) or self.config.stage_memory_mib is not None:
            return
        if not trainer.store.exists(STAGES_KEY):
            need, how = self.measure(trainer) if self.config.stage_memory == "measure" else (None, "")
            if need is None:
                need, how = self.estimate(trainer), "estimate" + (f" ({how})" if how else "")
            trainer.store.put(STAGES_KEY, json.dumps({"need_bytes": need, "how": how}, indent=1).encode())
        measured = read_needs(trainer.store.get(STAGES_KEY), self.config.stages)
        self._need = [int(n * (1 + self.config.margin)) for n in measured]

    def need(self, trainer: Trainer) -> list[int]:
        """Each stage's memory need in bytes (given, or what ``prepare`` stored)."""
        if self.config.stage_memory_mib is not None:
            return [int(m * MIB) for m in self.config.stage_memory_mib]
        if self._need is None:
            self.prepare(trainer)
        if self._need is None:
            raise GradshardError("the stages' memory needs are unknown: the run has no budgets")
        return self._need

    def estimate(self, trainer: Trainer) -> list[int]:
        """The analytic estimate of every stage plus ``baseline_mib``."""
        model = trainer.task.build()
        assert isinstance(model, BlockwiseModel)
        batch = torch.zeros(self.config.probe_batch or trainer.config.batch_size,
                            *trainer.task_ref.options["input_shape"])
        return [stage_memory_bytes(model.body, model.split, t, batch, model.classes, co_adapt=self.config.co_adapt)
                + int(self.config.baseline_mib * MIB) for t in range(model.split.blocks)]

    def measure(self, trainer: Trainer) -> tuple[list[int] | None, str]:
        """One ``profile_stage`` invocation per stage on the client executor; their peak resident memory."""
        from gradshard.blockwise.profile import ProfileArgs

        batch = self.config.probe_batch or trainer.config.batch_size
        plan = Plan("profile", tuple(Invocation(f"profile-stage-{t}", "profile_stage", ProfileArgs(
            task=trainer.task_ref, stage=t, batch_size=batch, lr=trainer.config.lr,
            momentum=trainer.config.momentum), trainer.averaged.nbytes * 8) for t in range(self.config.stages)))
        reports = trainer.client_executor.run(plan, trainer.store)
        failed = [rep for rep in reports if not rep.ok]
        if failed:
            raise GradshardError("measuring the stages' memory failed: " + "; ".join(
                f"{rep.invocation}: {rep.error_type}: {rep.error}" for rep in failed))
        by_id = {rep.invocation: rep.peak_rss_bytes for rep in reports}
        peaks = [by_id.get(f"profile-stage-{t}") for t in range(self.config.stages)]
        if any(p is None for p in peaks):
            return None, "the client executor measures no peak memory"
        return [int(p) for p in peaks if p is not None], "measured peak resident memory of one stage's training"

    def budgets(self, trainer: Trainer) -> dict[str, int]:
        """Client -> its memory budget in bytes (clients that declare one)."""
        from gradshard.fl.driver import client_ids

        return {c: int(m * MIB) for c, m in self.config.budgets(client_ids(trainer.config.clients)).items()}

    # --- one round ---------------------------------------------------------------------------------------------------
    def stage(self, trainer: Trainer, r: int) -> int:
        c = self.config
        return schedule.stage_of_round(r, c.stages, c.schedule, trainer.config.rounds, c.pace)

    def decide(self, trainer: Trainer, r: int, cohort: list[str]) -> tuple[dict[str, int], dict[str, str]]:
        """Client -> stage, and client -> why it sits out."""
        if r not in self._decided:
            s, budgets = self.stage(trainer, r), self.budgets(trainer)
            limited = {c: budgets[c] for c in cohort if c in budgets}
            stages, idle = schedule.assign(s, limited, self.need(trainer)) if limited else ({}, {})
            stages.update({c: s for c in cohort if c not in limited})
            self._decided[r] = ({c: stages[c] for c in cohort if c in stages}, idle)
        return self._decided[r]

    def client_options(self, trainer: Trainer, r: int, cohort: list[str]) -> dict[str, dict[str, Any]]:
        return {client: {"stage": t} for client, t in self.decide(trainer, r, cohort)[0].items()}

    def idle(self, trainer: Trainer, r: int, cohort: list[str]) -> dict[str, str]:
        return dict(self.decide(trainer, r, cohort)[1])

    def client_memory(self, trainer: Trainer, r: int, cohort: list[str]) -> dict[str, int]:
        budgets = self.budgets(trainer)
        return {c: budgets[c] for c in self.decide(trainer, r, cohort)[0] if c in budgets}

    def aggregation(self, trainer: Trainer, r: int, cohort: list[str],
                    options: Mapping[str, Mapping[str, Any]], base: AggregateConfig) -> AggregateConfig:
        return AggregateConfig.model_validate({**base.model_dump(), "reducer": "coverage-mean", "weights": None,
                                               "weighting": self.config.weighting})

    def notes(self, trainer: Trainer, r: int, cohort: list[str]) -> dict[str, Any]:
        need = self.need(trainer) if self.budgets(trainer) else None
        return {"stage": self.stage(trainer, r), "need_bytes": need}

    def evaluate(self, trainer: Trainer, r: int) -> dict[str, Any]:
        model = trainer.load_model(r + 1)
        assert isinstance(model, BlockwiseModel)
        record = trainer.plugin_record(r)
        return {"stage": record.notes.get("stage") if record is not None else None,
                "assignment": {c: int(o["stage"]) for c, o in record.client_options.items()}
                if record is not None else {},
                "stage_accuracy": stage_accuracies(model, trainer.test_set())}

    def summary(self, metrics: Mapping[str, Any]) -> str:
        per_stage = Counter(int(t) for t in metrics.get("assignment", {}).values())
        return (f"block-wise: stage {metrics.get('stage')}; clients per stage "
                f"{', '.join(f'{t}: {n}' for t, n in sorted(per_stage.items())) or '–'}; stage accuracy "
                f"{' / '.join(f'{a:.3f}' for a in metrics.get('stage_accuracy', []))}")


def stage_accuracies(model: BlockwiseModel, data: Dataset) -> list[float]:
    """The test accuracy of every stage's output on ``data`` (the last stage's is the model's)."""
    model.eval()
    children = list(model.body.children())
    correct = [0] * model.split.blocks
    with torch.no_grad():
        for start in range(0, len(data), EVAL_BATCH):
            x = torch.from_numpy(data.x[start : start + EVAL_BATCH])
            y = torch.from_numpy(data.y[start : start + EVAL_BATCH])
            for t in range(model.split.blocks):
                for i in model.split.children(t):
                    x = children[i](x)
                correct[t] += int((model.head(t)(x).argmax(1) == y).sum())
    return [c / max(1, len(data)) for c in correct]
