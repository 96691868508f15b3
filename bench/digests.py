"""Throughput of the chunk digest algorithms on one core, next to an in-place ``np.add`` of the same array.

For each algorithm of :mod:`gradshard.core.digests`: one digest of the whole array (the algorithm's raw speed),
and the per-chunk digests of a :class:`gradshard.core.checksum.ChunkStream` fed in 4 MiB windows with the
format's default chunk size (what a shard function does while it reads). The best of ``--repeats`` runs is
reported in GB/s (10⁹ bytes per second). Figures go to stdout and to ``bench/out/digests.json``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _common import BENCH_DIR, MIB, setup_logging, write_section

from gradshard.core import checksum, digests


def best_gbps(nbytes: int, run: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return nbytes / best / 1e9


def streamed(values: np.ndarray[Any, Any], name: str, window: int) -> None:
    grid = checksum.ChunkGrid(len(values), checksum.default_chunk_elems(len(values)))
    stream = checksum.ChunkStream(grid, 0, name)
    for lo in range(0, len(values), window):
        stream.feed(values[lo : lo + window])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256, help="array size in MiB (float32)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "out" / "digests.json")
    args = parser.parse_args()
    setup_logging()
    values = np.random.default_rng(0).standard_normal(args.mib * MIB // 4, dtype=np.float32)
    other = values.copy()
    window = 4 * MIB // 4
    rows: dict[str, Any] = {"np.add (in place)": {"whole_gbps": best_gbps(
        values.nbytes, lambda: np.add(other, values, out=other), args.repeats)}}
    for name in digests.NAMES:
        algorithm = digests.algorithm(name)
        rows[name] = {"whole_gbps": best_gbps(values.nbytes, lambda a=algorithm: a.hexdigest(values), args.repeats),
                      "chunked_gbps": best_gbps(values.nbytes, lambda n=name: streamed(values, n, window),
                                                args.repeats)}
    chunk = checksum.default_chunk_elems(len(values))
    print(f"{args.mib} MiB float32, one core, chunks of {chunk} elements, best of {args.repeats}")
    for name, row in rows.items():
        chunked = f"{row['chunked_gbps']:6.2f} GB/s chunked" if "chunked_gbps" in row else ""
        print(f"  {name:18s} {row['whole_gbps']:6.2f} GB/s whole  {chunked}")
    write_section(args.out, "digests", {"mib": args.mib, "chunk_elems": chunk, "repeats": args.repeats, **rows})


if __name__ == "__main__":
    main()
