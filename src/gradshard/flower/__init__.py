"""Flower integration (optional: needs ``flwr``): a FedAvg strategy whose aggregation runs through gradshard, and
the ClientApp helper that writes a client's arrays to the store and replies with a reference.

``import gradshard`` never imports this package; ``import gradshard.flower`` imports ``flwr``.
"""

from gradshard.extras import require_extra

require_extra("flower", "gradshard.flower")

from gradshard.flower.client import write_reply  # noqa: E402 - after the extra check
from gradshard.flower.protocol import UpdateReference, client_id  # noqa: E402
from gradshard.flower.strategy import ClientFailure, GradshardFedAvg  # noqa: E402

__all__ = ["ClientFailure", "GradshardFedAvg", "UpdateReference", "client_id", "write_reply"]
