"""Krum, Multi-Krum and Bulyan (issue 17): gradshard's sharded two-phase rounds against Flower's, on the same files.

N synthetic updates of a zoo layout (``make_round``; ResNet-18 and N = 12 by default: Bulyan with f = 2 needs
n ≥ 11) in a scratch ``LocalStore`` (``fsync=False``), page cache warmed; the last f clients are replaced by
attackers (each the negation of an honest client's update, ×10), so that the right selection is known. Per reducer:

- **gradshard**: ``aggregate_round`` on ``LocalExecutor(workers=W)`` (runtime started before the timing), topology
  ``sharded`` (M = ``--shards``, default the library's ``auto``): phase 1 (exact pairwise distances from direct
  differences) + selection + phase 2; wall time end to end and the largest per-function peak RSS from the reports
  (phase 1 and 2); median of ``--repeats`` rounds;
- **Flower** (flwr's ``aggregate_krum`` / ``aggregate_bulyan`` with Krum, the legacy strategies' functions) in a fresh
  process on the same files loaded as per-tensor ndarrays: the time of the call (loading reported apart) and the
  process's peak ``VmHWM``.

Then, for the record, Flower's Message-API ``compute_distances`` (``‖x‖² + ‖y‖² − 2x·y`` in float32) on the same
updates, checked for negative squared distances. Selection agreement: gradshard's selected set against the
float64 reference computed here (numpy, direct differences, one dot product per pair).

    .venv/bin/python bench/robust_selection.py               # ResNet-18, N = 12, f = 2
    .venv/bin/python bench/robust_selection.py --quick       # mlp: a smoke test
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
from _common import BENCH_DIR, fmt_bytes, run_flower_process, setup_logging, warm_files

from gradshard import (
    AggregateConfig,
    LocalExecutor,
    LocalStore,
    aggregate_key,
    aggregate_round,
    get_layout,
    read_flat,
    update_key,
)
from gradshard.core import selection
from gradshard.demo.synthetic import make_round
from gradshard.format.keys import selection_key
from gradshard.format.update import UpdateMeta, open_update
from gradshard.format.writer import write_update

log = logging.getLogger("bench")
ROUND = 0


def attack(store: LocalStore, layout: Any, clients: list[str], f: int) -> None:
    """Overwrite the last f clients' updates with −10 × an honest client's (same metadata otherwise)."""
    for i, client in enumerate(clients[-f:]):
        honest = read_flat(store, update_key(ROUND, clients[i]), layout, clients[i])
        with open_update(store, update_key(ROUND, client), client, layout) as old:
            meta: UpdateMeta = old.meta
        write_update(store, update_key(ROUND, client), layout, (-10.0 * honest).astype(np.float32),
                     UpdateMeta(client=client, round=ROUND, examples=meta.examples, layout_digest=meta.layout_digest,
                                chunk_elems=meta.chunk_elems, digest=meta.digest))


def exact_selection(store: LocalStore, layout: Any, clients: list[str], reducer: str) -> list[str]:
    """The reference: the N×N matrix from float64 direct differences (one float64 dot product per pair, computed
    here apart from gradshard's per-chunk sums), then the same rule."""
    vectors = [read_flat(store, update_key(ROUND, c), layout, c).astype(np.float64) for c in clients]
    n = len(vectors)
    d = np.zeros((n, n))
    for i, j in combinations(range(n), 2):
        diff = vectors[i] - vectors[j]
        d[i, j] = d[j, i] = float(np.dot(diff, diff))
    name, _, params = reducer.partition(":")
    values = [int(v) for v in params.split(",")]
    chosen = (selection.krum(d, values[0]) if name == "krum" else
              selection.multi_krum(d, values[0], values[1]) if name == "multi-krum" else
              selection.bulyan(d, values[0]))
    return [clients[i] for i in chosen]


def gram_negatives(store: LocalStore, layout: Any, clients: list[str]) -> dict[str, Any]:
    """Flower's Message-API distances (float32 Gram formula) on the same updates: negative entries, worst error."""
    try:
        from flwr.app import ArrayRecord
        from flwr.serverapp.strategy.multikrum import compute_distances
    except ImportError as exc:
        return {"skipped": str(exc)}
    vectors = [read_flat(store, update_key(ROUND, c), layout, c) for c in clients]
    theirs = compute_distances([ArrayRecord([v]) for v in vectors])
    off = ~np.eye(len(vectors), dtype=bool)
    return {"negative_entries": int((theirs[off] < 0).sum()), "min_entry": float(theirs[off].min())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layout", default="resnet18")
    ap.add_argument("--clients", type=int, default=12)
    ap.add_argument("-f", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shards", default="auto")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path, default=BENCH_DIR / "out" / "robust_selection.json")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    setup_logging(args.verbose)
    layout_name = "mlp" if args.quick else args.layout
    n, f = args.clients, args.f
    reducers = [f"krum:{f}", f"multi-krum:{f},{n - f}", f"bulyan:{f}"]
    shards = args.shards if args.shards == "auto" else int(args.shards)
    results: dict[str, Any] = {"layout": layout_name, "clients": n, "f": f, "reducers": {}}
    with tempfile.TemporaryDirectory(prefix="gradshard-robust-selection-") as tmp:
        store = LocalStore(Path(tmp) / "store", fsync=False)
        spec, client_list = make_round(store, ROUND, get_layout(layout_name), n)
        clients, layout = list(client_list), spec.model_layout()
        attack(store, layout, clients, f)
        paths = [store.root / update_key(ROUND, c) for c in clients]
        warm_files(paths)
        results["gram_formula"] = gram_negatives(store, layout, clients)
        with LocalExecutor(workers=args.workers) as ex:
            ex.prestart(["shard_reduce", "pairwise_distances"], store, wait=True)  # cold start not timed
            for reducer in reducers:
                cfg = AggregateConfig(shards=shards, reducer=reducer)
                times, peaks, selected, outputs = [], [], [], set()
                for _ in range(args.repeats):
                    for key in (aggregate_key(ROUND), selection_key(ROUND)):
                        if store.exists(key):
                            store.delete(key)
                    t = time.perf_counter()
                    res = aggregate_round(store, ROUND, ex, cfg)
                    times.append(time.perf_counter() - t)
                    peaks.append(max(r.peak_rss_bytes or 0 for r in res.all_reports))
                    selected = json.loads(store.get(selection_key(ROUND)))["selected"]
                    outputs.add(store.get(aggregate_key(ROUND)))
                name, _, params = reducer.partition(":")
                values = [int(v) for v in params.split(",")]
                request = {"paths": [str(p) for p in paths], "examples": [1] * n, "names": [t.name for t in layout],
                           "repeats": 1, "result_path": str(Path(tmp) / f"flower-{name}.npy"), "aggregator": name,
                           "f": values[0], "k": values[1] if len(values) > 1 else 0}
                flower = run_flower_process(request)
                reference = exact_selection(store, layout, clients, reducer)
                entry = {"gradshard_s": times, "gradshard_median_s": statistics.median(times),
                         "gradshard_fn_peak_bytes": max(peaks), "selected": selected,
                         "reference_selected": reference, "selection_matches_reference": selected == reference,
                         "attackers_selected": sorted(set(selected) & set(clients[-f:])),
                         "same_bytes_every_repeat": len(outputs) == 1,
                         "flower_call_s": flower["times_s"][0], "flower_load_s": flower["load_s"],
                         "flower_peak_bytes": flower["rss_peak_bytes"],
                         "flower_peak_above_interpreter_bytes": flower["rss_peak_bytes"]
                         - flower["rss_interpreter_bytes"]}
                results["reducers"][reducer] = entry
                print(f"{reducer:<16} gradshard {entry['gradshard_median_s']:7.2f} s, "
                      f"{fmt_bytes(entry['gradshard_fn_peak_bytes'])} per function; Flower call "
                      f"{entry['flower_call_s']:7.2f} s (+ {entry['flower_load_s']:.2f} s loading), peak "
                      f"{fmt_bytes(entry['flower_peak_bytes'])}; Flower ÷ gradshard "
                      f"{entry['flower_call_s'] / entry['gradshard_median_s']:.2f}×, memory "
                      f"{entry['gradshard_fn_peak_bytes'] / entry['flower_peak_bytes']:.3f} of Flower's; selection "
                      f"{'= reference' if entry['selection_matches_reference'] else '!= reference'}, attackers "
                      f"selected {entry['attackers_selected']}")
    print(f"Flower's Message-API distances (float32 Gram formula) on the same updates: {results['gram_formula']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
