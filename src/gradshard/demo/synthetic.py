"""Synthetic client updates for demos and benchmarks (no data set, no training, no downloads).

Each client's update imitates a local-SGD weight delta: ``delta = -lr · (g + client drift + noise)``, per tensor,
with a scale of ``1/sqrt(fan_in)`` for weights (so layers differ as in a real network), a shared "true gradient"
``g`` so clients agree on a direction, a per-client drift (non-IID data) and per-step noise. Clients get unequal
numbers of examples (a Dirichlet split of a data set), so example weighting matters. Updates are generated and
written tensor by tensor, so a 10 GB update never sits in memory whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from gradshard.core.layout import ModelLayout, TensorSpec
from gradshard.format.keys import update_key
from gradshard.format.round import RoundSpec, open_round
from gradshard.format.update import UpdateMeta
from gradshard.format.writer import UpdateWriter
from gradshard.store import Store

_PIECE_ELEMS = 8 << 20


def client_ids(n: int) -> list[str]:
    return [f"client-{i:04d}" for i in range(n)]


def example_counts(n: int, total: int = 60_000, alpha: float = 0.5, seed: int = 0) -> list[int]:
    """Examples per client from a Dirichlet(alpha) split of ``total`` examples (each client at least 1)."""
    shares = np.random.default_rng(seed).dirichlet([alpha] * n)
    return [max(1, int(s * total)) for s in shares]


def _scale(spec: TensorSpec, lr: float) -> float:
    fan_in = math.prod(spec.shape[1:]) if len(spec.shape) > 1 else 1
    return lr / math.sqrt(max(1, fan_in))


def _tensor_delta(spec: TensorSpec, seeds: tuple[int, int, int], lr: float) -> Callable[[int, int], Any]:
    """A function (start, stop) -> that slice of one tensor's delta, reproducible from seeds."""
    scale = _scale(spec, lr)

    def piece(start: int, stop: int) -> npt.NDArray[np.float32]:
        shared, drift, noise = (np.random.default_rng([s, start]) for s in seeds)
        n = stop - start
        g = shared.standard_normal(n, dtype=np.float32)
        g += 0.3 * drift.standard_normal(n, dtype=np.float32)
        g += 0.1 * noise.standard_normal(n, dtype=np.float32)
        g *= np.float32(-scale)
        return g

    return piece


def write_synthetic_update(store: Store, r: int, layout: ModelLayout, spec: RoundSpec, client: str, index: int,
                           examples: int, *, seed: int = 0, lr: float = 0.01) -> UpdateMeta:
    """Generate one client's update piece by piece and write it atomically."""
    meta = UpdateMeta(client=client, round=r, examples=examples, layout_digest=layout.digest(),
                      chunk_elems=spec.chunk_elems, base_model=spec.base_model, digest=spec.digest)
    dtype = np.dtype(layout.flat_dtype)
    with UpdateWriter(store, update_key(r, client), layout, meta) as writer:
        for t, slot in enumerate(layout.slots):
            delta = _tensor_delta(slot.spec, (seed * 7919 + t, seed * 104729 + index * 1009 + t,
                                              seed * 1299709 + index * 7 + t + r), lr)
            for lo in range(0, slot.spec.numel, _PIECE_ELEMS):
                hi = min(lo + _PIECE_ELEMS, slot.spec.numel)
                writer.write(delta(lo, hi).astype(dtype, copy=False))
        return writer.commit()


def make_round(store: Store, r: int, layout: ModelLayout, n_clients: int, *, seed: int = 0,
               chunk_elems: int | None = None, on_client: Callable[[str], None] | None = None
               ) -> tuple[RoundSpec, Sequence[str]]:
    """Open round ``r`` for ``layout`` (its aggregated part) and write ``n_clients`` synthetic updates."""
    if len(layout.kept()) or len(layout.dtypes) > 1:
        layout = layout.aggregated()  # integer buffers are not averaged; floating tensors travel as float32
    spec = RoundSpec.create(r, layout, chunk_elems=chunk_elems)
    open_round(store, spec)
    clients = client_ids(n_clients)
    for i, (client, examples) in enumerate(zip(clients, example_counts(n_clients, seed=seed), strict=True)):
        write_synthetic_update(store, r, layout, spec, client, i, examples, seed=seed)
        if on_client is not None:
            on_client(client)
    return spec, clients
