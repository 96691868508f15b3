"""A/B of two gradshard source trees on the same round: does a change slow aggregation down?

    git worktree add /tmp/old <commit>                       # the tree to compare against
    python bench/ab_sources.py --old /tmp/old/src [--new src] [--pairs 4] [--layout resnet18] [--clients 16]

The round is written once by the *old* tree (so both can read it), then each pair runs the old and the new tree in
fresh processes, one after the other (interleaved, so the shared machine's load hits both alike). Each process
aggregates the round once to warm up and reports its best of 3 rounds (LocalExecutor(workers=2), sharded M = 4).
Prints each pair's ratio new / old and their median.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

WRITE = """
import sys
from gradshard.store import LocalStore
from gradshard.demo.synthetic import make_round
try:
    from gradshard.core.zoo import get_layout
except ImportError:
    from gradshard.zoo import get_layout
make_round(LocalStore(sys.argv[1], fsync=False), 0, get_layout(sys.argv[2]), int(sys.argv[3]), seed=0)
"""

TIME = """
import sys, time
from gradshard.store import LocalStore
from gradshard.runtime import LocalExecutor
try:
    from gradshard.aggregation.driver import AggregateConfig, aggregate_round
except ImportError:
    from gradshard.aggregate import AggregateConfig, aggregate_round
store, config = LocalStore(sys.argv[1], fsync=False), AggregateConfig(shards=int(sys.argv[2]))
with LocalExecutor(workers=2) as executor:
    aggregate_round(store, 0, executor, config)
    times = []
    for _ in range(3):
        started = time.perf_counter()
        aggregate_round(store, 0, executor, config)
        times.append(time.perf_counter() - started)
print(min(times))
"""


def run(src: Path, code: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(src.resolve())}
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", type=Path, required=True, help="the src/ directory of the tree to compare against")
    ap.add_argument("--new", type=Path, default=Path(__file__).resolve().parents[1] / "src")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--layout", default="resnet18")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--shards", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="gradshard-ab-") as store:
        run(args.old, WRITE, store, args.layout, str(args.clients))
        ratios = []
        for pair in range(1, args.pairs + 1):
            old = float(run(args.old, TIME, store, str(args.shards)))
            new = float(run(args.new, TIME, store, str(args.shards)))
            ratios.append(new / old)
            print(f"pair {pair}: old {old:.3f} s, new {new:.3f} s, new/old {new / old:.2f}")
    print(f"new/old: {min(ratios):.2f}–{max(ratios):.2f}, median {statistics.median(ratios):.2f} "
          f"({args.layout}, N = {args.clients}, M = {args.shards}, best of 3 rounds per process)")


if __name__ == "__main__":
    main()
