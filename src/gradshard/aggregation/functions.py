"""The aggregation functions, as run inside an invocation: ``function(args, store) -> result``.

Each is stateless and idempotent: it reads the round manifest and its inputs from the store and writes its byte
range of the output upload; running it twice writes the same bytes. Arguments and results are the typed contracts
of :mod:`gradshard.aggregation.contracts`; the functions register themselves with the runtime here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt

from gradshard.aggregation.contracts import FlatReduceArgs, ReduceResult, ShardReduceArgs
from gradshard.core import checksum
from gradshard.core.layout import ModelLayout
from gradshard.core.reduce import WeightedSum, all_finite, fedavg_weights
from gradshard.errors import GradshardError, RoundError, UpdateError
from gradshard.format.round import ClientEntry, RoundManifest, load_manifest
from gradshard.format.update import UpdateReader, open_update
from gradshard.format.writer import RangeWriter
from gradshard.runtime.registry import register
from gradshard.store import Store
from gradshard.topology.common import window_elems


def open_clients(store: Store, manifest: RoundManifest, layout: ModelLayout) -> list[UpdateReader]:
    readers: list[UpdateReader] = []
    try:
        for entry in manifest.clients:
            reader = open_update(store, entry.key, entry.client, layout)
            readers.append(reader)
            if reader.sha256 != entry.header_sha256:
                raise UpdateError(entry.client, "object changed since the round was validated (header differs)")
    except BaseException:
        for r in readers:
            r.close()
        raise
    return readers


def nonfinite_culprit(clients: Sequence[str], load: Callable[[int], npt.NDArray[Any]], start: int,
                       stop: int) -> GradshardError:
    """Find which client put NaN/inf into a window (re-reading it); else the sum itself overflowed."""
    for i, client in enumerate(clients):
        if not np.isfinite(load(i)).all():
            return UpdateError(client, f"non-finite values (NaN or inf) in elements [{start}, {stop})")
    return RoundError(f"the weighted sum overflowed to inf in elements [{start}, {stop}); "
                      "use --accumulate float64")


def shard_reduce(args: ShardReduceArgs, store: Store) -> ReduceResult:
    """Average elements ``[start, stop)`` across all clients, streaming one window at a time.

    Memory: ``parallel_reads`` read buffers (default one) and one accumulator of ``window`` elements, whatever N
    and the shard length. With several buffers, that many clients' windows are read at once (threads; the store
    releases the GIL while it waits) and still added in canonical client order, so the sum is the same bits.
    """
    settings = args.settings
    manifest = load_manifest(store, args.round.manifest_key, args.round.manifest_sha256)
    layout = manifest.spec.model_layout()
    grid = checksum.ChunkGrid(layout.numel, manifest.spec.chunk_elems)
    if not grid.is_aligned(args.start, args.stop):
        raise GradshardError(f"shard [{args.start}, {args.stop}) is not aligned to chunks of {grid.chunk_elems}")
    weights = fedavg_weights([c.examples for c in manifest.clients], settings.weighting)
    in_dtype = np.dtype(layout.flat_dtype)
    window = min(window_elems(settings.window_bytes, in_dtype.itemsize), args.stop - args.start)
    bufs = np.empty((min(settings.parallel_reads, len(manifest.clients)), window), dtype=in_dtype)
    acc = WeightedSum(window, settings.accumulate)
    writer = RangeWriter.to(store, args.output, args.start, layout, grid.chunk_elems, window, settings.accumulate)
    readers = open_clients(store, manifest, layout)
    streams = [r.stream(args.start, args.stop) for r in readers]
    pool = ThreadPoolExecutor(len(bufs), thread_name_prefix="read") if len(bufs) > 1 else None
    try:
        for a in range(args.start, args.stop, window):
            b = min(a + window, args.stop)
            acc.start(b - a)
            for lo in range(0, len(streams), len(bufs)):
                batch = list(zip(streams[lo : lo + len(bufs)], bufs[:, : b - a], strict=False))
                if pool is None:
                    batch[0][0].read_next(batch[0][1])
                else:
                    list(pool.map(lambda job: job[0].read_next(job[1]), batch))
                for j, (_, x) in enumerate(batch):
                    acc.add(x, weights[lo + j])
            if not all_finite(acc.value):
                def reread(i: int, a: int = a, b: int = b) -> npt.NDArray[Any]:
                    readers[i].read(a, b, bufs[0, : b - a])
                    return bufs[0, : b - a]
                raise nonfinite_culprit([r.client for r in readers], reread, a, b)
            writer.write(acc.value)
    finally:
        if pool is not None:
            pool.shutdown()
        for reader in readers:
            reader.close()
    return ReduceResult(checksums=writer.finish(), clients=len(readers), window_elems=window)


def load_whole_update(store: Store, entry: ClientEntry, layout: ModelLayout) -> npt.NDArray[Any]:
    """Read a whole update into one array (a single ranged read) and verify every chunk's checksum."""
    with open_update(store, entry.key, entry.client, layout) as update:
        if update.sha256 != entry.header_sha256:
            raise UpdateError(entry.client, "object changed since the round was validated (header differs)")
        values = np.empty(layout.numel, dtype=update.dtype)
        update.read_verified(0, layout.numel, values)
        return values


def flat_reduce(args: FlatReduceArgs, store: Store) -> ReduceResult:
    """The single-aggregator reference: load each whole update in canonical order and average."""
    settings = args.settings
    manifest = load_manifest(store, args.round.manifest_key, args.round.manifest_sha256)
    layout = manifest.spec.model_layout()
    chunk = manifest.spec.chunk_elems
    weights = fedavg_weights([c.examples for c in manifest.clients], settings.weighting)
    acc = WeightedSum(layout.numel, settings.accumulate)
    acc.start(layout.numel)
    for entry, weight in zip(manifest.clients, weights, strict=True):
        acc.add(load_whole_update(store, entry, layout), weight)
    if not all_finite(acc.value):
        raise nonfinite_culprit([c.client for c in manifest.clients],
                                lambda i: load_whole_update(store, manifest.clients[i], layout), 0,
                                layout.numel)
    writer = RangeWriter.to(store, args.output, 0, layout, chunk, layout.numel, settings.accumulate)
    writer.write(acc.value)
    return ReduceResult(checksums=writer.finish(), clients=len(manifest.clients), window_elems=layout.numel)


register("shard_reduce", shard_reduce, args=ShardReduceArgs, result=ReduceResult)
register("flat_reduce", flat_reduce, args=FlatReduceArgs, result=ReduceResult)
