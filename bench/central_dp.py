"""What central DP costs a round, measured in one run: the plain sharded mean vs the same round with clipping and noise.

A round of ``--clients`` synthetic updates of ``--params`` float32 elements is written to a local store; then,
alternating over ``--repeats`` repetitions, it is aggregated with the local executor (worker processes, M shards)
(a) as the plain uniform mean and (b) with central DP (phase 1: the ``client_norms`` functions; phase 2: the mean
with clip factors and per-chunk Philox noise). Reported: median wall time of each, the ratio (b)/(a), the time
of phase 1 and of the noise alone (``ChunkNoise.add`` over the whole vector in this process), the functions'
peak memory, and that the DP aggregate has the same sha256 for M and 2·M.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import fmt_bytes

from gradshard import AggregateConfig, ModelLayout, TensorSpec, aggregate_round
from gradshard.core.checksum import ChunkGrid
from gradshard.demo.synthetic import make_round
from gradshard.format.keys import aggregate_key
from gradshard.privacy.config import CentralDPRound
from gradshard.privacy.noise import ChunkNoise, round_key
from gradshard.runtime.local import LocalExecutor
from gradshard.store import LocalStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=11_000_000, help="elements per update (ResNet-18: 11.7 M)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    layout = ModelLayout([TensorSpec("w", (args.params,), "float32")])
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(Path(tmp) / "store", fsync=False)
        make_round(store, 0, layout, args.clients)
        dp = CentralDPRound(clip=0.05, noise_multiplier=1.0, key_file=str(Path(tmp) / "dp.key"))
        plain = AggregateConfig(shards=args.shards, weighting="uniform")
        private = plain.model_copy(update={"central_dp": dp})
        times: dict[str, list[float]] = {"plain": [], "central DP": []}
        phase1: list[float] = []
        peaks: dict[str, int] = {}
        with LocalExecutor(workers=2) as executor:
            aggregate_round(store, 0, executor, plain)  # warm the worker runtime
            for _ in range(args.repeats):
                for name, config in (("plain", plain), ("central DP", private)):
                    started = time.perf_counter()
                    result = aggregate_round(store, 0, executor, config)
                    times[name].append(time.perf_counter() - started)
                    peaks[name] = max(r.peak_rss_bytes or 0 for r in result.all_reports)
                    if name == "central DP":
                        phase1.append(sum(r.duration_s for r in result.all_reports if r.function == "client_norms")
                                      / min(2, args.shards))
            sha = hashlib.sha256(store.get(aggregate_key(0))).hexdigest()
            aggregate_round(store, 0, executor, private.model_copy(update={"shards": 2 * args.shards}))
            same = hashlib.sha256(store.get(aggregate_key(0))).hexdigest() == sha
        values = np.zeros(args.params, dtype=np.float32)
        noise = ChunkNoise(round_key(b"b" * 32, 0), ChunkGrid(args.params, 65536))
        started = time.perf_counter()
        noise.add(0, values, 1.0)
        noise_s = time.perf_counter() - started

    a, b = statistics.median(times["plain"]), statistics.median(times["central DP"])
    size = fmt_bytes(args.params * 4)
    print(f"{args.clients} clients x {size}, M = {args.shards}, local executor, medians of {args.repeats}")
    print(f"  plain uniform mean     {a:7.3f} s   (range {min(times['plain']):.3f}-{max(times['plain']):.3f})")
    print(f"  central DP             {b:7.3f} s   (range {min(times['central DP']):.3f}-"
          f"{max(times['central DP']):.3f})   ratio {b / a:.2f}x")
    print(f"  phase 1 (norms), per worker   {statistics.median(phase1):.3f} s")
    print(f"  noise of {args.params:,} elements in one process   {noise_s:.3f} s "
          f"({noise_s / args.params * 1e9:.1f} ns per element)")
    print(f"  peak function memory: plain {fmt_bytes(peaks['plain'])}, central DP {fmt_bytes(peaks['central DP'])}")
    print(f"  DP aggregate sha256 equal for M = {args.shards} and {2 * args.shards}: {same}")


if __name__ == "__main__":
    main()
