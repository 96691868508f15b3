"""The one set of topology names, used by plans, the driver, the cost model, compare and the CLI."""

from __future__ import annotations

from typing import Literal, get_args

Topology = Literal["flat", "sharded", "lambda-fl", "lifl"]
TOPOLOGIES: tuple[Topology, ...] = get_args(Topology)
# Names accepted on input for the same topologies (the paper calls the sharded one GradsSharding).
ALIASES: dict[str, Topology] = {"grads-sharding": "sharded", "gradsharding": "sharded", "tree": "lambda-fl"}


def topology_name(text: str) -> Topology:
    """The canonical name of ``text`` (a topology name or an alias); raises ValueError for anything else."""
    name = ALIASES.get(text, text)
    if name not in TOPOLOGIES:
        raise ValueError(f"unknown topology {text!r}; choose from {', '.join(TOPOLOGIES)}")
    return name
