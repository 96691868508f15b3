"""Secure aggregation's overhead (issue 17's report): the same updates aggregated in the clear (``mean``, uniform)
and securely (``secagg:16``), with no client and with one client dropped after masking; plus the clients' masking.

N updates of ``--numel`` float32 (normal, σ = 0.5) in a memory store, played as a secure round by
:func:`gradshard.demo.secagg.simulate_secure_round` (its wall time, per client, is the clients' side: key agreement,
shares, quantization and N masks of the model's length), then aggregated in-process (``InlineExecutor``, M shards)
three times each, best time reported. The plain round aggregates the same float32 updates with ``mean``. The
difference of the two aggregates is the quantization error (≤ N·2^−16 / N per element, printed). Every number is
measured by this run.

    .venv/bin/python bench/secagg_overhead.py                   # N = 8, 2 M elements
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from _common import BENCH_DIR, setup_logging

from gradshard.aggregation.driver import AggregateConfig, aggregate_round
from gradshard.core.zoo import synthetic
from gradshard.demo.secagg import simulate_secure_round
from gradshard.format.keys import aggregate_key, update_key
from gradshard.format.round import RoundSpec, open_round
from gradshard.format.update import UpdateMeta, read_flat
from gradshard.format.writer import write_update
from gradshard.runtime import InlineExecutor
from gradshard.store import MemoryStore


def best_round(store: MemoryStore, cfg: AggregateConfig, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if store.exists(aggregate_key(0)):
            store.delete(aggregate_key(0))
        t = time.perf_counter()
        aggregate_round(store, 0, InlineExecutor(), cfg)
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--numel", type=int, default=2_000_000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=BENCH_DIR / "out" / "secagg_overhead.json")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    setup_logging(args.verbose)
    layout = synthetic(args.numel, tensor_elems=1 << 20)
    rng = np.random.default_rng(0)
    updates = {f"client-{i:04d}": rng.normal(0, 0.5, layout.numel).astype(np.float32) for i in range(args.clients)}
    results: dict[str, object] = {"clients": args.clients, "numel": args.numel, "shards": args.shards}

    plain = MemoryStore()
    spec = RoundSpec.create(0, layout)
    open_round(plain, spec)
    for client, v in updates.items():
        write_update(plain, update_key(0, client), layout, v, UpdateMeta(
            client=client, round=0, examples=1, layout_digest=layout.digest(), chunk_elems=spec.chunk_elems))
    plain_s = best_round(plain, AggregateConfig(shards=args.shards, weighting="uniform"), args.repeats)
    results["plain_s"] = plain_s
    clear = read_flat(plain, aggregate_key(0), layout)
    print(f"{args.clients} clients x {args.numel:,} float32, M = {args.shards}")
    print(f"  plain mean                      {plain_s:.3f} s")
    for dropped in ((), ("client-0001",)):
        store = MemoryStore()
        t = time.perf_counter()
        simulate_secure_round(store, 0, layout, updates, bits=16, clip=8.0, dropped=dropped)
        clients_s = (time.perf_counter() - t) / args.clients
        secure_s = best_round(store, AggregateConfig(shards=args.shards, reducer="secagg:16", weighting="uniform"),
                              args.repeats)
        label = f"secagg, {len(dropped)} dropped"
        results[label] = {"aggregate_s": secure_s, "ratio_to_plain": secure_s / plain_s, "client_s": clients_s}
        line = (f"  {label:<30}  {secure_s:.3f} s ({secure_s / plain_s:.2f}x plain); per client "
                f"(keys, shares, quantize, {args.clients} masks): {clients_s:.3f} s")
        if not dropped:
            got = read_flat(store, aggregate_key(0), layout)
            error = float(np.abs(got.astype(np.float64) - clear.astype(np.float64)).max())
            results["max_abs_error_vs_plain"] = error
            line += f"; max |secure - plain| {error:.2e} (2^-16 = {2**-16:.2e})"
        print(line)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
