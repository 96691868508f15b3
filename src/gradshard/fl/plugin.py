"""Round plugins: a small, generic hook through which a training method shapes every round of a :class:`Trainer`.

A plugin decides, once per round and before any client runs, what each sampled client is told (per-client options
that reach the task's ``train`` as :attr:`~gradshard.fl.task.TrainContext.options`), which sampled clients sit the
round out (and why), each client function's memory cap, and how the round aggregates (an
:class:`~gradshard.aggregation.driver.AggregateConfig` derived from the run's). These decisions are written to
the store as ``rounds/<r>/plugin.json`` before the clients are invoked; a restarted driver reads them back instead
of asking the plugin again, so a resumed run reproduces them, and a plugin whose decisions depend on earlier rounds
(a history of who trained what) reads that history from the same records (:meth:`Trainer.plugin_record`).
After the server step, ``evaluate`` adds the plugin's own metrics to ``metrics/<r>.json`` (under ``plugin``).

With no plugin a run is exactly what it was before plugins existed: no record is written, client tasks carry no
options, the aggregation is the run's, and the metrics have no ``plugin`` entry.

A plugin may also wrap the run's task (``wrap_task``: block-wise training puts output modules around the user's
model) and supply one when the user gives none (``task``).

SuperFed (:mod:`gradshard.supernet`), block-wise training (:mod:`gradshard.blockwise`) and secure aggregation
(:mod:`gradshard.fl.secure`: ``before_clients``, ``client_task`` and ``after_clients`` run its key agreement, masking
and unmasking steps) are plugins; the trainer knows nothing about them beyond :func:`plugin_for_config` mapping their
config tables to them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from gradshard.aggregation.driver import AggregateConfig

if TYPE_CHECKING:
    from gradshard.fl.client import ClientTask
    from gradshard.fl.config import TrainConfig
    from gradshard.fl.data import Dataset
    from gradshard.fl.driver import Trainer
    from gradshard.fl.task import TaskRef


class PluginRound(BaseModel):
    """What a plugin decided for one round (``rounds/<r>/plugin.json``): the plugin's name, every client's
    options, the clients that sit the round out (client -> why; they are not invoked), the memory cap of each
    client's function (bytes; absent: the executor's), the round's aggregation settings and any notes the plugin
    wants kept (e.g. a schedule's value)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    plugin: str
    round: int = Field(ge=0)
    client_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    idle: dict[str, str] = Field(default_factory=dict)
    memory: dict[str, int] = Field(default_factory=dict)
    aggregation: AggregateConfig
    notes: dict[str, Any] = Field(default_factory=dict)


class RoundPlugin(ABC):
    """The hooks a training method implements; every hook has a neutral default except ``name``.

    Hooks are called by the driver only when a round is first opened (``client_options``, ``idle``,
    ``client_memory``, ``aggregation``, ``notes``) or evaluated (``evaluate``); ``prepare`` once per start of a run,
    after the run's fixed inputs are in the store. They must be deterministic in (run config, round, recorded
    history, what ``prepare`` stored).
    """

    @property
    @abstractmethod
    def name(self) -> str:
        """A short name recorded with every decision (a record of another plugin is refused on resume)."""

    def task(self, config: TrainConfig) -> TaskRef | None:
        """The run's task when the user gives none (None: the trainer's usual choice)."""
        return None

    def wrap_task(self, config: TrainConfig, ref: TaskRef, datasets: tuple[Dataset, Dataset] | None = None
                  ) -> TaskRef:
        """The task the run trains, given the one the user chose and the caller's own ``(train, test)`` data if any,
        in the model's input shape (default: the chosen task)."""
        return ref

    def prepare(self, trainer: Trainer) -> None:  # noqa: B027 - optional hook
        """Once per start, after the config, data and initial model are in the store (e.g. measure something)."""

    def client_options(self, trainer: Trainer, r: int, cohort: list[str]) -> dict[str, dict[str, Any]]:
        """Per-client options (JSON-able) for round ``r``; they reach the task as ``TrainContext.options``."""
        return {}

    def idle(self, trainer: Trainer, r: int, cohort: list[str]) -> dict[str, str]:
        """Sampled clients that sit round ``r`` out, with the reason (they are not invoked)."""
        return {}

    def client_memory(self, trainer: Trainer, r: int, cohort: list[str]) -> dict[str, int]:
        """The memory cap (bytes) of each client's function in round ``r`` (absent: the executor's cap)."""
        return {}

    def aggregation(self, trainer: Trainer, r: int, cohort: list[str],
                    options: Mapping[str, Mapping[str, Any]], base: AggregateConfig) -> AggregateConfig:
        """The round's aggregation settings, given the run's (``base``) and the options just decided."""
        return base

    def notes(self, trainer: Trainer, r: int, cohort: list[str]) -> dict[str, Any]:
        """Anything else worth recording with the round's decisions (JSON-able)."""
        return {}

    def before_clients(self, trainer: Trainer, r: int, cohort: list[str]) -> None:  # noqa: B027 - optional hook
        """Run before round ``r``'s clients train, each time the round's clients are (re)started (e.g. key
        agreement: invocations of its own on ``trainer.client_executor``). Must be idempotent: a restarted round
        calls it again."""

    def client_task(self, trainer: Trainer, task: ClientTask) -> ClientTask:
        """The task a client of the round is given, from the one the trainer made, presigned URLs included when the
        clients have them (default: as it is; a plugin that has the client read more adds their URLs,
        :meth:`Trainer.presign`)."""
        return task

    def after_clients(self, trainer: Trainer, r: int, cohort: list[str]) -> None:  # noqa: B027 - optional hook
        """Run after round ``r``'s clients, before its aggregation (e.g. the survivors' unmasking step).
        Idempotent, like :meth:`before_clients`."""

    def summary(self, metrics: Mapping[str, Any]) -> str:
        """One line about a round for people (the command line prints it under the round), from what
        ``evaluate`` returned; empty: nothing to add."""
        return ""

    def evaluate(self, trainer: Trainer, r: int) -> dict[str, Any]:
        """Extra metrics of ``models/<r + 1>`` (the model after round ``r``), stored under ``plugin``."""
        return {}


def plugin_for_config(config: TrainConfig) -> RoundPlugin | None:
    """The plugin a run's config asks for (its ``[supernet]``, ``[blockwise]`` or ``[secure_aggregation]`` table),
    or None."""
    if config.supernet is not None:
        from gradshard.supernet.plugin import SupernetPlugin

        return SupernetPlugin(config.supernet)
    if config.blockwise is not None:
        from gradshard.blockwise.plugin import BlockwisePlugin

        return BlockwisePlugin(config.blockwise)
    if config.secure_aggregation is not None:
        from gradshard.fl.secure import SecureAggregationPlugin

        return SecureAggregationPlugin(config.secure_aggregation)
    return None
