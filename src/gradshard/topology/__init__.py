"""Topologies turn a validated round into a :class:`Plan` of invocations."""

from gradshard.topology.base import Invocation, Plan, check_fits
from gradshard.topology.common import OutputTarget, ReduceOptions
from gradshard.topology.flat import flat_plan
from gradshard.topology.sharded import shard_plan_for, sharded_plan

TOPOLOGIES = ("sharded", "flat", "lambda-fl", "lifl")

__all__ = ["TOPOLOGIES", "Invocation", "OutputTarget", "Plan", "ReduceOptions", "check_fits", "flat_plan",
           "shard_plan_for", "sharded_plan"]
