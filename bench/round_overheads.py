"""The fixed costs of a round, each measured with and without the mechanism that trims it, in the same run.

Four A/B pairs on the same files (``make_round`` updates of a zoo layout in a scratch ``LocalStore``, page cache
warm), every pair interleaved and reported as the median [min–max] of paired ratios (with ÷ without):

1. ``reopen``: opening one validated update the way a shard function does — full reparse of every tensor entry vs
   the manifest's recorded size and byte runs (``ClientEntry.validated``); in this process, per client.
2. ``runs``: warm rounds (``LocalExecutor(workers=2)``, M shards) whose manifest records the byte runs vs one that
   does not (``format.round._few_runs`` patched to record none, so the workers reparse every header).
3. ``prestart``: cold rounds — a fresh ``LocalExecutor`` each, so its zygote starts inside the round — with
   ``Executor.prestart`` vs without (patched to do nothing).
4. ``sync``: warm rounds on a durable store (``fsync=True``) whose functions write their ranges back as they close
   (``sync_ranges=True``) vs one where the commit's fsync writes everything (``sync_ranges=False``).
5. ``auto``: warm rounds with the default ``shards="auto"`` (one shard per worker: M = 2) vs ``--shards`` (M = 4).
6. ``validate``: the driver's validation of the round (``prepare_round``, in this process) with the header fast paths
   (a header whose bytes after the metadata are the layout's table as our writer encodes it: only the metadata is
   parsed, the table, its checks and byte runs and its digest's canonical encoding come from the layout's cached
   forms; else a parsed table equal to the layout's read with one comparison; the JSON depth of escape-free headers
   in one pass) vs without them (patched back to the whole-header parse entry by entry, the whole header's canonical
   encoding and the block scan).

    .venv/bin/python bench/round_overheads.py                     # ResNet-18, N = 32, M = 4
    .venv/bin/python bench/round_overheads.py --model vgg16 --clients 3 --pairs sync
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gradshard import AggregateConfig, aggregate_round
from gradshard.core import zoo
from gradshard.demo.synthetic import make_round
from gradshard.format import round as round_format
from gradshard.format.round import prepare_round
from gradshard.format.update import open_update
from gradshard.runtime import LocalExecutor
from gradshard.store import LocalStore

PAIRS = ("reopen", "runs", "prestart", "sync", "auto", "validate")


def ratio_line(name: str, with_: list[float], without: list[float], unit: str = "s") -> dict[str, Any]:
    ratios = [a / b for a, b in zip(with_, without, strict=True)]
    row = {"pair": name, "with": statistics.median(with_), "without": statistics.median(without),
           "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
           "unit": unit, "n": len(ratios)}
    print(f"{name:9s} with {row['with']:.4f} {unit}  without {row['without']:.4f} {unit}  ratio "
          f"{row['ratio_median']:.2f}x [{row['ratio_min']:.2f}-{row['ratio_max']:.2f}] ({len(ratios)} pairs)")
    return row


@contextlib.contextmanager
def patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def timed(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def reopen_pair(store: LocalStore, repeats: int) -> dict[str, Any]:
    manifest = prepare_round(store, 0)
    layout = manifest.spec.model_layout()

    def open_all(fast: bool) -> None:
        for entry in manifest.clients:
            open_update(store, entry.key, entry.client, layout, entry.header_sha256,
                        trusted=entry.validated() if fast else None).close()

    open_all(True)
    with_, without = [], []
    for _ in range(repeats):
        with_.append(timed(lambda: open_all(True)) / len(manifest.clients) * 1000)
        without.append(timed(lambda: open_all(False)) / len(manifest.clients) * 1000)
    return ratio_line("reopen", with_, without, "ms/client")


def validate_pair(store: LocalStore, repeats: int) -> dict[str, Any]:
    from gradshard.format import update

    def slow() -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(patched(update, "_layout_shaped", lambda raw, layout: None))
        stack.enter_context(patched(update, "_is_layout_table", lambda header, layout: False))
        stack.enter_context(patched(update, "json_depth", update._json_depth_scan))
        return stack

    prepare_round(store, 0)
    with_, without = [], []
    for _ in range(repeats):
        with_.append(timed(lambda: prepare_round(store, 0)) * 1000)
        with slow():
            without.append(timed(lambda: prepare_round(store, 0)) * 1000)
    return ratio_line("validate", with_, without, "ms/round")


def round_pair(name: str, store_with: LocalStore, store_without: LocalStore, config: AggregateConfig,
               repeats: int, without_patch: tuple[Any, str, Any] | None = None, cold: bool = False,
               config_without: AggregateConfig | None = None) -> dict[str, Any]:
    """Paired rounds: one with the mechanism, one without (another store, a patch, or another config),
    interleaved."""
    executors: dict[bool, LocalExecutor] = {}

    def one(with_mechanism: bool) -> float:
        store = store_with if with_mechanism else store_without
        executor = LocalExecutor(workers=2) if cold else executors.setdefault(with_mechanism, LocalExecutor(workers=2))
        patch = patched(*without_patch) if without_patch is not None and not with_mechanism else \
            contextlib.nullcontext()
        try:
            with patch:
                cfg = config if with_mechanism or config_without is None else config_without
                return timed(lambda: aggregate_round(store, 0, executor, cfg))
        finally:
            if cold:
                executor.close()

    try:
        if not cold:  # warm both executors first
            one(True), one(False)
        with_, without = [], []
        for i in range(repeats):
            order = (True, False) if i % 2 == 0 else (False, True)
            times = {flag: one(flag) for flag in order}
            with_.append(times[True])
            without.append(times[False])
    finally:
        for executor in executors.values():
            executor.close()
    return ratio_line(name, with_, without)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18", help="a gradshard.core.zoo layout")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=6, help="pairs per A/B")
    ap.add_argument("--pairs", default=",".join(PAIRS), help=f"comma-separated, of {', '.join(PAIRS)}")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    pairs = [p for p in args.pairs.split(",") if p]
    unknown = sorted(set(pairs) - set(PAIRS))
    if unknown:
        ap.error(f"unknown pairs {unknown}; known: {', '.join(PAIRS)}")
    layout = zoo.get_layout(args.model).aggregated()
    config = AggregateConfig(shards=args.shards)
    print(f"{args.model}: {layout.numel:,} float32 per client, N = {args.clients}, M = {args.shards}, "
          f"LocalExecutor(workers=2), inputs in the page cache")
    rows = []
    with tempfile.TemporaryDirectory(prefix="gradshard-overheads-") as tmp:
        scratch = LocalStore(Path(tmp) / "scratch", fsync=False)
        make_round(scratch, 0, layout, args.clients, seed=1)
        # the same objects under two durable stores for the sync pair (hard links: no second copy on disk)
        durable = {flag: LocalStore(Path(tmp) / f"durable-{flag}", sync_ranges=flag) for flag in (True, False)}
        for store in durable.values():
            for key in scratch.list("rounds/"):
                target = store.root / key
                target.parent.mkdir(parents=True, exist_ok=True)
                target.hardlink_to(scratch.root / key)
        if "reopen" in pairs:
            rows.append(reopen_pair(scratch, args.repeats))
        if "runs" in pairs:
            rows.append(round_pair("runs", scratch, scratch, config, args.repeats,
                                   (round_format, "_few_runs", lambda upd: None)))
        if "prestart" in pairs:
            rows.append(round_pair("prestart", scratch, scratch, config, args.repeats,
                                   (LocalExecutor, "prestart", lambda self, functions, store: None), cold=True))
        if "sync" in pairs:
            rows.append(round_pair("sync", durable[True], durable[False], config, args.repeats))
        if "validate" in pairs:
            rows.append(validate_pair(scratch, args.repeats))
        if "auto" in pairs:
            rows.append(round_pair("auto", scratch, scratch, AggregateConfig(), args.repeats,
                                   config_without=config))
    if args.json is not None:
        args.json.write_text(json.dumps({"model": args.model, "clients": args.clients, "shards": args.shards,
                                         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
