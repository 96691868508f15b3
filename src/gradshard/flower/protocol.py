"""What the gradshard strategy and its clients tell each other, beyond what Flower's FedAvg sends.

Server -> client, in the train message's ConfigRecord: where the store is (``gradshard-store``, the JSON of
:meth:`Store.spec`, empty for a store only the server's process can open), the gradshard round to write
(``gradshard-round``) and the metric that carries the client's weight (``gradshard-weight-key``).

Client -> server, instead of the ArrayRecord: a ConfigRecord named :data:`REFERENCE_RECORD` with the update's key,
the sha256 of its header and the client id, next to the usual MetricRecord (which carries the example count).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from flwr.app import ConfigRecord, RecordDict

from gradshard.errors import GradshardError
from gradshard.store import Store, open_store

STORE_KEY = "gradshard-store"
ROUND_KEY = "gradshard-round"
WEIGHT_KEY = "gradshard-weight-key"
REFERENCE_RECORD = "gradshard"


def client_id(node_id: int) -> str:
    """The gradshard client id of a Flower node: zero-padded, so sorted ids are sorted node ids (uint64)."""
    if not 0 <= node_id < 2**64:
        raise GradshardError(f"Flower node ids are unsigned 64-bit integers, got {node_id}")
    return f"node-{node_id:020d}"


@dataclass(frozen=True)
class RoundInstructions:
    """The gradshard part of a train message's config."""

    round: int
    weight_key: str
    store_spec: str

    @classmethod
    def find(cls, content: RecordDict) -> RoundInstructions | None:
        """The instructions in any ConfigRecord of ``content``; None when the server is not a gradshard one."""
        for record in content.config_records.values():
            if ROUND_KEY in record:
                return cls(round=int(record[ROUND_KEY]),  # type: ignore[arg-type]
                           weight_key=str(record.get(WEIGHT_KEY, "num-examples")),
                           store_spec=str(record.get(STORE_KEY, "")))
        return None

    def open_store(self) -> Store:
        if not self.store_spec:
            raise GradshardError("the server's store can only be opened in the server's process (a memory store); "
                                 "pass store= to write_reply, or give the strategy a local or S3 store")
        return open_store(json.loads(self.store_spec))


@dataclass(frozen=True)
class UpdateReference:
    """A client's reply in place of its arrays: where its update is and which version of it."""

    client: str
    key: str
    header_sha256: str

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({"client": self.client, "key": self.key, "header-sha256": self.header_sha256})

    @classmethod
    def find(cls, content: RecordDict) -> UpdateReference | None:
        """The reference in ``content``; None if the reply carries none; GradshardError if it is malformed."""
        if REFERENCE_RECORD not in content.config_records:
            return None
        record = content.config_records[REFERENCE_RECORD]
        try:
            values = {name: record[name] for name in ("client", "key", "header-sha256")}
        except KeyError as exc:
            raise GradshardError(f"the update reference lacks {exc.args[0]!r}") from None
        if not all(isinstance(v, str) for v in values.values()):
            raise GradshardError(f"the update reference's fields must be strings, got {values!r}")
        return cls(str(values["client"]), str(values["key"]), str(values["header-sha256"]))
