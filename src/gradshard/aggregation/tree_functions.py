"""Tree aggregators (λ-FL and LIFL nodes): fold whole client updates and children's partials, hold the full model.

A node computes the *weighted partial* ``(S, W) = (Σ nᵢ·xᵢ, Σ nᵢ)`` over its clients and its children's partials;
the root divides ``S / W``. Passing unnormalised sums is what makes the tree FedAvg; averaging the children's means
("mean of means", the published LIFL reimplementation) is not, when groups differ in size or weight.

Partials are update-format objects of kind ``partial`` in the accumulation dtype, with ``examples = W``. They go to
the object store or, for LIFL hand-offs between aggregators on the same node, to that node's shared-memory store.
Every tree node holds full-size vectors — the memory ceiling GradsSharding removes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from gradshard.aggregation.contracts import TreeReduceArgs, TreeReduceResult
from gradshard.core.layout import ModelLayout
from gradshard.core.masks import remove_masks
from gradshard.core.reduce import WeightedSum, all_finite
from gradshard.core.reducers import parse_reducer
from gradshard.errors import GradshardError, RoundError, UpdateError
from gradshard.format.compact import open_client_update
from gradshard.format.keys import round_of_key
from gradshard.format.round import ClientEntry, RoundManifest, load_manifest
from gradshard.format.update import UpdateMeta, open_update
from gradshard.format.writer import RangeWriter, write_update
from gradshard.runtime.registry import register
from gradshard.store import Store, open_store


def load_whole_update(store: Store, entry: ClientEntry, layout: ModelLayout) -> npt.NDArray[Any]:
    """Read a whole update into one array (a single ranged read) and verify every chunk's checksum."""
    with open_update(store, entry.key, entry.client, layout, entry.header_sha256, trusted=entry.validated()) as update:
        if update.sha256 != entry.header_sha256:
            raise UpdateError(entry.client, "object changed since the round was validated (header differs)")
        values = np.empty(layout.numel, dtype=update.dtype)
        update.read_verified(0, layout.numel, values)
        return values


def whole_culprit(clients: Sequence[str], load: Callable[[int], npt.NDArray[Any]], start: int,
                       stop: int) -> GradshardError:
    """Find which client put NaN/inf into a window (re-reading it); else the sum itself overflowed."""
    for i, client in enumerate(clients):
        if not np.isfinite(load(i)).all():
            return UpdateError(client, f"non-finite values (NaN or inf) in elements [{start}, {stop})")
    return RoundError(f"the weighted sum overflowed to inf in elements [{start}, {stop}); "
                      "use --accumulate float64")


def partial_layout(layout: ModelLayout, accumulate: str) -> ModelLayout:
    """A partial sum has the model's tensors in the accumulation dtype."""
    return layout.aggregated(accumulate)


def read_partial(store: Store, key: str, layout: ModelLayout, r: int) -> tuple[npt.NDArray[Any], float]:
    """A child's verified partial sum and its weight."""
    name = f"partial {key}"
    with open_update(store, key, name, layout) as upd:
        if upd.meta.kind != "partial" or upd.meta.round != r:
            raise UpdateError(name, f"expected a partial of round {r}, found a {upd.meta.kind} of round "
                                    f"{upd.meta.round}")
        values = np.empty(layout.numel, dtype=upd.dtype)
        upd.read_verified(0, layout.numel, values)
        return values, float(upd.meta.extra.get("weight", upd.meta.examples))


def _wait_for(store: Store, entries: list[ClientEntry], wait_s: float) -> list[ClientEntry]:
    """Eager order: clients whose objects exist now first, then each late one as it appears (up to ``wait_s``)."""
    pending = list(entries)
    ordered: list[ClientEntry] = []
    deadline = time.monotonic() + wait_s
    while pending:
        ready = [e for e in pending if store.exists(e.key)]
        if not ready:
            if time.monotonic() >= deadline:
                missing = ", ".join(e.client for e in pending)
                raise RoundError(f"updates of {missing} did not arrive within {wait_s:g} s")
            time.sleep(0.05)
            continue
        ordered.extend(ready)
        pending = [e for e in pending if e not in ready]
    return ordered


def tree_reduce(args: TreeReduceArgs, store: Store) -> TreeReduceResult:
    """Fold this node's clients and children into a weighted partial, or (root) into the aggregate."""
    settings = args.settings
    manifest = load_manifest(store, args.round.manifest_key, args.round.manifest_sha256)
    layout = manifest.spec.model_layout()
    chunk = manifest.spec.chunk_elems
    shm = open_store(args.node_store) if args.node_store is not None else None
    by_id = {c.client: c for c in manifest.clients}
    entries = _wait_for(store, [by_id[c] for c in args.clients], args.wait_s)
    spec = parse_reducer(settings.reducer)
    if spec.name == "secagg":
        return _secure_tree_reduce(args, store, shm, manifest, entries, spec.bits)
    acc = WeightedSum(layout.numel, settings.accumulate)
    acc.start(layout.numel)
    total = 0.0
    for entry in entries:  # each update is folded in as soon as it is loaded: one whole update in memory at a time
        count = entry.weight
        acc.add(load_whole_update(store, entry, layout), count)
        total += count
    if entries and not all_finite(acc.value):
        raise whole_culprit([e.client for e in entries],
                                lambda i: load_whole_update(store, entries[i], layout), 0, layout.numel)
    sums = partial_layout(layout, settings.accumulate)
    for ref in args.partials:
        source = shm if ref.via == "shm" and shm is not None else store
        values, weight = read_partial(source, ref.key, sums, manifest.round)
        acc.add(values, 1.0)
        total += weight
        del values  # else the next partial is read while this one is still held: three full vectors
    done = TreeReduceResult(clients=len(entries), partials=len(args.partials), weight=total)
    if args.output is not None:
        target = shm if args.output.via == "shm" and shm is not None else store
        meta = UpdateMeta(client=args.output.key.rsplit("/", 1)[-1].removesuffix(".safetensors"),
                          round=manifest.round, examples=max(1, round(total)), layout_digest=sums.digest(),
                          chunk_elems=chunk, extra={"weight": repr(total)},
                          kind="partial", digest=manifest.spec.digest)
        write_update(target, args.output.key, sums, acc.value, meta)
        return done.model_copy(update={"shm": shm.io.as_dict() if shm is not None else {}})
    if args.target is None:
        raise RoundError("a tree root needs the aggregate's upload (target)")
    mean = acc.value
    np.divide(mean, mean.dtype.type(total), out=mean)
    writer = RangeWriter.to(store, args.target, 0, layout, chunk, layout.numel, settings.accumulate)
    writer.write(mean)
    return done.model_copy(update={"shm": shm.io.as_dict() if shm is not None else {}, "checksums": writer.finish()})


def _secure_tree_reduce(args: TreeReduceArgs, store: Store, shm: Store | None, manifest: RoundManifest,
                        entries: list[ClientEntry], bits: int) -> TreeReduceResult:
    """``secagg`` in a tree: masked words and partials summed modulo 2³² (associative: the same words as any
    sharded plan), partials stored bit for bit in the float32 partial layout; the root removes the masks of the
    whole vector and divides by ``2^bits·N`` (``2^bits·Σwᵢ`` when the clients masked weighted updates)."""
    layout = manifest.spec.model_layout()
    sums = partial_layout(layout, "float32")
    total = np.zeros(layout.numel, dtype=np.uint32)
    count = 0
    with np.errstate(over="ignore"):
        for entry in entries:
            with open_client_update(store, entry.key, entry.client, layout, entry.header_sha256) as update:
                words = np.empty(layout.numel, dtype=np.float32)
                update.read_verified(0, layout.numel, words)
            total += words.view(np.uint32)
            count += 1
        for ref in args.partials:
            source = shm if ref.via == "shm" and shm is not None else store
            values, weight = read_partial(source, ref.key, sums, manifest.round)
            total += values.view(np.uint32)
            count += int(weight)
    done = TreeReduceResult(clients=len(entries), partials=len(args.partials), weight=float(count),
                            shm=shm.io.as_dict() if shm is not None else {})
    if args.output is not None:
        target = shm if args.output.via == "shm" and shm is not None else store
        meta = UpdateMeta(client=args.output.key.rsplit("/", 1)[-1].removesuffix(".safetensors"),
                          round=manifest.round, examples=max(1, count), layout_digest=sums.digest(),
                          chunk_elems=manifest.spec.chunk_elems, extra={"weight": repr(float(count))},
                          kind="partial", digest=manifest.spec.digest)
        write_update(target, args.output.key, sums, total.view(np.float32), meta)
        return done
    if args.target is None:
        raise RoundError("a tree root needs the aggregate's upload (target)")
    remove_masks(total, 0, manifest.masks or [], manifest.round)
    mean = np.empty(layout.numel, dtype=np.float32)
    denominator = count if manifest.secagg_weight is None else manifest.secagg_weight  # weighted: Σ wᵢ
    np.divide(total.view(np.int32), float(2**bits) * denominator, out=mean, dtype=np.float64, casting="unsafe")
    writer = RangeWriter.to(store, args.target, 0, layout, manifest.spec.chunk_elems, layout.numel, "float32")
    writer.write(mean)
    return done.model_copy(update={"checksums": writer.finish()})


register("tree_reduce", tree_reduce, args=TreeReduceArgs, result=TreeReduceResult,
         scope=lambda a: {"round": round_of_key(a.round.manifest_key), "clients": list(a.clients),
                          "partials": [p.key for p in a.partials], "root": a.output is None})
