"""A secure-aggregation round played out on a store: every client of :mod:`gradshard.security.secagg` in one
process, the store as the relay (tests, the benchmark and ``gradshard``'s docs use it).

The clients advertise keys, exchange encrypted shares through the store, upload masked updates (the ``dropped``
ones after masking but before uploading), and the survivors reveal what unmasking needs. The round is then ready
for ``aggregate_round(..., AggregateConfig(reducer=f"secagg:{bits}", weighting="uniform"))``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from gradshard.aggregation.secure import share_key, write_directory, write_reveal
from gradshard.core.layout import ModelLayout
from gradshard.format.keys import update_key
from gradshard.format.masked import write_masked_update
from gradshard.format.round import RoundSpec, open_round
from gradshard.format.update import UpdateMeta
from gradshard.security.secagg import SecAggClient
from gradshard.store import Store


def simulate_secure_round(store: Store, r: int, layout: ModelLayout, updates: Mapping[str, npt.NDArray[np.float32]],
                          *, bits: int = 16, clip: float = 8.0, threshold: int | None = None,
                          dropped: Sequence[str] = (), chunk_elems: int | None = None,
                          weights: Mapping[str, float] | None = None) -> npt.NDArray[np.uint32]:
    """Play round ``r`` with ``updates`` (client -> flat float32 update); returns the survivors' plain quantized
    sum (mod 2³²), the reference the unmasked aggregate must equal. ``weights``: each client's weight in (0, 1]
    (it masks ``weight · update``, and the aggregate is the survivors' weighted mean); None: unweighted."""
    clients = sorted(updates)
    threshold = threshold or len(clients) // 2 + 1
    spec = RoundSpec.create(r, layout, chunk_elems=chunk_elems)
    open_round(store, spec)
    agents = {c: SecAggClient(c, r, clients, threshold) for c in clients}
    directory = {c: agent.advertise() for c, agent in agents.items()}
    write_directory(store, r, list(directory.values()), threshold, weights)
    for client, agent in agents.items():
        for peer, blob in agent.share(directory).items():
            store.put(share_key(r, client, peer), blob)
    survivors = [c for c in clients if c not in dropped]
    total = np.zeros(layout.numel, dtype=np.uint32)
    for client in survivors:
        weight = 1.0 if weights is None else weights[client]
        masked = agents[client].masked(updates[client], directory, bits=bits, clip=clip, weight=weight)
        meta = UpdateMeta(client=client, round=r, examples=1, layout_digest=layout.digest(),
                          chunk_elems=spec.chunk_elems, digest=spec.digest)
        write_masked_update(store, update_key(r, client), layout, masked, meta)
        total += agents[client].quantized(updates[client], bits=bits, clip=clip, weight=weight)
    for client in survivors:
        inbox = {peer: store.get(share_key(r, peer, client)) for peer in clients if peer != client}
        write_reveal(store, r, client, agents[client].reveal(inbox, directory, survivors))
    return total
