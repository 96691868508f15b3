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

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from pydantic import Field

from gradshard.aggregation.chunks import ChunkRows, column_sums, encode_partials, padded_width, partial_table
from gradshard.aggregation.contracts import Contract, RangeArgs
from gradshard.aggregation.functions import load_range, open_clients
from gradshard.errors import RoundError
from gradshard.format.keys import round_of_key
from gradshard.runtime.registry import register
from gradshard.store import Store


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
    diff = np.empty((max(n - 1, 1), padded_width(grid.chunk_elems)), dtype=np.float64)
    indices = list(grid.covering(args.start, args.stop))
    partials = np.empty((len(indices), pair_count(n)), dtype="<f8")
    readers = open_clients(store, manifest, layout)
    try:
        rows = ChunkRows(readers, grid, layout.flat_dtype, args.start, args.stop)
        for c, index in enumerate(indices):
            chunk_pair_partials(rows.load(index), diff, partials[c])
    finally:
        for reader in readers:
            reader.close()
    return DistanceResult(first_chunk=indices[0] if indices else args.start // grid.chunk_elems,
                          chunks=len(indices), clients=n, partials=encode_partials(partials))


def combine_distances(results: Sequence[DistanceResult], chunks: int, clients: int) -> npt.NDArray[np.float64]:
    """The N×N matrix of squared distances from the functions' partials: each pair's chunk partials added with
    ``math.fsum`` (exact, independent of M). Every chunk must be covered exactly once."""
    if any(r.clients != clients for r in results):
        raise RoundError(f"distance partials for another number of clients than the round's {clients}")
    table = partial_table([(r.first_chunk, r.chunks, r.partials) for r in results], chunks, pair_count(clients),
                          "distance")
    totals = column_sums(table)
    matrix = np.zeros((clients, clients))
    upper = np.triu_indices(clients, k=1)
    matrix[upper] = totals
    matrix.T[upper] = totals
    return matrix


register("pairwise_distances", pairwise_distances, args=DistanceArgs, result=DistanceResult,
         scope=lambda a: {"round": round_of_key(a.round.manifest_key), "range": [a.start, a.stop]})
