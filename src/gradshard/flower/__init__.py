"""Flower integration (optional: needs ``flwr``): a FedAvg strategy whose aggregation runs through gradshard, and
the ClientApp helper that writes a client's arrays to the store and replies with a reference.

``import gradshard`` never imports this package; ``import gradshard.flower`` imports ``flwr``.
"""

from gradshard.flower.client import write_reply
from gradshard.flower.protocol import UpdateReference, client_id
from gradshard.flower.strategy import ClientFailure, GradshardFedAvg

__all__ = ["ClientFailure", "GradshardFedAvg", "UpdateReference", "client_id", "write_reply"]
