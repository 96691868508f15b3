"""The aggregation functions, as run inside an invocation: ``function(args, store) -> result``.

Each is stateless and idempotent: it reads the round manifest and its inputs from the store and writes its byte
range of the output upload; running it twice writes the same bytes. Arguments and results are the typed contracts
of :mod:`gradshard.aggregation.contracts`; the functions register themselves with the runtime here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from gradshard.aggregation.contracts import (
    FlatReduceArgs,
    OutputTarget,
    RangeArgs,
    ReduceResult,
    ReduceSettings,
    ShardReduceArgs,
)
from gradshard.aggregation.inputs import PreviousModel, UpdateInput, client_input
from gradshard.core import checksum
from gradshard.core.coverage import CoverageMap
from gradshard.core.layout import ModelLayout
from gradshard.core.reduce import all_finite
from gradshard.core.reducers import NonFiniteInput, Reducer, make_reducer, parse_reducer
from gradshard.errors import BadUpdatesError, GradshardError, RoundError, UpdateError
from gradshard.format.compact import ClientReader, CompactReader, open_client_update
from gradshard.format.keys import round_of_key
from gradshard.format.masked import MaskedReader
from gradshard.format.quantized import QuantizedReader
from gradshard.format.round import RoundManifest, load_manifest
from gradshard.format.sparse import SparseReader
from gradshard.format.update import UpdateReader, open_update
from gradshard.format.writer import RangeWriter
from gradshard.privacy.noise import ChunkNoise
from gradshard.runtime.registry import register
from gradshard.store import Store
from gradshard.topology.common import window_elems

Reader = TypeVar("Reader", UpdateReader, ClientReader)


def open_clients(store: Store, manifest: RoundManifest, layout: ModelLayout
                 ) -> list[UpdateReader | QuantizedReader | SparseReader | MaskedReader]:
    """Every client's reader of the whole model, float, int8 or top-k (a compact update is refused here: read it
    through :func:`open_inputs`)."""
    readers = _open_all(store, manifest, layout, open_client_update)
    partial = next((r for r in readers if isinstance(r, CompactReader)), None)
    if partial is not None:
        for reader in readers:
            reader.close()
        raise UpdateError(partial.client, "a compact update holds only part of the model; this function reads "
                                          "whole updates")
    return [r for r in readers if not isinstance(r, CompactReader)]


def _open_all(store: Store, manifest: RoundManifest, layout: ModelLayout, opener: Callable[..., Reader]
              ) -> list[Reader]:
    readers: list[Reader] = []
    try:
        for entry in manifest.clients:
            # the header's sha256 pins the bytes the validation checked (a changed header is refused by the
            # opener), and its recorded size and byte runs spare reparsing every tensor entry
            readers.append(opener(store, entry.key, entry.client, layout, entry.header_sha256,
                                  trusted=entry.validated()))
    except BaseException:
        for r in readers:
            r.close()
        raise
    return readers


def load_range(store: Store, args: RangeArgs) -> tuple[RoundManifest, ModelLayout, checksum.ChunkGrid]:
    """The validated manifest, layout and chunk grid of a phase-1 function's range (refused unless chunk-aligned)."""
    manifest = load_manifest(store, args.round.manifest_key, args.round.manifest_sha256)
    layout = manifest.spec.model_layout()
    grid = checksum.ChunkGrid(layout.numel, manifest.spec.chunk_elems)
    if not grid.is_aligned(args.start, args.stop):
        raise GradshardError(f"range [{args.start}, {args.stop}) is not aligned to chunks of {grid.chunk_elems}")
    return manifest, layout, grid


def shard_reduce(args: ShardReduceArgs, store: Store) -> ReduceResult:
    """Reduce elements ``[start, stop)`` across all clients with the round's reducer, one window at a time.

    Memory: the reducer's buffers for one window (``mean``: one read buffer, or ``parallel_reads`` of them, and one
    accumulator; ``median`` / ``trimmed-mean``: N read buffers) — never the shard, whatever its length. With
    several read buffers, that many clients' windows are read at once (threads; the store releases the GIL while it
    waits) and still folded in canonical client order, so the result is the same bits.
    """
    manifest = load_manifest(store, args.round.manifest_key, args.round.manifest_sha256)
    grid = checksum.ChunkGrid(manifest.spec.model_layout().numel, manifest.spec.chunk_elems)
    if not grid.is_aligned(args.start, args.stop):
        raise GradshardError(f"shard [{args.start}, {args.stop}) is not aligned to chunks of {grid.chunk_elems}")
    return reduce_range(store, manifest, args.settings, args.output, args.start, args.stop)


def flat_reduce(args: FlatReduceArgs, store: Store) -> ReduceResult:
    """The single-aggregator reference: the same reducer over the whole model as one window."""
    manifest = load_manifest(store, args.round.manifest_key, args.round.manifest_sha256)
    numel = manifest.spec.model_layout().numel
    itemsize = np.dtype(manifest.spec.model_layout().flat_dtype).itemsize
    settings = args.settings.model_copy(update={"window_bytes": numel * itemsize,
                                                "parallel_reads": 1})
    return reduce_range(store, manifest, settings, args.output, 0, numel)


def reduce_range(store: Store, manifest: RoundManifest, settings: ReduceSettings, output: OutputTarget, start: int,
                 stop: int) -> ReduceResult:
    """Reduce ``[start, stop)`` of every client in windows and write it to ``output`` (the shared loop)."""
    layout = manifest.spec.model_layout()
    in_dtype = np.dtype(layout.flat_dtype)
    window = min(window_elems(settings.window_bytes, in_dtype.itemsize), stop - start)
    scales = manifest.scales()
    spec = parse_reducer(settings.reducer)
    extras: dict[str, Any] = {} if scales is None else {"scales": scales}
    if spec.name == "secagg":  # the masks phase 1 reconstructed, to remove window by window
        extras.update(masks=manifest.masks or [], mask_round=manifest.round, total_weight=manifest.secagg_weight)
    reducer = make_reducer(spec, weights=[c.weight for c in manifest.clients], capacity=window, in_dtype=in_dtype,
                           accumulate=settings.accumulate, parallel_reads=settings.parallel_reads, **extras)
    noise = None if settings.noise is None else ChunkNoise(settings.noise.key, checksum.ChunkGrid(
        layout.numel, manifest.spec.chunk_elems))
    batch = min(settings.parallel_reads, len(manifest.clients))  # clients read at once, each into its own buffer
    writer = RangeWriter.to(store, output, start, layout, manifest.spec.chunk_elems, window, settings.accumulate)
    inputs = open_inputs(store, manifest, layout, start, stop, window)
    previous = open_previous(store, manifest, layout) if reducer.uses_coverage else None
    pool = ThreadPoolExecutor(batch, thread_name_prefix="read") if batch > 1 else None
    try:
        for a in range(start, stop, window):
            b = min(a + window, stop)
            try:
                values = _reduce_window(reducer, pool, inputs, batch, a, b,
                                        None if previous is None else previous.load)
            except NonFiniteInput as exc:
                raise UpdateError(inputs[exc.index].client, f"non-finite values (NaN or inf) in elements "
                                                            f"[{a}, {b})") from None
            if not all_finite(values):
                raise nonfinite_culprit(store, manifest, layout, inputs, a, b)
            if noise is not None and settings.noise is not None:
                noise.add(a, values, settings.noise.sigma)
            writer.write(values)
    except UpdateError as first:
        # The output is void now; find every bad client of this range in one more pass, so that the driver rejects
        # them all at once and reruns the round once (not once per bad client).
        bad = find_bad_clients(store, manifest, layout, start, stop, window, first)
        if len(bad) == 1:
            raise
        raise BadUpdatesError(bad) from None
    finally:
        if pool is not None:
            pool.shutdown()
        for client in inputs:
            client.close()
        if previous is not None:
            previous.close()
    read_per_client = {c.client: c.bytes_read for c in inputs} if reducer.uses_coverage else {}
    return ReduceResult(checksums=writer.finish(), clients=len(inputs), window_elems=window,
                        bytes_read_per_client=read_per_client)


def _reduce_window(reducer: Reducer, pool: ThreadPoolExecutor | None, inputs: list[UpdateInput], batch: int,
                   a: int, b: int, previous: Callable[[int, int, npt.NDArray[Any]], None] | None) -> npt.NDArray[Any]:
    """Feed window ``[a, b)`` of every client to the reducer, ``batch`` clients read at a time, folded in order."""
    reducer.start(b - a, offset=a)
    for lo in range(0, len(inputs), batch):
        jobs = [(i, inputs[i]) for i in range(lo, min(lo + batch, len(inputs)))]
        for (i, _), covered in zip(jobs, _read_batch(pool, jobs, a, b, reducer), strict=True):
            if covered is False:
                reducer.skip(i)
            else:
                reducer.add(i, None if covered is True else covered)
    return reducer.finish(None if previous is None else partial(previous, a, b))


def _read_batch(pool: ThreadPoolExecutor | None, jobs: list[tuple[int, UpdateInput]], a: int, b: int,
                reducer: Reducer) -> list[npt.NDArray[np.bool_] | bool | None]:
    """Read window ``[a, b)`` of a batch of clients into their reducer buffers (at once with a pool)."""
    def read(job: tuple[int, UpdateInput]) -> npt.NDArray[np.bool_] | bool | None:
        return job[1].read(a, b, reducer.buffer(job[0]))

    return [read(job) for job in jobs] if pool is None else list(pool.map(read, jobs))


def open_inputs(store: Store, manifest: RoundManifest, layout: ModelLayout, start: int, stop: int,
                window: int) -> list[UpdateInput]:
    """Every client's verified input over ``[start, stop)``: full-size with its coverage when it declared one, or
    compact."""
    readers = _open_all(store, manifest, layout, open_client_update)
    return [client_input(reader, start, stop, _coverage(layout, entry.coverage), window)
            for reader, entry in zip(readers, manifest.clients, strict=True)]


def _coverage(layout: ModelLayout, extents: dict[str, tuple[int, ...]] | None) -> CoverageMap | None:
    return None if extents is None else CoverageMap(layout, extents)


def open_previous(store: Store, manifest: RoundManifest, layout: ModelLayout) -> PreviousModel | None:
    """The previous global model (``RoundSpec.base_key``) for elements nobody covers; None: they stay 0 (the updates
    are deltas)."""
    key = manifest.spec.base_key
    if not key:
        return None
    base = open_update(store, key, "base model", layout)
    if manifest.spec.base_model and base.sha256 != manifest.spec.base_model:
        base.close()
        raise RoundError(f"the base model {key} is not the round's (header sha256 {base.sha256[:12]}, the round "
                         f"expects {manifest.spec.base_model[:12]})")
    return PreviousModel(base)


def find_bad_clients(store: Store, manifest: RoundManifest, layout: ModelLayout, start: int, stop: int,
                     window: int, first: UpdateError) -> dict[str, str]:
    """Every client whose update is bad over ``[start, stop)``: each read whole (its covered chunks), its digests
    checked and its covered values tested for NaN/inf, one client at a time with one window buffer."""
    bad: dict[str, str] = {first.client: first.reason}
    buffer = np.empty(window, dtype=layout.flat_dtype)
    for entry in manifest.clients:
        if entry.client in bad:
            continue
        try:
            reader = open_client_update(store, entry.key, entry.client, layout, entry.header_sha256)
        except UpdateError as exc:
            bad[entry.client] = exc.reason
            continue
        client = client_input(reader, start, stop, _coverage(layout, entry.coverage), window)
        try:
            for a in range(start, stop, window):
                b = min(a + window, stop)
                values = buffer[: b - a]
                covered = client.read(a, b, values)
                if covered is False:
                    continue
                finite = np.isfinite(values) if covered is None else np.isfinite(values) | ~covered
                if not finite.all():
                    raise UpdateError(entry.client, f"non-finite values (NaN or inf) in elements [{a}, {b})")
        except UpdateError as exc:
            bad[entry.client] = exc.reason
        finally:
            client.close()
    return bad


def nonfinite_culprit(store: Store, manifest: RoundManifest, layout: ModelLayout, inputs: Sequence[UpdateInput],
                      a: int, b: int) -> GradshardError:
    """Find which client put NaN/inf into window ``[a, b)`` among the elements it covers (re-reading it); else the
    reduction itself overflowed."""
    values = np.empty(b - a, dtype=layout.flat_dtype)
    for entry, client in zip(manifest.clients, inputs, strict=True):
        client.read_again(a, b, values)
        covered = client.covered(a, b)
        bad = ~np.isfinite(values) if covered is None else ~np.isfinite(values) & covered
        if bad.any():
            return UpdateError(entry.client, f"non-finite values (NaN or inf) in elements [{a}, {b})")
    return RoundError(f"the reduction overflowed to inf in elements [{a}, {b}); use --accumulate float64")


register("shard_reduce", shard_reduce, args=ShardReduceArgs, result=ReduceResult,
         scope=lambda a: {"round": round_of_key(a.round.manifest_key), "range": [a.start, a.stop]})
register("flat_reduce", flat_reduce, args=FlatReduceArgs, result=ReduceResult,
         scope=lambda a: {"round": round_of_key(a.round.manifest_key), "range": [0, "all"]})
