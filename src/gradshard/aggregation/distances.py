"""Phase 1 of a selecting round (Krum, Multi-Krum, Bulyan): exact pairwise squared distances, sharded.

Each ``pairwise_distances`` invocation reads its chunk-aligned range of every client one checksum chunk at a time
(verified, all N clients' chunk at once: ``N·chunk`` values) and returns, for every chunk, the float64 partial
``Σ (xᵢ − xⱼ)²`` of every pair ``i < j``, computed from **direct differences** in float64 (a float32 converts to
float64 exactly; the difference and square are rounded in float64, never cancelled as in ``‖x‖² + ‖y‖² − 2x·y``).
Each chunk is computed the same way wherever it falls (the same buffers, lengths and numpy pairwise sums), and the
driver adds a pair's partials over all chunks with ``math.fsum`` (correctly rounded, so independent of how the
chunks were split among functions): the N×N matrix is the same bytes for every M.

The partials travel as base64 float64 (little-endian), ``chunks × N(N−1)/2`` values, pairs in row-major upper-
triangle order. A client whose chunk fails its digest or holds NaN/inf fails the invocation naming it, and the
driver reruns the phase without it.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from pydantic import Field

from gradshard.aggregation.contracts import Contract, RangeArgs
from gradshard.aggregation.functions import load_range, open_clients
from gradshard.errors import RoundError, UpdateError
from gradshard.format.keys import round_of_key
from gradshard.runtime.registry import register
from gradshard.store import Store

_ALIGN = 8  # rows padded to a multiple of 8 float64 (64 bytes): every chunk's rows are summed alike


class DistanceArgs(RangeArgs):
    """``pairwise_distances``: per-chunk partial squared distances of every client pair over ``[start, stop)``."""


class DistanceResult(Contract):
    """The per-chunk pair partials of chunks ``first_chunk ..`` (base64 float64, ``chunks × pairs``)."""

    first_chunk: int = Field(ge=0)
    chunks: int = Field(ge=0)
    clients: int = Field(ge=1)
    partials: str


def pair_count(n: int) -> int:
    return n * (n - 1) // 2


def chunk_pair_partials(rows: npt.NDArray[np.float64], diff: npt.NDArray[np.float64],
                        out: npt.NDArray[np.float64]) -> None:
    """``out[p] = Σ (rows[i] − rows[j])²`` for every pair ``p = (i < j)`` in row-major upper-triangle order.

    ``rows`` (N × L, float64, zero-padded past the chunk: padding adds exact zeros) and ``diff`` (N−1 × L) are the
    caller's buffers; each pair's sum is numpy's pairwise sum along one contiguous row of length L."""
    n = len(rows)
    p = 0
    for i in range(n - 1):
        m = n - 1 - i
        d = diff[:m]
        np.subtract(rows[i + 1 :], rows[i], out=d)
        np.multiply(d, d, out=d)
        np.add.reduce(d, axis=1, out=out[p : p + m])
        p += m


def pairwise_distances(args: DistanceArgs, store: Store) -> DistanceResult:
    """Read ``[start, stop)`` of every client a chunk at a time; return every chunk's pair partials."""
    manifest, layout, grid = load_range(store, args)
    n = len(manifest.clients)
    width = -(-grid.chunk_elems // _ALIGN) * _ALIGN
    values = np.empty(grid.chunk_elems, dtype=layout.flat_dtype)
    rows = np.zeros((n, width), dtype=np.float64)
    diff = np.empty((max(n - 1, 1), width), dtype=np.float64)
    indices = list(grid.covering(args.start, args.stop))
    partials = np.empty((len(indices), pair_count(n)), dtype="<f8")
    readers = open_clients(store, manifest, layout)
    try:
        for c, index in enumerate(indices):
            a, b = grid.bounds(index)
            for i, reader in enumerate(readers):
                window = values[: b - a]
                reader.read_verified(a, b, window)
                if not np.isfinite(window).all():
                    raise UpdateError(reader.client, f"non-finite values (NaN or inf) in elements [{a}, {b})")
                rows[i, : b - a] = window
                rows[i, b - a :] = 0.0
            chunk_pair_partials(rows, diff, partials[c])
    finally:
        for reader in readers:
            reader.close()
    return DistanceResult(first_chunk=indices[0] if indices else args.start // grid.chunk_elems,
                          chunks=len(indices), clients=n, partials=base64.b64encode(partials.tobytes()).decode())


def combine_distances(results: Sequence[DistanceResult], chunks: int, clients: int) -> npt.NDArray[np.float64]:
    """The N×N matrix of squared distances from the functions' partials: each pair's chunk partials added with
    ``math.fsum`` (exact, independent of M). Every chunk must be covered exactly once."""
    pairs = pair_count(clients)
    table = np.full((chunks, pairs), np.nan)
    seen = np.zeros(chunks, dtype=bool)
    for result in results:
        if result.clients != clients:
            raise RoundError(f"distance partials for {result.clients} clients in a round of {clients}")
        raw = base64.b64decode(result.partials, validate=True)
        if len(raw) != result.chunks * pairs * 8:
            raise RoundError(f"distance partials of chunks {result.first_chunk}.. have {len(raw)} bytes, expected "
                             f"{result.chunks * pairs * 8}")
        stop = result.first_chunk + result.chunks
        if stop > chunks or seen[result.first_chunk : stop].any():
            raise RoundError(f"distance partials overlap or overrun at chunks [{result.first_chunk}, {stop})")
        seen[result.first_chunk : stop] = True
        table[result.first_chunk : stop] = np.frombuffer(raw, dtype="<f8").reshape(result.chunks, pairs)
    if not seen.all():
        raise RoundError(f"distance partials miss chunks {np.flatnonzero(~seen)[:5].tolist()}: the plan did not "
                         "cover the model")
    matrix = np.zeros((clients, clients))
    upper = np.triu_indices(clients, k=1)
    totals = [math.fsum(table[:, p].tolist()) for p in range(pairs)]
    matrix[upper] = totals
    matrix.T[upper] = totals
    return matrix


register("pairwise_distances", pairwise_distances, args=DistanceArgs, result=DistanceResult,
         scope=lambda a: {"round": round_of_key(a.round.manifest_key), "range": [a.start, a.stop]})
