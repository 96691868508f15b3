"""Flat: one aggregator that loads every whole update — the reference every topology is checked against."""

from __future__ import annotations

from gradshard.aggregation.contracts import FlatReduceArgs
from gradshard.format.round import RoundManifest
from gradshard.topology.base import Invocation, Plan
from gradshard.topology.common import PlanOutput, ReduceOptions, reduce_memory


def flat_plan(manifest: RoundManifest, manifest_sha256: str, output: PlanOutput, options: ReduceOptions) -> Plan:
    """A single ``flat_reduce`` invocation; it holds the accumulator and one whole update at a time."""
    layout = manifest.spec.model_layout()
    numel = layout.numel
    memory = reduce_memory(manifest, options, numel, 1)  # its window is the whole model
    args = FlatReduceArgs(round=output.round_ref(manifest_sha256), output=output.target(),
                          settings=options.settings())
    return Plan("flat", (Invocation("flat-0000", "flat_reduce", args, memory),), {"m": 1})
