"""Shard plans: how the flat vector of P elements is cut into M contiguous ranges.

The paper's partition is ``size = P // M`` with the first ``P % M`` shards one element longer. With ``align=A``
the same rule is applied to ``ceil(P / A)`` units of A elements, so every inner boundary is a multiple of A (the
runtime aligns shards to the checksum chunk, so each shard function can checksum what it writes). The
tensor-aligned variant only cuts between tensors.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
from dataclasses import dataclass
from typing import Any

from gradshard.core.layout import ModelLayout
from gradshard.errors import PlanError


def _paper_partition(units: int, m: int) -> list[int]:
    """Boundaries of the paper's partition of ``units`` into ``m`` parts (first ``units % m`` one longer)."""
    size, extra = divmod(units, m)
    bounds = [0]
    for s in range(m):
        bounds.append(bounds[-1] + size + (1 if s < extra else 0))
    return bounds


def tensor_cuts(layout: ModelLayout, align: int = 1) -> list[int]:
    """Where a tensor-aligned partition may cut: every boundary between tensors, snapped down to ``align``."""
    return sorted({(s.stop // align) * align for s in layout.slots[:-1] if s.stop > 0} - {0, layout.numel})


@dataclass(frozen=True)
class ShardPlan:
    """M contiguous element ranges covering ``[0, numel)``, given by their ``M + 1`` boundaries."""

    numel: int
    boundaries: tuple[int, ...]
    kind: str = "contiguous"
    align: int = 1

    def __post_init__(self) -> None:
        b = self.boundaries
        if len(b) < 2 or b[0] != 0 or b[-1] != self.numel:
            raise PlanError(f"shard boundaries must run from 0 to {self.numel}, got {b[:3]}...{b[-2:]}")
        if any(lo >= hi for lo, hi in itertools.pairwise(b)):
            raise PlanError("shard boundaries must be strictly increasing (no empty shard)")

    @classmethod
    def contiguous(cls, numel: int, m: int, *, align: int = 1) -> ShardPlan:
        """The paper's partition into ``m`` shards; inner boundaries on multiples of ``align``."""
        if m < 1:
            raise PlanError(f"the number of shards M must be at least 1, got {m}")
        if numel < 1:
            raise PlanError(f"cannot shard an empty vector (P = {numel})")
        if align < 1:
            raise PlanError(f"alignment must be at least 1 element, got {align}")
        units = -(-numel // align)
        if m > units:
            what = f"P = {numel} elements" if align == 1 else f"{units} aligned units of {align} elements"
            raise PlanError(f"M = {m} shards is more than {what}; choose M <= {units}")
        bounds = [min(u * align, numel) for u in _paper_partition(units, m)]
        return cls(numel, tuple(bounds), "contiguous", align)

    @classmethod
    def tensor_aligned(cls, layout: ModelLayout, m: int, *, align: int = 1) -> ShardPlan:
        """``m`` shards that cut only between tensors (boundaries snapped down to ``align``), balanced greedily."""
        numel = layout.numel
        if m < 1:
            raise PlanError(f"the number of shards M must be at least 1, got {m}")
        cuts = tensor_cuts(layout, align)
        if m - 1 > len(cuts):
            raise PlanError(f"M = {m} tensor-aligned shards need {m - 1} cuts but the layout offers {len(cuts)}")
        bounds = [0]
        for k in range(1, m):
            target = k * numel / m
            # keep enough cuts to the right for the shards still to come
            lo = bisect.bisect_right(cuts, bounds[-1])
            hi = len(cuts) - (m - 1 - k)
            i = bisect.bisect_left(cuts, target, lo, hi)
            candidates = [j for j in (i - 1, i) if lo <= j < hi]
            best = min(candidates, key=lambda j: abs(cuts[j] - target))
            bounds.append(cuts[best])
        bounds.append(numel)
        return cls(numel, tuple(bounds), "tensor-aligned", align)

    @property
    def m(self) -> int:
        return len(self.boundaries) - 1

    @property
    def ranges(self) -> list[tuple[int, int]]:
        b = self.boundaries
        return list(itertools.pairwise(b))

    def shard_of(self, element: int) -> int:
        """Index of the shard holding ``element``."""
        if not 0 <= element < self.numel:
            raise PlanError(f"element {element} is outside [0, {self.numel})")
        return bisect.bisect_right(self.boundaries, element) - 1

    def manifest(self) -> dict[str, Any]:
        """A JSON-able description with a content hash (sha256 of the canonical boundaries)."""
        body = {"numel": self.numel, "m": self.m, "kind": self.kind, "align": self.align,
                "boundaries": list(self.boundaries)}
        digest = hashlib.sha256(json.dumps(body, separators=(",", ":")).encode()).hexdigest()
        return {**body, "digest": digest}

    @classmethod
    def from_manifest(cls, data: dict[str, Any]) -> ShardPlan:
        """Rebuild a plan from :meth:`manifest`, refusing one whose hash does not match."""
        try:
            plan = cls(int(data["numel"]), tuple(int(b) for b in data["boundaries"]), str(data["kind"]),
                       int(data["align"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"malformed shard plan manifest: {exc}") from exc
        if plan.manifest()["digest"] != data.get("digest"):
            raise PlanError("shard plan manifest digest does not match its boundaries")
        return plan
