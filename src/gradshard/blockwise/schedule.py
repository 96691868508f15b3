"""Which stage each client trains in a round: the stage schedule and the memory-aware assignment, as data.

Two schedules of the round's stage s(r) for T blocks and R rounds:

- ``round-robin`` (the paper's code, NeuLiteCode): s(r) = r mod T — the stages cycle, every block is revisited;
- ``pace`` (progressive freezing): stage t is trained for its share of the rounds, in order, ``pace[t]`` of them
  (default: R / T each, the remainder to the first stages), and never again once frozen.

Memory-aware assignment: each client declares a memory budget (bytes); stage t needs ``need[t]`` bytes
(:func:`gradshard.blockwise.blocks.stage_memory_bytes`, or a measured peak). A client that can afford s(r) trains
it; one that cannot trains the latest stage before s(r) it can afford (it still helps the blocks it can hold, so
different memory tiers train different stages in the same round); one that can afford no stage sits the round out
with a reason. The assignment is a plain mapping recorded in the round spec, so a resumed run reproduces it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from gradshard.errors import GradshardError

Schedule = Literal["round-robin", "pace"]


def pace_rounds(blocks: int, rounds: int) -> list[int]:
    """Rounds per stage for the ``pace`` schedule: R / T each, the first ``R mod T`` stages one more."""
    if blocks < 1 or rounds < blocks:
        raise GradshardError(f"a pace schedule needs at least one round per stage: {rounds} rounds, {blocks} stages")
    base, extra = divmod(rounds, blocks)
    return [base + (t < extra) for t in range(blocks)]


def stage_of_round(r: int, blocks: int, schedule: Schedule, rounds: int,
                   pace: Sequence[int] | None = None) -> int:
    """s(r): the stage the round trains."""
    if r < 0:
        raise GradshardError(f"round must be >= 0, got {r}")
    if schedule == "round-robin":
        return r % blocks
    per_stage = list(pace) if pace is not None else pace_rounds(blocks, rounds)
    if len(per_stage) != blocks or any(n < 1 for n in per_stage):
        raise GradshardError(f"pace needs {blocks} positive round counts, got {per_stage}")
    end = 0
    for t, n in enumerate(per_stage):
        end += n
        if r < end:
            return t
    return blocks - 1  # rounds past the schedule keep training the last stage


def assign(stage: int, budgets: Mapping[str, int], need: Sequence[int]) -> tuple[dict[str, int], dict[str, str]]:
    """Client -> the stage it trains this round, and client -> why it trains none (budget below every stage)."""
    if not 0 <= stage < len(need):
        raise GradshardError(f"stage {stage} does not exist: {len(need)} stages")
    assigned: dict[str, int] = {}
    idle: dict[str, str] = {}
    for client in sorted(budgets):
        budget = budgets[client]
        affordable = [t for t in range(stage, -1, -1) if need[t] <= budget]
        if affordable:
            assigned[client] = affordable[0]
        else:
            idle[client] = (f"its memory budget of {budget / 2**20:.1f} MiB is below every stage up to {stage} "
                            f"(the smallest needs {min(need[: stage + 1]) / 2**20:.1f} MiB)")
    return assigned, idle
