"""FLTrust (Cao et al., 2021), sharded: phase 1 of reducer ``fltrust``.

The server trains on its own small, clean root data set and stores the result as the round's root update ``g₀``
(``rounds/<r>/root.safetensors``, written like a client's update). Phase 1 runs ``trust_products`` over the round's
shards: per checksum chunk, every client's float64 partial ``⟨gᵢ, g₀⟩`` and ``‖gᵢ‖²`` and the root's ``‖g₀‖²``
(each chunk computed the same way wherever it falls); the driver adds each quantity's partials over all chunks with
``math.fsum`` (exact, the same for every M) and sets, per client,

- trust ``TSᵢ = max(0, cos(gᵢ, g₀))`` — a client whose update points away from the server's gets 0 and leaves the
  round (the reason names its cosine);
- scale ``‖g₀‖ / ‖gᵢ‖`` — every update is renormalised to the root's length (a 100×-scaled update counts no more).

Phase 2 is the weighted mean with weights ``TSᵢ`` and those scales: ``Σ TSᵢ·(‖g₀‖/‖gᵢ‖)·gᵢ / Σ TSᵢ``. When no client
has positive trust the round fails (FLTrust's aggregate is then zero: the model stays as it was). The cosines, trust
scores and norms are recorded in ``rounds/<r>/trust.json``, pinned by the manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
from pydantic import Field

from gradshard.aggregation.chunks import ChunkRows, column_sums, encode_partials, padded_width, partial_table
from gradshard.aggregation.contracts import Contract, RangeArgs, RoundRef
from gradshard.aggregation.functions import load_range, open_clients
from gradshard.aggregation.phases import PhaseContext, register_phase, reject_bad_updates
from gradshard.core.checksum import ChunkGrid
from gradshard.core.reducers import ReducerSpec
from gradshard.errors import RoundError, UpdateError
from gradshard.format.keys import manifest_key, root_update_key, round_of_key, trust_key
from gradshard.format.round import RoundManifest, check_meta, write_manifest
from gradshard.format.update import UpdateReader, open_update
from gradshard.runtime.registry import parse_result, register
from gradshard.store import Store
from gradshard.topology.base import Invocation, Plan
from gradshard.topology.common import FUNCTION_OVERHEAD_BYTES
from gradshard.topology.sharded import shard_plan_for

if TYPE_CHECKING:
    from gradshard.runtime.report import InvocationReport

log = logging.getLogger(__name__)
ROOT = "server root"  # how errors name the root update


class TrustArgs(RangeArgs):
    """``trust_products``: per-chunk ``⟨gᵢ, g₀⟩``, ``‖gᵢ‖²`` and ``‖g₀‖²`` over ``[start, stop)``; the root update
    pinned by the sha256 of its header."""

    root_key: str
    root_sha256: str


class TrustResult(Contract):
    """Per chunk from ``first_chunk``: N dot products, N squared norms, the root's squared norm (base64 float64)."""

    first_chunk: int = Field(ge=0)
    chunks: int = Field(ge=0)
    clients: int = Field(ge=1)
    partials: str


def open_root(store: Store, manifest: RoundManifest, sha256: str | None = None) -> UpdateReader:
    """The round's root update, validated like a client's (round, layout, chunks, digest, base model)."""
    spec = manifest.spec
    layout = spec.model_layout()
    key = root_update_key(manifest.round)
    if not store.exists(key):
        raise RoundError(f"reducer fltrust needs the server's root update {key} (the server's own update of the "
                         "round, trained on its root data set); write it with gradshard.format.writer.write_update")
    try:
        root = open_update(store, key, ROOT, layout, sha256)
        try:
            check_meta(spec, layout.digest(), ROOT, root.meta)
        except BaseException:
            root.close()
            raise
    except UpdateError as exc:
        raise RoundError(f"the root update {key} is not usable: {exc.reason}") from None
    return root


def trust_products(args: TrustArgs, store: Store) -> TrustResult:
    """Read ``[start, stop)`` of every client and the root a chunk at a time; return every chunk's products."""
    manifest, layout, grid = load_range(store, args)
    if args.root_key != root_update_key(manifest.round):
        raise RoundError(f"the root update of round {manifest.round} is {root_update_key(manifest.round)}, "
                         f"not {args.root_key!r}")
    n = len(manifest.clients)
    products = np.empty((n + 1, padded_width(grid.chunk_elems)), dtype=np.float64)
    indices = list(grid.covering(args.start, args.stop))
    partials = np.empty((len(indices), 2 * n + 1), dtype="<f8")
    readers = open_clients(store, manifest, layout)
    try:
        readers.append(open_root(store, manifest, args.root_sha256))  # the root is a float update
        rows = ChunkRows(readers, grid, layout.flat_dtype, args.start, args.stop,
                         [*(r.client for r in readers[:n]), ROOT])
        for c, index in enumerate(indices):
            chunk_products(rows.load(index), products, partials[c])
    finally:
        for reader in readers:
            reader.close()
    return TrustResult(first_chunk=indices[0] if indices else args.start // grid.chunk_elems, chunks=len(indices),
                       clients=n, partials=encode_partials(partials))


def chunk_products(rows: npt.NDArray[np.float64], products: npt.NDArray[np.float64],
                   out: npt.NDArray[np.float64]) -> None:
    """``out = [⟨rows[i], root⟩ for i < N] + [‖rows[i]‖² for i < N] + [‖root‖²]`` (root = the last row), each a
    numpy pairwise sum along one contiguous row."""
    n = len(rows) - 1
    np.multiply(rows[:n], rows[n], out=products[:n])
    np.add.reduce(products[:n], axis=1, out=out[:n])
    np.multiply(rows, rows, out=products)
    np.add.reduce(products, axis=1, out=out[n:])


def combine_products(results: Sequence[TrustResult], chunks: int, clients: int
                     ) -> tuple[list[float], list[float], float]:
    """(⟨gᵢ, g₀⟩, ‖gᵢ‖², ‖g₀‖²) from the functions' partials, each added with ``math.fsum`` (exact, M-free)."""
    if any(r.clients != clients for r in results):
        raise RoundError(f"trust partials for another number of clients than the round's {clients}")
    totals = column_sums(partial_table([(r.first_chunk, r.chunks, r.partials) for r in results], chunks,
                                       2 * clients + 1, "trust"))
    return totals[:clients], totals[clients : 2 * clients], totals[-1]


def trust_scores(dots: Sequence[float], squares: Sequence[float], root_square: float
                 ) -> tuple[list[float], list[float], list[float]]:
    """(cosines, trust scores ``max(0, cos)``, scales ``‖g₀‖/‖gᵢ‖``); a zero update (or root) has cosine 0."""
    root_norm = math.sqrt(root_square)
    cosines, trust, scales = [], [], []
    for dot, square in zip(dots, squares, strict=True):
        norm = math.sqrt(square)
        cos = dot / (norm * root_norm) if norm > 0 and root_norm > 0 else 0.0
        cos = max(-1.0, min(1.0, cos))
        cosines.append(cos)
        trust.append(max(0.0, cos))
        scales.append(root_norm / norm if norm > 0 else 0.0)
    return cosines, trust, scales


def _products(manifest: RoundManifest, run: PhaseContext, history: list[InvocationReport]
              ) -> tuple[list[float], list[float], float]:
    """Run phase 1 until no client fails it (a failing client is rejected, or the round fails under 'fail')."""
    for _ in range(len(manifest.clients) + 1):
        with open_root(run.store, manifest) as root:
            root_sha = root.sha256
        sha = write_manifest(run.store, manifest)
        ref = RoundRef(manifest_key=manifest_key(manifest.round), manifest_sha256=sha)
        spec, n = manifest.spec, len(manifest.clients)
        width = padded_width(spec.chunk_elems)
        memory = FUNCTION_OVERHEAD_BYTES + spec.chunk_elems * 4 + 2 * (n + 1) * width * 8
        plan = Plan("fltrust-products", tuple(
            Invocation(f"trust-{s:04d}", "trust_products",
                       TrustArgs(round=ref, start=a, stop=b, root_key=root_update_key(manifest.round),
                                 root_sha256=root_sha),
                       memory + len(range(a, b, spec.chunk_elems)) * (2 * n + 1) * 8 * 3)
            for s, (a, b) in enumerate(shard_plan_for(manifest, run.shards, run.partition).ranges)), {"m": run.shards})
        reports = run.executor.run(plan, run.store, run.on_done)
        history.extend(reports)
        root_problem = next((r.bad_updates[ROOT] for r in reports if ROOT in r.bad_updates), None)
        if root_problem is not None:
            raise RoundError(f"the root update {root_update_key(manifest.round)} is not usable: {root_problem}")
        if reject_bad_updates(manifest, reports, run.policy):
            continue
        failed = [r for r in reports if not r.ok]
        if failed or len(reports) != len(plan.invocations):
            why = "; ".join(f"{r.invocation}: {r.error_type}: {r.error}" for r in failed)
            raise RoundError(f"round {manifest.round}: the FLTrust phase failed: {why or 'not every shard ran'}")
        grid = ChunkGrid(spec.model_layout().numel, spec.chunk_elems)
        return combine_products([parse_result("trust_products", r.result, TrustResult) for r in reports],
                                grid.count, n)
    raise RoundError(f"round {manifest.round} kept finding bad updates; rejected: {manifest.rejected}")


def trust_round(manifest: RoundManifest, spec: ReducerSpec, run: PhaseContext) -> list[InvocationReport]:
    """Phase 1 of ``fltrust``: trust scores become the clients' weights, ``‖g₀‖/‖gᵢ‖`` their scales."""
    history: list[InvocationReport] = []
    dots, squares, root_square = _products(manifest, run, history)
    clients = [c.client for c in manifest.clients]
    cosines, trust, scales = trust_scores(dots, squares, root_square)
    record = json.dumps({"reducer": spec.text, "clients": clients, "cosines": cosines, "trust": trust,
                         "norms": [math.sqrt(s) for s in squares], "root_norm": math.sqrt(root_square)},
                        allow_nan=False).encode()
    run.store.put(trust_key(manifest.round), record)
    kept = {c: (t, s) for c, t, s in zip(clients, trust, scales, strict=True) if t > 0}
    manifest.clients = [c.model_copy(update={"weight": kept[c.client][0], "scale": kept[c.client][1]})
                        for c in manifest.clients if c.client in kept]
    for client, cos in zip(clients, cosines, strict=True):
        if client not in kept:
            manifest.rejected[client] = (f"FLTrust trust 0: its update's cosine with the server's root update is "
                                         f"{cos:.4g}")
    manifest.selection = {"reducer": spec.text, "selected": sorted(kept), "record": trust_key(manifest.round),
                          "record_sha256": hashlib.sha256(record).hexdigest()}
    if not kept:
        raise RoundError(f"round {manifest.round}: no client has positive FLTrust trust (every update points away "
                         "from the server's root update); FLTrust's aggregate is zero, the model stays as it was")
    log.info("round %d: FLTrust kept %d of %d clients", manifest.round, len(kept), len(clients))
    return history


register("trust_products", trust_products, args=TrustArgs, result=TrustResult,
         scope=lambda a: {"round": round_of_key(a.round.manifest_key), "range": [a.start, a.stop]})
register_phase("fltrust", trust_round, "trust_products")
