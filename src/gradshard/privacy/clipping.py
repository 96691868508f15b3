"""Per-client L2 norms computed by shard functions, combined exactly: the same norm for every shard count.

Phase 1 of a central-DP round. Each ``client_norms`` invocation reads its chunk-aligned range of every client
(verified chunk by chunk, one chunk buffer per client at a time) and returns, per client, the float64 sum of squares
of each chunk it covers — each computed the same way wherever the chunk falls (the chunk copied into one float64
buffer, squared exactly — a float32 squared is exact in float64 — and summed by numpy's pairwise sum). The driver
then adds the partials of all chunks of a client with ``math.fsum`` (correctly rounded, so independent of their
order and of how the chunks were split among functions): ``‖Δᵢ‖ = sqrt(fsum(partials))``, bit-identical for every M.

A client whose chunks fail their digests or hold NaN/inf is returned as bad (by every function that reads the bad
chunk; the driver rejects it from the whole round before any noise is drawn).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from pydantic import Field

from gradshard.aggregation.contracts import Contract, RangeArgs
from gradshard.aggregation.functions import load_range, open_inputs
from gradshard.core import checksum
from gradshard.errors import PrivacyError, UpdateError
from gradshard.format.keys import round_of_key
from gradshard.runtime.registry import register
from gradshard.store import Store


class NormArgs(RangeArgs):
    """``client_norms``: per-chunk sums of squares of every client over elements ``[start, stop)``."""


class NormResult(Contract):
    """Client -> the float64 sums of squares of the chunks of the range, in chunk order; and the bad clients."""

    first_chunk: int = Field(ge=0)
    partials: dict[str, list[float]]
    bad: dict[str, str] = Field(default_factory=dict)


def chunk_square_sums(values: np.ndarray, grid: checksum.ChunkGrid, start: int,
                      scratch: np.ndarray) -> list[float]:
    """The float64 sum of squares of each whole chunk in ``values`` (elements from ``start``, chunk-aligned)."""
    sums = []
    for index in grid.covering(start, start + len(values)):
        a, b = grid.bounds(index)
        square = scratch[: b - a]
        np.multiply(values[a - start : b - start], values[a - start : b - start], out=square, dtype=np.float64)
        sums.append(float(square.sum()))
    return sums


def client_norms(args: NormArgs, store: Store) -> NormResult:
    """Read ``[start, stop)`` of every client a chunk at a time and return its per-chunk sums of squares."""
    manifest, layout, grid = load_range(store, args)
    chunk = min(grid.chunk_elems, args.stop - args.start)
    buffer = np.empty(chunk, dtype=layout.flat_dtype)
    scratch = np.empty(chunk, dtype=np.float64)
    partials: dict[str, list[float]] = {}
    bad: dict[str, str] = {}
    inputs = open_inputs(store, manifest, layout, args.start, args.stop, chunk)  # full-size or compact updates
    try:
        for client in inputs:
            sums: list[float] = []
            try:
                for index in grid.covering(args.start, args.stop):
                    a, b = grid.bounds(index)
                    values = buffer[: b - a]
                    values.fill(0)  # elements a partial client does not cover count as 0
                    client.read(a, b, values)
                    sums.extend(chunk_square_sums(values, grid, a, scratch))
                    if not math.isfinite(sums[-1]) or not np.isfinite(values).all():
                        raise UpdateError(client.client, f"non-finite values (NaN or inf) in elements [{a}, {b})")
            except UpdateError as exc:
                bad[client.client] = exc.reason
                continue
            partials[client.client] = sums
    finally:
        for client in inputs:
            client.close()
    return NormResult(first_chunk=args.start // grid.chunk_elems, partials=partials, bad=bad)


def combine_norms(results: Sequence[NormResult], chunks: int) -> tuple[dict[str, float], dict[str, str]]:
    """Each client's L2 norm from the functions' partials (``math.fsum``: exact, independent of M), and the clients
    some function found bad. Every chunk of the grid must be covered exactly once for a client to get a norm."""
    bad: dict[str, str] = {}
    per_client: dict[str, list[float | None]] = {}
    for result in results:
        bad.update(result.bad)
        for client, sums in result.partials.items():
            slots = per_client.setdefault(client, [None] * chunks)
            for offset, value in enumerate(sums):
                index = result.first_chunk + offset
                if index >= chunks or slots[index] is not None:
                    raise PrivacyError(f"norm partials of client {client!r} overlap or overrun at chunk {index}")
                slots[index] = value
    norms: dict[str, float] = {}
    for client, slots in per_client.items():
        if client in bad:
            continue
        if any(value is None for value in slots):
            raise PrivacyError(f"norm partials of client {client!r} miss chunks: the plan did not cover the model")
        norms[client] = math.sqrt(math.fsum(value for value in slots if value is not None))
    return norms, bad


def clip_factors(norms: Mapping[str, float], clip: float) -> dict[str, float]:
    """``min(1, C / ‖Δᵢ‖)`` per client (1 for a zero update)."""
    if not (math.isfinite(clip) and clip > 0):
        raise PrivacyError(f"the clipping bound must be finite and > 0, got {clip!r}")
    return {client: 1.0 if norm <= clip else clip / norm for client, norm in norms.items()}


register("client_norms", client_norms, args=NormArgs, result=NormResult,
         scope=lambda a: {"round": round_of_key(a.round.manifest_key), "range": [a.start, a.stop]})
