"""Plans: the small DAG of function invocations a topology turns a round into.

A plan is data. Each :class:`Invocation` names its function, its typed arguments (the function's registered
pydantic model: object keys, element ranges, where to write), the memory it needs and what it depends on. Any
executor runs any plan; cost, memory and latency are computed from the same plan (predicted) and from its reports
(measured).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from gradshard.errors import PlanError
from gradshard.units import MIB


@dataclass(frozen=True)
class Invocation:
    """One function call: ``function(args)`` needing ``memory_bytes`` above the interpreter's baseline.

    ``node`` places it (LIFL's locality; every other topology uses node 0); invocations with the same
    ``warm_key`` may reuse one warm worker across rounds on executors that keep workers. ``module`` travels with
    the invocation so that a worker that does not know the function yet can import it. ``memory_cap_bytes`` is this
    invocation's own memory limit (a function's memory size, e.g. a client's declared budget): executors that
    enforce caps use the smaller of it and their own.
    """

    id: str
    function: str
    args: BaseModel
    memory_bytes: int
    depends_on: tuple[str, ...] = ()
    node: int = 0
    warm_key: str | None = None

    module: str = ""  # the module that registers the function; filled in from the registry
    memory_cap_bytes: int | None = None

    def __post_init__(self) -> None:
        from gradshard.runtime import registry  # plans are data: the registry is consulted, never the executors

        # A dict (a plan read back from JSON) becomes the function's argument model; a model is type-checked.
        spec = registry.resolve(self.function, self.module) if self.module or isinstance(self.args, dict) else None
        spec = spec or registry.find(self.function)
        object.__setattr__(self, "args", registry.validate_args(self.function, self.args))
        if spec is not None:
            object.__setattr__(self, "module", spec.module)
        cap = self.memory_cap_bytes  # may come from a plan read back from a stored report: check its type too
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise PlanError(f"invocation {self.id!r}: memory_cap_bytes must be an integer >= 1 or null, got {cap!r}")

    def payload(self) -> dict[str, Any]:
        """The arguments as they travel: JSON."""
        return self.args.model_dump(mode="json")


@dataclass(frozen=True)
class Plan:
    """A topology's invocations for one round, in dependency order."""

    topology: str
    invocations: tuple[Invocation, ...]
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for inv in self.invocations:
            if inv.id in seen:
                raise PlanError(f"plan {self.topology!r} has two invocations named {inv.id!r}")
            missing = [d for d in inv.depends_on if d not in seen]
            if missing:
                raise PlanError(f"invocation {inv.id!r} depends on {missing}, which do not come before it")
            seen.add(inv.id)

    def stages(self) -> list[list[Invocation]]:
        """Invocations grouped into levels; every invocation's dependencies are in earlier levels."""
        level: dict[str, int] = {}
        for inv in self.invocations:
            level[inv.id] = 1 + max((level[d] for d in inv.depends_on), default=-1)
        out: list[list[Invocation]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
        for inv in self.invocations:
            out[level[inv.id]].append(inv)
        return out

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-able data (what every invocation runs, on what, needing how much memory); secrets in
        the arguments (a central-DP noise key) are redacted: this is what reports store."""
        return {"topology": self.topology, "params": self.params,
                "invocations": [{"id": i.id, "function": i.function, "module": i.module,
                                 "args": i.args.model_dump(mode="json", context={"redact": True}),
                                 "memory_bytes": i.memory_bytes, "memory_cap_bytes": i.memory_cap_bytes,
                                 "depends_on": list(i.depends_on), "node": i.node, "warm_key": i.warm_key}
                                for i in self.invocations]}

    @property
    def levels(self) -> int:
        return len(self.stages())

    @property
    def peak_memory_bytes(self) -> int:
        """The largest memory any one invocation of the plan needs."""
        return max((inv.memory_bytes for inv in self.invocations), default=0)


def check_fits(plan: Plan, memory_limit_bytes: int | None, baseline_bytes: int = 0) -> None:
    """Raise :class:`PlanError` if an invocation's need plus the baseline exceeds the per-function limit."""
    if memory_limit_bytes is None:
        return
    worst = max(plan.invocations, key=lambda inv: inv.memory_bytes, default=None)
    if worst is not None and worst.memory_bytes + baseline_bytes > memory_limit_bytes:
        raise PlanError(
            f"topology {plan.topology!r} is infeasible under a {memory_limit_bytes / MIB:.0f} MiB function limit: "
            f"invocation {worst.id!r} needs {worst.memory_bytes / MIB:.0f} MiB + {baseline_bytes / MIB:.0f} MiB "
            "baseline")

