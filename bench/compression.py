"""Compressed updates (issue 17's report): bytes uploaded, bytes the aggregation reads, and final accuracy, for
float32, block-wise int8 and top-k updates.

Every run trains the built-in ``mlp`` on scikit-learn's digits with the in-process trainer (clients inline), 15 IID
clients, all of them every round, ``--rounds`` rounds of one local epoch, lr 0.1, momentum 0.9, the same seed for
every compression: ``none`` (float32), ``int8`` (one scale per checksum chunk) and ``topk:<fraction>`` (the largest
entries of each client's update; the rest are kept by the client and added to its next update — error feedback, the
default — or, with the suffix ``/noef``, dropped). Per run: the mean size of one client's update
object, the bytes the aggregation functions read in a round (every client's share of every shard, headers and the
manifest included; from the round's ``reports.json``), and the final test accuracy. Every number is measured here.

    .venv/bin/python bench/compression.py   # none, int8, topk:0.1 and topk:0.01 with and without error feedback
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from _common import BENCH_DIR, fmt_bytes, setup_logging

CLIENTS = 15


def run_one(kind: str, rounds: int, seed: int) -> dict[str, Any]:
    from gradshard.aggregation.driver import AggregateConfig
    from gradshard.fl.config import DataConfig, TrainConfig
    from gradshard.fl.driver import Trainer
    from gradshard.format.keys import reports_key, round_prefix
    from gradshard.runtime import InlineExecutor
    from gradshard.store import LocalStore

    compression, _, option = kind.partition("/")
    cfg = TrainConfig(model="mlp", data=DataConfig(name="digits", partition="iid"), clients=CLIENTS, rounds=rounds,
                      epochs=1, batch_size=32, lr=0.1, momentum=0.9, seed=seed, compression=compression,
                      error_feedback=option != "noef", aggregation=AggregateConfig(weighting="uniform"))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gradshard-compression-") as tmp:
        store = LocalStore(tmp, fsync=False)
        history = Trainer(store, cfg, InlineExecutor()).run()
        sizes = [store.size(k) for r in range(rounds) for k in store.list(f"{round_prefix(r)}/updates/")]
        read = [json.loads(store.get(reports_key(r)))["summary"]["bytes_read"] for r in range(rounds)]
    return {"compression": kind, "seed": seed, "test_accuracy": [float(m["test_accuracy"]) for m in history],
            "update_bytes_mean": statistics.mean(sizes), "aggregation_bytes_read_mean": statistics.mean(read),
            "wall_s": time.perf_counter() - started}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--compressions", default="none int8 topk:0.1/noef topk:0.1 topk:0.01/noef topk:0.01",
                    help="space-separated; a top-k kind with /noef runs without error feedback")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--json", type=Path, default=BENCH_DIR / "out" / "compression.json")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    setup_logging(args.verbose)
    kinds = args.compressions.split()
    jobs = [(c, args.rounds, s) for s in range(args.seeds) for c in kinds]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(run_one, *zip(*jobs, strict=True)))
    base = {s: next(r for r in results if r["compression"] == kinds[0] and r["seed"] == s) for s in range(args.seeds)}
    print(f"\ndigits, mlp, {CLIENTS} clients, {args.rounds} rounds, {args.seeds} seed(s) (mean); ratios to "
          f"{kinds[0]!r} of the same seed")
    print(f"{'compression':<14} {'update object':>14} {'ratio':>6} {'aggregation reads':>18} {'ratio':>6} "
          f"{'final accuracy':>15} {'difference':>11}")
    for kind in kinds:
        runs = [r for r in results if r["compression"] == kind]
        size = statistics.mean(r["update_bytes_mean"] for r in runs)
        read = statistics.mean(r["aggregation_bytes_read_mean"] for r in runs)
        accuracy = statistics.mean(r["test_accuracy"][-1] for r in runs)
        size_ratio = statistics.mean(r["update_bytes_mean"] / base[r["seed"]]["update_bytes_mean"] for r in runs)
        read_ratio = statistics.mean(r["aggregation_bytes_read_mean"] / base[r["seed"]]["aggregation_bytes_read_mean"]
                                     for r in runs)
        diff = statistics.mean(r["test_accuracy"][-1] - base[r["seed"]]["test_accuracy"][-1] for r in runs)
        print(f"{kind:<14} {fmt_bytes(size):>14} {size_ratio:6.3f} {fmt_bytes(read):>18} {read_ratio:6.3f} "
              f"{accuracy:15.3f} {diff:+11.3f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rounds": args.rounds, "clients": CLIENTS, "results": results}, indent=1))


if __name__ == "__main__":
    main()
