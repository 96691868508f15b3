"""Topologies turn a validated round into a :class:`Plan` of invocations."""

from gradshard.topology.base import Invocation, Plan, check_fits
from gradshard.topology.common import PlanOutput, ReduceOptions
from gradshard.topology.flat import flat_plan
from gradshard.topology.names import TOPOLOGIES, Topology
from gradshard.topology.sharded import shard_plan_for, sharded_plan

__all__ = [
           "TOPOLOGIES",
           "Invocation",
           "Plan",
           "PlanOutput",
           "ReduceOptions",
           "Topology",
           "check_fits",
           "flat_plan",
           "shard_plan_for",
           "sharded_plan",
]
