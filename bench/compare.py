"""Architecture comparison at VGG-16 scale: flat, GradsSharding, λ-FL and LIFL on the same round of N updates.

1. Writes N synthetic VGG-16 updates (134.3 M float32 parameters, 537 MB each; N = 20 by default, 10.7 GB) with
   ``gradshard.demo.synthetic.make_round`` into a scratch store, ``LocalStore(dir, fsync=False)``: scratch data needs
   no durability, and fsyncing 10.7 GB would time the disk rather than aggregation. Free disk is checked first.
2. ``compare_round`` without a memory limit (workers 2, LIFL on 2 nodes): every architecture runs; the table goes
   to stdout and the files to ``bench/out/compare.{json,csv,png}``.
3. ``compare_round`` with ``--memory-limit-mb`` (default 1024 MiB, between a shard function's need and a tree
   node's): the trees and flat are predicted infeasible; by default they are run anyway under the cap to show
   that they fail (``--no-run-infeasible`` skips them); GradsSharding completes. Files:
   ``bench/out/compare-limit.{json,csv,png}``.

The updates were just written, so most of them are in the page cache (24 GiB machine): the times measure
aggregation from memory-speed reads, not a cold disk. The scratch store is deleted at the end.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

from _common import BENCH_DIR, GB, MIB, fmt_bytes, free_disk_bytes, setup_logging, wait_idle
from rich.console import Console

from gradshard.aggregation.compare import CompareEvent, CompareResult, compare_round
from gradshard.cli.console import compare_table
from gradshard.cli.plots import compare_png
from gradshard.core.zoo import get_layout
from gradshard.demo.synthetic import make_round
from gradshard.store import LocalStore

log = logging.getLogger("bench")
DISK_MARGIN = 2 * GB


def _log_event(event: CompareEvent) -> None:
    if event.kind == "start":
        log.info("%s: running %d invocation(s)", event.architecture, event.invocations)
    elif event.kind == "finished" and event.row is not None:
        row = event.row
        log.info("%s: %s%s", row.architecture, row.status, f" ({row.note})" if row.note else "")


def _write(out_dir: Path, stem: str, result: CompareResult) -> None:
    """``<stem>.json``, ``.csv`` and ``.png``, each written to a temporary name and renamed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for suffix, data in ((".json", result.to_json().encode()), (".csv", result.to_csv().encode()),
                         (".png", compare_png(result))):
        path = out_dir / f"{stem}{suffix}"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)


def _compare(store: LocalStore, args: argparse.Namespace, console: Console, limit_mb: float | None,
             stem: str) -> None:
    wait_idle(30.0)
    limit = None if limit_mb is None else int(limit_mb * MIB)
    started = time.perf_counter()
    result = compare_round(store, 0, memory_limit_bytes=limit, workers=args.workers, nodes=args.nodes,
                           run_infeasible=args.run_infeasible, on_event=_log_event)
    log.info("comparison took %.1f s", time.perf_counter() - started)
    console.print(compare_table(result))
    _write(args.out, stem, result)
    log.info("wrote %s/%s.{json,csv,png}", args.out, stem)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", default="vgg16", help="model layout (default: vgg16)")
    parser.add_argument("--clients", type=int, default=20, help="clients N (default: 20)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--nodes", type=int, default=2, help="LIFL nodes")
    parser.add_argument("--memory-limit-mb", type=float, default=1024.0,
                        help="per-function limit of the second comparison, MiB (default: 1024)")
    parser.add_argument("--run-infeasible", action=argparse.BooleanOptionalAction, default=True,
                        help="in the limited comparison, run infeasible architectures to show them fail")
    parser.add_argument("--scratch", type=Path, default=None, help="parent directory of the scratch store")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "out")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    setup_logging(args.verbose)
    console = Console(width=150)
    layout = get_layout(args.layout).aggregated()
    scratch = Path(tempfile.mkdtemp(prefix="gradshard-compare-", dir=args.scratch))
    try:
        # N updates, plus the aggregate, the reference copy and an upload in flight, plus a margin.
        need = (args.clients + 3) * layout.nbytes + DISK_MARGIN
        if free_disk_bytes(scratch) < need:
            raise SystemExit(f"not enough free disk in {scratch}: need {fmt_bytes(need)}, "
                             f"have {fmt_bytes(free_disk_bytes(scratch))}")
        store = LocalStore(scratch / "store", fsync=False)
        log.info("writing %d %s updates of %s (%s in all) to %s (LocalStore, fsync=False)", args.clients,
                 args.layout, fmt_bytes(layout.nbytes), fmt_bytes(args.clients * layout.nbytes), store.root)
        started = time.perf_counter()
        make_round(store, 0, layout, args.clients)
        log.info("wrote the round in %.1f s", time.perf_counter() - started)
        _compare(store, args, console, None, "compare")
        _compare(store, args, console, args.memory_limit_mb, "compare-limit")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        log.info("removed the scratch store %s", scratch)


if __name__ == "__main__":
    main()
