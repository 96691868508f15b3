"""What one training run did, collected from its store into a typed :class:`RunReport` (no rendering here).

Everything comes from what the run persisted (see :mod:`gradshard.format.keys`): ``run/config.json``, one
``metrics/<r>.json`` per finished round, and per round the invocation reports of its client functions
(``client_reports.json``), aggregation (``reports.json``, which also holds the plan) and server step
(``server_reports.json``), and the demo's bit-identity check (``flat_check.json``). A piece a run did not write
(an older run, a round that could not aggregate) is ``None`` or empty, and the page says "not recorded".

The predicted cloud cost of a round is :func:`gradshard.cost.model.cost_of_local_run` applied to the round's
aggregation plan and reports, as ``gradshard aggregate`` prints it.

Every string read from the store (client ids, reasons, error messages) is untrusted; this module keeps them as they
are, and the renderer escapes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from gradshard.cost.model import CostOptions, cost_of_local_run
from gradshard.errors import GradshardError, PlanError
from gradshard.fl.report import FlatCheck, summary
from gradshard.format.keys import (
    CONFIG_KEY,
    client_reports_key,
    flat_check_key,
    metrics_key,
    reports_key,
    server_reports_key,
    spec_key,
)
from gradshard.format.round import load_spec
from gradshard.runtime.report import InvocationReport
from gradshard.store import Store
from gradshard.topology.base import Invocation, Plan

Stage = Literal["client", "aggregation", "server"]
STAGES: tuple[Stage, ...] = ("client", "aggregation", "server")
#: The aggregation is priced as ``gradshard aggregate`` prices it: gradshard's ranged object layout.
COST_OPTIONS = CostOptions(layout="ranged")
_CLIENT_PREFIX = "client-"  # the trainer names a client's invocation client-<client id>


class NotATrainingRunError(GradshardError):
    """The store holds no training run (no ``run/config.json``)."""


@dataclass(frozen=True)
class FunctionRun:
    """One function invocation of a round: its outcome, time and memory against its cap."""

    stage: Stage
    invocation: str
    function: str
    ok: bool
    attempts: int
    duration_s: float
    wall_s: float
    peak_rss_bytes: int | None
    memory_cap_bytes: int | None
    error: str | None

    @property
    def cap_fraction(self) -> float | None:
        """Peak memory as a fraction of the cap (``None`` without either)."""
        if self.peak_rss_bytes is None or not self.memory_cap_bytes:
            return None
        return self.peak_rss_bytes / self.memory_cap_bytes

    @classmethod
    def from_report(cls, stage: Stage, report: InvocationReport) -> FunctionRun:
        return cls(stage=stage, invocation=report.invocation, function=report.function, ok=report.ok,
                   attempts=report.attempts, duration_s=report.duration_s, wall_s=report.wall_s,
                   peak_rss_bytes=report.peak_rss_bytes, memory_cap_bytes=report.memory_cap_bytes,
                   error=None if report.ok else f"{report.error_type}: {report.error}")


@dataclass(frozen=True)
class RoundCost:
    """A round's aggregation priced on the cloud: predicted by the cost model, and at the run's own measurements."""

    topology: str
    clients: int
    invocations: int
    prices: str
    predicted_memory_mb: int
    predicted_latency_s: float
    predicted_per_round: float
    predicted_per_1000: float
    measured_memory_mb: int
    measured_per_1000: float


@dataclass(frozen=True)
class RoundReport:
    """One finished round: its metrics (``metrics/<r>.json``), its functions and its predicted cost."""

    round: int
    cohort: tuple[str, ...]
    aggregated: tuple[str, ...]
    rejected: dict[str, str]
    failed: dict[str, str]
    test_loss: float
    test_accuracy: float
    client_loss: float | None
    client_seconds: float
    aggregate_seconds: float
    server_seconds: float
    wall_seconds: float
    resumed: bool
    topology: str | None = None
    functions: tuple[FunctionRun, ...] = ()
    recorded: frozenset[Stage] = frozenset()  # the stages whose reports the store holds
    cost: RoundCost | None = None
    cost_note: str = ""  # why there is no cost

    @property
    def has_problems(self) -> bool:
        return bool(self.failed or self.rejected)

    def stage(self, stage: Stage) -> tuple[FunctionRun, ...]:
        return tuple(f for f in self.functions if f.stage == stage)


@dataclass(frozen=True)
class RunReport:
    """A training run as its store records it."""

    location: str
    config: dict[str, Any]
    rounds: tuple[RoundReport, ...]
    flat_checks: tuple[FlatCheck, ...] = ()
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def planned_rounds(self) -> int:
        return int(self.config.get("rounds", len(self.rounds)))


def _json(store: Store, key: str) -> Any:
    try:
        return json.loads(store.get(key))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GradshardError(f"{key} in the store is not valid JSON ({exc}); the run's record is damaged") from None


def _reports(store: Store, key: str) -> list[InvocationReport] | None:
    if not store.exists(key):
        return None
    doc = _json(store, key)
    try:
        return [InvocationReport.model_validate(r) for r in doc["reports"]]
    except (KeyError, TypeError, ValidationError) as exc:
        raise GradshardError(f"{key} in the store holds no list of invocation reports ({exc})") from None


def plan_from_dict(data: dict[str, Any]) -> Plan:
    """A plan as ``Plan.to_dict`` wrote it into ``reports.json``."""
    invocations = tuple(Invocation(i["id"], i["function"], i["args"], i["memory_bytes"], tuple(i["depends_on"]),
                                   i.get("node", 0), i.get("warm_key"), i.get("module", ""),
                                   i.get("memory_cap_bytes"))
                        for i in data["invocations"])
    return Plan(data["topology"], invocations, data.get("params", {}))


def round_cost(store: Store, r: int, doc: dict[str, Any]) -> RoundCost:
    """The predicted cloud cost of round ``r``'s aggregation from its ``reports.json`` document."""
    try:
        plan = plan_from_dict(doc["plan"])
        reports = [InvocationReport.model_validate(rep) for rep in doc["reports"]]
        clients = int(doc["summary"]["clients"])
    except (KeyError, TypeError, ValueError, ValidationError) as exc:
        raise PlanError(f"{reports_key(r)} holds no plan with its reports ({exc})") from None
    model_bytes = load_spec(store, r).model_layout().nbytes
    cost = cost_of_local_run(plan, reports, clients, model_bytes, COST_OPTIONS)
    predicted, measured = cost.predicted, cost.measured
    return RoundCost(topology=plan.topology, clients=clients, invocations=len(plan.invocations),
                     prices=f"{predicted.options.prices.name} (prices of {predicted.options.prices.as_of})",
                     predicted_memory_mb=predicted.memory_mb, predicted_latency_s=predicted.latency_s,
                     predicted_per_round=predicted.per_round.total,
                     predicted_per_1000=predicted.per_1000_rounds.total, measured_memory_mb=measured.memory_mb,
                     measured_per_1000=measured.per_1000_rounds.total)


def _functions(store: Store, r: int) -> tuple[list[FunctionRun], set[Stage], dict[str, Any] | None]:
    """The round's function runs by stage, the stages recorded, and the aggregation's ``reports.json``."""
    runs: list[FunctionRun] = []
    recorded: set[Stage] = set()
    aggregation = _json(store, reports_key(r)) if store.exists(reports_key(r)) else None
    by_stage = {"client": _reports(store, client_reports_key(r)),
                "aggregation": _reports(store, reports_key(r)) if aggregation is not None else None,
                "server": _reports(store, server_reports_key(r))}
    for stage in STAGES:
        reports = by_stage[stage]
        if reports is not None:
            recorded.add(stage)
            runs += [FunctionRun.from_report(stage, rep) for rep in reports]
    return runs, recorded, aggregation


def load_round(store: Store, r: int, m: dict[str, Any]) -> RoundReport:
    """Round ``r`` as recorded: its metrics ``m`` (``metrics/<r>.json``) with its function reports and cost."""
    runs, recorded, aggregation = _functions(store, r)
    cost, note = None, ""
    if aggregation is None:
        note = "no aggregation reports (the round did not aggregate)"
    elif not store.exists(spec_key(r)):
        note = f"no {spec_key(r)}"
    else:
        try:
            cost = round_cost(store, r, aggregation)
        except PlanError as exc:  # e.g. an executor that measures no peak memory
            note = str(exc)
    try:
        return RoundReport(
            round=int(m["round"]), cohort=tuple(m["cohort"]), aggregated=tuple(m["aggregated"]),
            rejected={str(k): str(v) for k, v in m["rejected"].items()},
            failed={str(k): str(v) for k, v in m["failed"].items()}, test_loss=float(m["test_loss"]),
            test_accuracy=float(m["test_accuracy"]),
            client_loss=None if m.get("client_loss") is None else float(m["client_loss"]),
            client_seconds=float(m["client_seconds"]), aggregate_seconds=float(m["aggregate_seconds"]),
            server_seconds=float(m["server_seconds"]), wall_seconds=float(m["wall_seconds"]),
            resumed=bool(m.get("resumed", False)),
            topology=str(aggregation["summary"]["topology"]) if aggregation else None, functions=tuple(runs),
            recorded=frozenset(recorded), cost=cost, cost_note=note)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise GradshardError(f"{metrics_key(r)} in the store is not a round's metrics ({exc!r})") from None


def _flat_check(store: Store, r: int) -> FlatCheck | None:
    if not store.exists(flat_check_key(r)):
        return None
    doc = _json(store, flat_check_key(r))
    try:
        return FlatCheck(round=int(doc["round"]), sharded_aggregate=str(doc["sharded_aggregate"]),
                         flat_aggregate=str(doc["flat_aggregate"]), sharded_model=str(doc["sharded_model"]),
                         flat_model=str(doc["flat_model"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise GradshardError(f"{flat_check_key(r)} in the store is not a bit-identity check ({exc!r})") from None


def client_of(run: FunctionRun) -> str:
    """The client a client function trained (its invocation is named ``client-<client id>``)."""
    return run.invocation.removeprefix(_CLIENT_PREFIX)


def load_run_report(store: Store, location: str = "") -> RunReport:
    """Collect the run in ``store``: its config, every finished round, and the bit-identity checks recorded.

    Raises :class:`NotATrainingRunError` if the store holds no training run."""
    where = location or "the store"
    if not store.exists(CONFIG_KEY):
        raise NotATrainingRunError(f"{where} holds no training run (no {CONFIG_KEY}); point --store at the store "
                                   "of a 'gradshard train' or 'gradshard demo --store' run")
    config = _json(store, CONFIG_KEY)
    if not isinstance(config, dict):
        raise NotATrainingRunError(f"{CONFIG_KEY} in {where} is not a training config")
    stored: list[dict[str, Any]] = []
    while store.exists(metrics_key(len(stored))):
        stored.append(_json(store, metrics_key(len(stored))))
    rounds = [load_round(store, r, m) for r, m in enumerate(stored)]
    checks = [c for c in (_flat_check(store, r.round) for r in rounds) if c is not None]
    return RunReport(location=location, config=config, rounds=tuple(rounds), flat_checks=tuple(checks),
                     summary=summary(stored))
