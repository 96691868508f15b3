"""The ClientApp side: write the trained arrays to the store as a gradshard update and reply with a reference.

An existing ClientApp changes its last line from
``return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)`` to
``return write_reply(msg, arrays, metrics)``. Talking to a plain Flower strategy (no gradshard instructions in the
message), :func:`write_reply` builds exactly that ordinary reply, so one ClientApp serves both.
"""

from __future__ import annotations

import math

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from gradshard.core.reduce import MAX_EXAMPLES
from gradshard.errors import GradshardError
from gradshard.flower.arrays import flatten_record
from gradshard.flower.protocol import REFERENCE_RECORD, RoundInstructions, UpdateReference, client_id
from gradshard.format.keys import update_key
from gradshard.format.round import load_spec
from gradshard.format.update import UpdateMeta, open_update
from gradshard.format.writer import write_update
from gradshard.store import Store


def examples_of(metrics: MetricRecord, weight_key: str) -> int:
    """The example count a client reports under ``weight_key`` (rounded when the metric is a float), >= 1."""
    value = metrics.get(weight_key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise GradshardError(f"the MetricRecord needs a positive number under {weight_key!r} (the client's weight), "
                             f"got {value!r}")
    return min(MAX_EXAMPLES, max(1, round(value)))


def write_update_of(msg: Message, arrays: ArrayRecord, metrics: MetricRecord, instructions: RoundInstructions,
                    store: Store | None = None) -> UpdateReference:
    """Write ``arrays`` (the trained weights, not a delta) as this node's update of the instructed round."""
    store = store if store is not None else instructions.open_store()
    client = client_id(msg.metadata.dst_node_id)
    spec = load_spec(store, instructions.round)
    layout = spec.model_layout()
    flat = flatten_record(arrays, layout)
    meta = UpdateMeta(client=client, round=spec.round, examples=examples_of(metrics, instructions.weight_key),
                      layout_digest=layout.digest(), chunk_elems=spec.chunk_elems, base_model=spec.base_model,
                      digest=spec.digest)
    key = update_key(spec.round, client)
    write_update(store, key, layout, flat, meta)
    with open_update(store, key, client, layout) as written:  # one header read: the version the server will check
        return UpdateReference(client=client, key=key, header_sha256=written.sha256)


def write_reply(msg: Message, arrays: ArrayRecord, metrics: MetricRecord, *, store: Store | None = None,
                metrics_key: str = "metrics", arrays_key: str = "arrays") -> Message:
    """The reply to a train message: a reference to the update written to the store (gradshard strategy), or the
    ordinary ``{arrays_key: arrays, metrics_key: metrics}`` reply (any other strategy).

    ``store``: the store to write to; by default the one the server named in the message."""
    instructions = RoundInstructions.find(msg.content)
    if instructions is None:
        return Message(content=RecordDict({arrays_key: arrays, metrics_key: metrics}), reply_to=msg)
    reference = write_update_of(msg, arrays, metrics, instructions, store)
    return Message(content=RecordDict({metrics_key: metrics, REFERENCE_RECORD: reference.to_record()}),
                   reply_to=msg)
