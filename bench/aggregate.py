"""Aggregation benchmark: gradshard's sharded reduction against the machine's streaming bound and Flower.

Default mode (both sections, a minute or two):

1. **Throughput.** N client updates of P float32 elements in a scratch ``LocalStore`` (``fsync=False``), page cache
   warmed; baseline = in-place ``np.add(acc, x, out=acc)`` over the same N vectors in memory; gradshard = end-to-end
   ``aggregate_round`` on ``LocalExecutor(workers=W)`` with M shards. Reports input GB/s, the ratio to the baseline
   (target >= 0.7) and per-function GB/s; checks that the sharded output equals the flat topology's byte for byte.
2. **Flower.** ``flwr.server.strategy.aggregate.aggregate`` on the same updates (ResNet-18 layout by default) in a
   fresh process: time of the call and peak memory; against gradshard's end-to-end time and per-function peak
   (targets: >= 3x faster, per-function peak <= Flower's peak / N); numerical agreement.

``--large``: a 10 GB-per-client round (P = 2.5e9) written and verified in a streaming way, aggregated under a
1 GiB per-function memory cap.

Figures go to stdout and to ``bench/out/aggregate.json`` (one key per section; a run replaces the sections it ran).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from _common import (
    DEFAULT_OUT,
    GB,
    GIB,
    MIB,
    CpuMeter,
    best,
    drop_from_page_cache,
    file_sha256,
    fmt_bytes,
    free_disk_bytes,
    maxrss_bytes,
    parse_ints,
    parse_size,
    run_flower_process,
    setup_logging,
    wait_idle,
    warm_files,
    write_section,
)

from gradshard.aggregation.contracts import ShardReduceArgs
from gradshard.aggregation.driver import AggregateConfig, AggregateResult, aggregate_round
from gradshard.core import checksum
from gradshard.core.layout import ModelLayout
from gradshard.core.reduce import fedavg, fedavg_weights
from gradshard.core.zoo import get_layout, synthetic
from gradshard.format.keys import aggregate_key, update_key
from gradshard.format.round import RoundSpec, open_round
from gradshard.format.update import UpdateMeta, open_update, read_flat
from gradshard.format.writer import UpdateWriter, write_update
from gradshard.runtime import LocalExecutor
from gradshard.store import LocalStore
from gradshard.topology.base import Invocation, Plan
from gradshard.topology.common import DEFAULT_WINDOW_BYTES

log = logging.getLogger("bench")

TARGET_RATIO = 0.7
TARGET_SPEEDUP = 3.0
R_THROUGHPUT, R_VERIFY, R_FLOWER, R_LARGE = 0, 1, 2, 3
STORE_NOTE = "scratch store: LocalStore(dir, fsync=False) - objects are atomically visible but not fsynced"


# --- setup --------------------------------------------------------------------------------------------------------
def client_ids(n: int) -> list[str]:
    return [f"c{i:03d}" for i in range(n)]


def examples_of(i: int) -> int:
    return 100 + 37 * i  # unequal, so the weighting matters


def client_rng(seed: int, r: int, i: int) -> np.random.Generator:
    return np.random.default_rng([seed, r, i])


def fill_random(rng: np.random.Generator, out: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Uniform values in [-1, 1) written into ``out`` (~1.8 GB/s; ``standard_normal`` manages ~0.4 GB/s)."""
    rng.random(out=out, dtype=np.float32)
    out *= 2
    out -= 1
    return out


def open_scratch_round(store: LocalStore, r: int, layout: ModelLayout) -> RoundSpec:
    spec = RoundSpec.create(r, layout)
    open_round(store, spec)
    return spec


def write_round(store: LocalStore, r: int, layout: ModelLayout, n: int, seed: int, *,
                keep: bool) -> tuple[list[str], list[int], list[npt.NDArray[np.float32]]]:
    """Write N random updates for round ``r``; returns (clients, examples, vectors if ``keep``)."""
    spec = open_scratch_round(store, r, layout)
    digest = layout.digest()
    clients, examples, vectors = client_ids(n), [examples_of(i) for i in range(n)], []
    for i, client in enumerate(clients):
        vec = fill_random(client_rng(seed, r, i), np.empty(layout.numel, dtype=np.float32))
        write_update(store, update_key(r, client), layout, vec,
                     UpdateMeta(client=client, round=r, examples=examples[i], layout_digest=digest,
                                chunk_elems=spec.chunk_elems))
        if keep:
            vectors.append(vec)
    return clients, examples, vectors


def update_paths(store: LocalStore, r: int, clients: list[str]) -> list[Path]:
    return [store.root / update_key(r, c) for c in clients]


def noop_baseline(executor: LocalExecutor, store: LocalStore, runs: int = 3) -> int:
    """Peak RSS of a function that does nothing (the interpreter baseline); also warms the executor's zygote."""
    peaks: list[int] = []
    for k in range(runs):
        plan = Plan("noop", (Invocation(f"noop-{k}", "noop", {}, 0),))
        (report,) = executor.run(plan, store)
        if not report.ok or report.peak_rss_bytes is None:
            raise RuntimeError(f"noop invocation failed: {report.error_type}: {report.error}")
        peaks.append(int(report.peak_rss_bytes))
    return min(peaks)


@dataclass(frozen=True)
class Idle:
    """Wait for the (possibly shared) machine to be idle before a timed run: up to ``max_wait_s``."""

    max_wait_s: float
    threshold: float

    def wait(self) -> float:
        return wait_idle(self.max_wait_s, self.threshold) if self.max_wait_s > 0 else float("nan")


def timed_rounds(store: LocalStore, r: int, executor: LocalExecutor, cfg: AggregateConfig, repeats: int,
                 idle: Idle) -> tuple[list[float], list[dict[str, float]], AggregateResult]:
    """Run ``aggregate_round`` ``repeats`` times; returns the wall times, the machine's load around each run and
    the result of the fastest run.

    The previous aggregate is deleted before each run (untimed): replacing an existing 128 MiB object makes
    ``os.replace`` free its page cache inside the timed region (~90 ms), which a real round never pays.
    """
    times: list[float] = []
    loads: list[dict[str, float]] = []
    fastest: AggregateResult | None = None
    for _ in range(repeats):
        store.delete(aggregate_key(r))
        before = idle.wait()
        with CpuMeter() as meter:
            t = time.perf_counter()
            res = aggregate_round(store, r, executor, cfg)
            times.append(time.perf_counter() - t)
        loads.append({"busy_before": before, "busy_during": meter.busy})
        if not all(rep.ok for rep in res.reports) or res.manifest.rejected:
            raise RuntimeError(f"aggregation failed: {res.summary()}")
        if fastest is None or times[-1] <= min(times[:-1], default=float("inf")):
            fastest = res
    assert fastest is not None
    return times, loads, fastest


def per_function(res: AggregateResult, n_clients: int, itemsize: int, baseline_rss: int) -> list[dict[str, Any]]:
    args = {inv.id: inv.args for inv in res.plan.invocations}
    numel = res.manifest.spec.model_layout().numel
    rows = []
    for rep in res.reports:
        a = args[rep.invocation]
        start, stop = (a.start, a.stop) if isinstance(a, ShardReduceArgs) else (0, numel)  # flat: the whole model
        in_bytes = (stop - start) * itemsize * n_clients
        peak = rep.peak_rss_bytes or 0
        rows.append({"invocation": rep.invocation, "elements": stop - start, "input_bytes": in_bytes,
                     "duration_s": rep.duration_s, "gbps": in_bytes / rep.duration_s / GB,
                     "bytes_read": rep.bytes_read, "peak_rss_bytes": peak,
                     "peak_above_baseline_bytes": peak - baseline_rss})
    return rows


# --- 1. throughput ------------------------------------------------------------------------------------------------
def numpy_baseline(vectors: list[npt.NDArray[np.float32]], repeats: int, idle: Idle,
                   threads: int = 1) -> list[float]:
    """Best-case streaming reduction: in-place ``np.add`` over the vectors in memory (first pass is a warm-up)."""
    p = len(vectors[0])
    acc = np.zeros(p, dtype=vectors[0].dtype)
    bounds = [p * k // threads for k in range(threads + 1)]

    def part(k: int) -> None:
        a, b = bounds[k], bounds[k + 1]
        view = acc[a:b]
        for x in vectors:
            np.add(view, x[a:b], out=view)

    times = []
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats + 1):
            idle.wait()
            t = time.perf_counter()
            list(pool.map(part, range(threads)))
            times.append(time.perf_counter() - t)
    return times[1:]


def bench_throughput(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    n, p, itemsize = args.clients, args.params, 4
    in_bytes = n * p * itemsize
    store = LocalStore(root / "throughput", fsync=False)
    layout = synthetic(p)
    log.info("throughput: writing %d updates of %d float32 elements (%s in all)", n, p, fmt_bytes(in_bytes))
    t = time.perf_counter()
    clients, examples, vectors = write_round(store, R_THROUGHPUT, layout, n, args.seed, keep=True)
    log.info("  written in %.1f s; warming the page cache", time.perf_counter() - t)
    warm_files(update_paths(store, R_THROUGHPUT, clients))

    log.info("baseline: in-place np.add over the %d vectors in memory (warm-up + best of %d)", n, args.repeats)
    idle = Idle(args.wait_idle, args.idle_threshold)
    base_times = numpy_baseline(vectors, args.repeats, idle, threads=1)
    base2_times = numpy_baseline(vectors, args.repeats, idle, threads=2)
    base_gbps = in_bytes / best(base_times) / GB
    base2_gbps = in_bytes / best(base2_times) / GB

    window = args.window_bytes
    runs: list[dict[str, Any]] = []
    hashes: dict[str, str] = {}
    for w in args.workers:
        with LocalExecutor(workers=w) as ex:
            baseline_rss = noop_baseline(ex, store)
            for m in args.shards:
                cfg = AggregateConfig(topology="sharded", shards=m, window_bytes=window)
                log.info("gradshard: W=%d M=%d, best of %d", w, m, args.repeats)
                aggregate_round(store, R_THROUGHPUT, ex, cfg)  # warm-up
                times, loads, res = timed_rounds(store, R_THROUGHPUT, ex, cfg, args.repeats, idle)
                hashes[f"W{w}M{m}"] = file_sha256(store.root / aggregate_key(R_THROUGHPUT))
                fns = per_function(res, n, itemsize, baseline_rss)
                gbps = in_bytes / best(times) / GB
                runs.append({"workers": w, "shards": m, "times_s": times, "loads": loads, "best_s": best(times),
                             "busy_during_best": loads[times.index(best(times))]["busy_during"], "gbps": gbps,
                             "ratio": gbps / base_gbps, "ratio_vs_2thread_baseline": gbps / base2_gbps,
                             "meets_target": gbps / base_gbps >= TARGET_RATIO, "noop_rss_bytes": baseline_rss,
                             "per_function": fns})
    sharded_hash = hashes[f"W{args.workers[-1]}M{args.shards[-1]}"]
    all_same = len(set(hashes.values())) == 1

    # bit-exactness: against the reference computation on the in-memory vectors, then against the flat topology
    weights = fedavg_weights(examples)
    ours = read_flat(store, aggregate_key(R_THROUGHPUT), layout)
    ref = fedavg(vectors, weights, "float32")
    ref_equal = bool(np.array_equal(ours.view(np.uint32), ref.view(np.uint32)))
    del ours, ref, vectors
    gc.collect()
    verify = verify_flat(args, store, layout, n, sharded_hash)
    verify["sharded_equals_reference_fedavg"] = ref_equal
    verify["all_sharded_configs_identical"] = all_same
    return {"note": STORE_NOTE, "clients": n, "params": p, "input_bytes": in_bytes, "window_bytes": window,
            "cpus": os.cpu_count(), "target_ratio": TARGET_RATIO, "wait_idle_s": args.wait_idle,
            "baseline": {"what": "in-place np.add(acc, x, out=acc) over the N vectors in memory, 1 thread",
                         "times_s": base_times, "best_s": best(base_times), "gbps": base_gbps},
            "baseline_2threads": {"what": "same, the vector split between 2 threads (both cores)",
                                  "times_s": base2_times, "best_s": best(base2_times), "gbps": base2_gbps},
            "runs": runs, "verify": verify}


def verify_flat(args: argparse.Namespace, store: LocalStore, layout: ModelLayout, n: int,
                sharded_hash: str) -> dict[str, Any]:
    """Sharded output == flat output, byte for byte (whole objects, headers included)."""
    # flat_reduce holds the accumulator, the raw object, the parsed tensors and the flat copy: ~4 vectors
    flat_need = 4 * layout.nbytes
    r, p = R_THROUGHPUT, layout.numel
    if flat_need > args.flat_max_bytes:
        p = max(1, args.flat_max_bytes // (4 * 4))
        r = R_VERIFY
        layout = synthetic(p)
        log.info("verify: flat would need ~%s; checking on a smaller round of P=%d", fmt_bytes(flat_need), p)
        write_round(store, r, layout, n, args.seed, keep=False)
    with LocalExecutor(workers=1) as ex:
        if r != R_THROUGHPUT:
            aggregate_round(store, r, ex, AggregateConfig(shards=args.shards[-1], window_bytes=args.window_bytes))
            sharded_hash = file_sha256(store.root / aggregate_key(r))
        log.info("verify: flat topology on P=%d", p)
        t = time.perf_counter()
        res = aggregate_round(store, r, ex, AggregateConfig(topology="flat", window_bytes=args.window_bytes))
        flat_s = time.perf_counter() - t
        flat_hash = file_sha256(store.root / aggregate_key(r))
    return {"params": p, "sharded_sha256": sharded_hash, "flat_sha256": flat_hash,
            "identical": sharded_hash == flat_hash, "flat_s": flat_s,
            "flat_peak_rss_bytes": max(rep.peak_rss_bytes or 0 for rep in res.reports)}


def print_throughput(d: dict[str, Any]) -> None:
    print(f"\n== 1. Throughput vs the streaming bound: N={d['clients']} x P={d['params']:,} float32 "
          f"({d['input_bytes'] / GB:.2f} GB input), window {fmt_bytes(d['window_bytes'])}, {d['cpus']} CPUs")
    print(f"   {d['note']}; inputs warm in the page cache")
    b, b2 = d["baseline"], d["baseline_2threads"]
    print(f"   baseline np.add in place, 1 thread : {b['gbps']:6.2f} GB/s  (best {b['best_s'] * 1e3:.0f} ms)")
    print(f"   same, split over 2 threads         : {b2['gbps']:6.2f} GB/s  (best {b2['best_s'] * 1e3:.0f} ms)"
          "  [context only]")
    print(f"   {'W':>2} {'M':>2} {'best s':>7} {'GB/s':>6} {'ratio':>6} {'target':>11} {'vs 2thr':>7} {'busy':>5}"
          "   per-function GB/s min/median/max")
    for run in d["runs"]:
        g = sorted(f["gbps"] for f in run["per_function"])
        ok = "OK" if run["meets_target"] else "BELOW"
        print(f"   {run['workers']:>2} {run['shards']:>2} {run['best_s']:7.3f} {run['gbps']:6.2f} "
              f"{run['ratio']:6.2f} {'>=' + str(d['target_ratio']):>5} {ok:<5} {run['ratio_vs_2thread_baseline']:7.2f}"
              f" {100 * run['busy_during_best']:4.0f}%   {g[0]:.2f} / {g[len(g) // 2]:.2f} / {g[-1]:.2f}")
    waited = f"each timed run first waited up to {d['wait_idle_s']:.0f} s" if d["wait_idle_s"] > 0 else "no waiting"
    print(f"   busy = all {d['cpus']} CPUs' load during the best run (this benchmark's own share: W/{d['cpus']}); "
          f"the machine may be shared: {waited} for it to be idle")
    v = d["verify"]
    print(f"   sharded == flat topology, byte for byte (P={v['params']:,}): {'YES' if v['identical'] else 'NO'} "
          f"(sha256 {v['sharded_sha256'][:16]}...; flat took {v['flat_s']:.2f} s, "
          f"peak {fmt_bytes(v['flat_peak_rss_bytes'])})")
    print(f"   sharded == reference fedavg() on the in-memory vectors, bit for bit: "
          f"{'YES' if v['sharded_equals_reference_fedavg'] else 'NO'}; all (W, M) outputs identical: "
          f"{'YES' if v['all_sharded_configs_identical'] else 'NO'}")


# --- 2. Flower ----------------------------------------------------------------------------------------------------
def bench_flower(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    n = args.flower_clients
    layout = get_layout(args.flower_model).aggregated()
    store = LocalStore(root / "flower", fsync=False)
    log.info("flower: writing %d updates of %s (%s each)", n, args.flower_model, fmt_bytes(layout.nbytes))
    clients, examples, _ = write_round(store, R_FLOWER, layout, n, args.seed, keep=False)
    paths = update_paths(store, R_FLOWER, clients)
    warm_files(paths)

    log.info("flower: aggregate() in a fresh process")
    result_path = root / "flower_result.npy"
    idle = Idle(args.wait_idle, args.idle_threshold)
    flower_busy_before = idle.wait()
    fl = run_flower_process({"paths": [str(p) for p in paths], "examples": examples,
                             "names": [t.name for t in layout], "repeats": args.repeats,
                             "result_path": str(result_path)})
    fl_best = min(fl["times_s"])
    fl_peak_above = fl["rss_peak_bytes"] - fl["rss_interpreter_bytes"]

    log.info("flower: gradshard W=2 M=%d, best of %d", args.flower_shards, args.repeats)
    cfg = AggregateConfig(topology="sharded", shards=args.flower_shards, window_bytes=args.window_bytes)
    with LocalExecutor(workers=2) as ex:
        baseline_rss = noop_baseline(ex, store)
        times, loads, res = timed_rounds(store, R_FLOWER, ex, cfg, args.repeats, idle)
    fns = per_function(res, n, 4, baseline_rss)
    our_peak = max(f["peak_rss_bytes"] for f in fns)
    our_above = max(f["peak_above_baseline_bytes"] for f in fns)

    # numerics: both against each other and against a float64 reference
    ours = read_flat(store, aggregate_key(R_FLOWER), layout).astype(np.float64)
    theirs = np.load(result_path).astype(np.float64)
    ref = np.zeros(layout.numel, dtype=np.float64)
    for client, n_ex in zip(clients, examples, strict=True):
        ref += n_ex * read_flat(store, update_key(R_FLOWER, client), layout).astype(np.float64)
    ref /= sum(examples)
    diff = np.abs(ours - theirs)
    scale = float(np.abs(theirs).max())
    numerics = {"max_abs_diff": float(diff.max()), "max_rel_diff": float(diff.max()) / scale,
                "max_abs_value": scale, "elements_differing": int(np.count_nonzero(diff)),
                "elements": layout.numel, "gradshard_max_abs_err_vs_f64": float(np.abs(ours - ref).max()),
                "flower_max_abs_err_vs_f64": float(np.abs(theirs - ref).max())}
    result_path.unlink(missing_ok=True)
    return {"note": STORE_NOTE, "model": args.flower_model, "clients": n, "params": layout.numel,
            "update_bytes": layout.nbytes, "input_bytes": n * layout.nbytes, "target_speedup": TARGET_SPEEDUP,
            "flower": {**fl, "best_s": fl_best, "busy_before": flower_busy_before,
                       "peak_total_bytes": fl["rss_peak_bytes"],
                       "peak_above_interpreter_bytes": fl_peak_above,
                       "timed": "the aggregate() call only (updates already loaded as lists of ndarrays)"},
            "gradshard": {"workers": 2, "shards": args.flower_shards, "times_s": times, "loads": loads,
                          "best_s": best(times),
                          "timed": "end-to-end aggregate_round (validate, read from store, reduce, write, publish)",
                          "noop_rss_bytes": baseline_rss, "max_peak_rss_bytes": our_peak,
                          "max_peak_above_baseline_bytes": our_above,
                          "predicted_bytes": res.plan.peak_memory_bytes, "per_function": fns},
            "speedup": fl_best / best(times), "meets_speedup": fl_best / best(times) >= TARGET_SPEEDUP,
            "speedup_first_runs": fl["times_s"][0] / times[0],
            "speedup_with_load": (fl["load_s"] + fl_best) / best(times),
            "flower_peak_per_client_bytes": fl_peak_above / n,
            "memory_ratio": our_above / (fl_peak_above / n), "meets_memory": our_above <= fl_peak_above / n,
            "numerics": numerics}


def print_flower(d: dict[str, Any]) -> None:
    fl, gs, nm = d["flower"], d["gradshard"], d["numerics"]
    print(f"\n== 2. Against Flower {fl['flwr_version']} aggregate(): N={d['clients']} x {d['model']} "
          f"({d['params']:,} float32, {d['update_bytes'] / 1e6:.1f} MB each, {d['input_bytes'] / 1e6:.0f} MB in all)")
    print(f"   Flower aggregate() call (fresh process, updates preloaded): best {fl['best_s']:.3f} s "
          f"(runs {', '.join(f'{t:.3f}' for t in fl['times_s'])}); loading took {fl['load_s']:.2f} s")
    print(f"     memory as VmHWM (ru_maxrss is inherited across exec from this big parent: "
          f"{fmt_bytes(fl['ru_maxrss_peak_bytes'])}, unusable)")
    print(f"     peak total {fmt_bytes(fl['peak_total_bytes'])}, interpreter (numpy+safetensors+flwr) "
          f"{fmt_bytes(fl['rss_interpreter_bytes'])}, peak above interpreter "
          f"{fmt_bytes(fl['peak_above_interpreter_bytes'])} (the loaded updates alone "
          f"{fmt_bytes(fl['rss_after_load_bytes'] - fl['rss_interpreter_bytes'])})")
    print(f"   gradshard aggregate_round end to end, LocalExecutor(workers=2), M={gs['shards']}: best "
          f"{gs['best_s']:.3f} s (runs {', '.join(f'{t:.3f}' for t in gs['times_s'])})")
    print(f"     per-function peak RSS {fmt_bytes(gs['max_peak_rss_bytes'])}, noop baseline "
          f"{fmt_bytes(gs['noop_rss_bytes'])}, peak above baseline {fmt_bytes(gs['max_peak_above_baseline_bytes'])} "
          f"(plan predicts {fmt_bytes(gs['predicted_bytes'])})")
    print(f"   speedup {d['speedup']:.2f}x best vs best (target >= {d['target_speedup']:.0f}x: "
          f"{'OK' if d['meets_speedup'] else 'BELOW'}); first run vs first run {d['speedup_first_runs']:.2f}x")
    print(f"   speedup counting Flower's decoding of the same updates from the same store (load + best aggregate, "
          f"as a server must): {d['speedup_with_load']:.2f}x")
    print(f"   memory: gradshard per function {fmt_bytes(gs['max_peak_above_baseline_bytes'])} vs Flower peak / N = "
          f"{fmt_bytes(d['flower_peak_per_client_bytes'])} -> ratio {d['memory_ratio']:.3f} (target <= 1: "
          f"{'OK' if d['meets_memory'] else 'ABOVE'})")
    print(f"   numerics: max |gradshard - Flower| = {nm['max_abs_diff']:.3g} (relative to max |x| "
          f"{nm['max_rel_diff']:.3g}); {nm['elements_differing']:,} of {nm['elements']:,} elements differ; "
          f"max error vs float64: gradshard {nm['gradshard_max_abs_err_vs_f64']:.3g}, Flower "
          f"{nm['flower_max_abs_err_vs_f64']:.3g}")


# --- 3. large -----------------------------------------------------------------------------------------------------
def bench_large(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    p, n, cap, m = int(args.large_params), args.large_clients, args.large_cap, args.large_shards
    layout = synthetic(p)
    per_client = layout.nbytes
    margin = 2 * GIB
    free = free_disk_bytes(root)
    need = (n + 1) * per_client + margin  # inputs + the aggregate
    if need > free:
        fit = (free - margin - per_client) // per_client
        if fit < 2:
            raise SystemExit(f"not enough disk in {root}: {fmt_bytes(free)} free, {n} clients of "
                             f"{fmt_bytes(per_client)} + the aggregate need {fmt_bytes(need)} (and even 2 clients "
                             "do not fit); free space or pass --tmp-dir / --large-params")
        log.warning("only %s free in %s: lowering N from %d to %d", fmt_bytes(free), root, n, fit)
        n = int(fit)
    store = LocalStore(root / "large", fsync=False)
    spec = open_scratch_round(store, R_LARGE, layout)
    digest = layout.digest()
    clients, examples = client_ids(n), [examples_of(i) for i in range(n)]
    step = args.gen_chunk

    log.info("large: writing %d updates of %s (P=%d) in chunks of %d elements", n, fmt_bytes(per_client), p, step)
    t0 = time.perf_counter()
    chunk = np.empty(min(step, p), dtype=np.float32)
    for i, client in enumerate(clients):
        rng = client_rng(args.seed, R_LARGE, i)
        meta = UpdateMeta(client=client, round=R_LARGE, examples=examples[i], layout_digest=digest,
                          chunk_elems=spec.chunk_elems)
        with UpdateWriter(store, update_key(R_LARGE, client), layout, meta) as writer:
            for lo in range(0, p, step):
                writer.write(fill_random(rng, chunk[: min(step, p - lo)]))
            writer.commit()
        log.info("  %s written (%.0f s)", client, time.perf_counter() - t0)
    gen_s = time.perf_counter() - t0
    paths = update_paths(store, R_LARGE, clients)
    cold = not args.warm_cache
    if cold:
        log.info("large: flushing the inputs and evicting them from the page cache (posix_fadvise DONTNEED)")
        drop_from_page_cache(paths)

    log.info("large: aggregating with LocalExecutor(workers=2, memory_cap=%s), M=%d", fmt_bytes(cap), m)
    cfg = AggregateConfig(topology="sharded", shards=m, window_bytes=args.window_bytes)
    with LocalExecutor(workers=2, memory_cap_bytes=cap) as ex:
        baseline_rss = noop_baseline(ex, store)
        t = time.perf_counter()
        res = aggregate_round(store, R_LARGE, ex, cfg)
        wall = time.perf_counter() - t
    ok = all(rep.ok for rep in res.reports) and not res.manifest.rejected
    fns = per_function(res, n, 4, baseline_rss)
    summary = res.summary()
    max_peak = int(summary["max_peak_rss_bytes"] or 0)

    log.info("large: verifying window by window against the regenerated inputs")
    t = time.perf_counter()
    verify = verify_large(store, layout, clients, examples, args.seed, step) if ok else {"skipped": "run failed"}
    verify_s = time.perf_counter() - t
    return {"note": STORE_NOTE, "clients": n, "requested_clients": args.large_clients, "params": p,
            "update_bytes": per_client, "input_bytes": n * per_client, "shards": m, "workers": 2,
            "memory_cap_bytes": cap, "window_bytes": args.window_bytes, "inputs_cold": cold,
            "generate_s": gen_s, "wall_s": wall, "ok": ok, "gbps": n * per_client / wall / GB,
            "max_peak_rss_bytes": max_peak, "noop_rss_bytes": baseline_rss,
            "max_peak_above_baseline_bytes": max_peak - baseline_rss, "under_cap": max_peak < cap,
            "bytes_read": summary["bytes_read"], "bytes_written": summary["bytes_written"],
            "gets": summary["gets"], "puts": summary["puts"], "per_function": fns,
            "errors": [f"{r.invocation}: {r.error_type}: {r.error}" for r in res.reports if not r.ok],
            "verify": verify, "verify_s": verify_s, "bench_process_peak_rss_bytes": maxrss_bytes()}


def verify_large(store: LocalStore, layout: ModelLayout, clients: list[str], examples: list[int], seed: int,
                 step: int) -> dict[str, Any]:
    """Recompute the weighted mean window by window from the seeded generators and compare with the output."""
    p = layout.numel
    weights = [np.float32(w) for w in fedavg_weights(examples)]
    rngs = [client_rng(seed, R_LARGE, i) for i in range(len(clients))]
    size = min(step, p)
    acc, got, xbuf = (np.empty(size, dtype=np.float32) for _ in range(3))
    max_abs, mismatched = 0.0, 0
    with open_update(store, aggregate_key(R_LARGE), "aggregate", layout) as out:
        chunks = checksum.ChunkStream(out.grid, 0, out.meta.digest)
        bad_chunks = 0
        for lo in range(0, p, step):
            k = min(step, p - lo)
            a, g = acc[:k], got[:k]
            for i, (rng, w) in enumerate(zip(rngs, weights, strict=True)):
                x = fill_random(rng, xbuf[:k])
                if i == 0:
                    np.multiply(x, w, out=a)
                else:
                    np.multiply(x, w, out=x)
                    np.add(a, x, out=a)
            out.read(lo, lo + k, g)
            bad_chunks += sum(1 for idx, h in chunks.feed(g) if h != out.checksum_of(idx))
            mismatched += int(np.count_nonzero(a.view(np.uint32) != g.view(np.uint32)))
            np.subtract(a, g, out=xbuf[:k])
            max_abs = max(max_abs, float(np.max(np.abs(xbuf[:k], out=xbuf[:k]))))
    return {"bit_identical": mismatched == 0, "elements_mismatched": mismatched, "max_abs_diff": max_abs,
            "output_checksum_mismatches": bad_chunks, "window_elems": step}


def print_large(d: dict[str, Any]) -> None:
    v = d["verify"]
    print(f"\n== 3. Large: N={d['clients']} x P={d['params']:,} float32 ({fmt_bytes(d['update_bytes'])} = "
          f"{d['update_bytes'] / GB:.1f} GB per client, {d['input_bytes'] / GB:.1f} GB in all), M={d['shards']}, "
          f"LocalExecutor(workers=2, memory_cap={fmt_bytes(d['memory_cap_bytes'])})")
    print(f"   {d['note']}; inputs {'evicted from the page cache (cold)' if d['inputs_cold'] else 'as written (warm)'}")
    print(f"   generated in {d['generate_s']:.1f} s (streaming UpdateWriter); aggregation "
          f"{'OK' if d['ok'] else 'FAILED ' + '; '.join(d['errors'])}")
    print(f"   wall {d['wall_s']:.1f} s = {d['gbps']:.2f} GB/s of input; bytes read {d['bytes_read']:,} "
          f"({d['bytes_read'] / GB:.2f} GB), written {d['bytes_written'] / GB:.2f} GB")
    print(f"   max per-function peak RSS {fmt_bytes(d['max_peak_rss_bytes'])} (noop baseline "
          f"{fmt_bytes(d['noop_rss_bytes'])}, above it {fmt_bytes(d['max_peak_above_baseline_bytes'])}): "
          f"{'< cap OK' if d['under_cap'] else 'NOT under the cap'}")
    if "bit_identical" in v:
        print(f"   verification (streamed, {v['window_elems']:,}-element windows, {d['verify_s']:.1f} s): "
              f"{'bit-identical' if v['bit_identical'] else 'MISMATCH'} to the recomputed weighted mean "
              f"({v['elements_mismatched']} elements differ, max |diff| {v['max_abs_diff']:.3g}); output chunk "
              f"checksum mismatches: {v['output_checksum_mismatches']}")
    print(f"   benchmark process peak RSS {fmt_bytes(d['bench_process_peak_rss_bytes'])}")


# --- main ---------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--clients", type=int, default=16, help="N for the throughput section")
    ap.add_argument("--params", type=parse_size, default=32 * MIB, help="P (float32 elements) per update")
    ap.add_argument("--workers", type=parse_ints, default=[1, 2], help="LocalExecutor workers W, comma-separated")
    ap.add_argument("--shards", type=parse_ints, default=[2, 4], help="shard counts M, comma-separated")
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions (best is reported)")
    ap.add_argument("--window-bytes", type=parse_size, default=DEFAULT_WINDOW_BYTES)
    ap.add_argument("--flat-max-bytes", type=parse_size, default=4 * GIB,
                    help="verify sharded == flat on a smaller P if flat would need more than this")
    ap.add_argument("--flower-clients", type=int, default=16)
    ap.add_argument("--flower-model", default="resnet18", help="a gradshard.core.zoo layout name")
    ap.add_argument("--flower-shards", type=int, default=4)
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-flower", action="store_true")
    ap.add_argument("--large", action="store_true", help="run only the large (10 GB per client) section")
    ap.add_argument("--large-params", type=parse_size, default=int(2.5e9))
    ap.add_argument("--large-clients", type=int, default=3)
    ap.add_argument("--large-shards", type=int, default=8)
    ap.add_argument("--large-cap", type=parse_size, default=GIB, help="per-function memory cap")
    ap.add_argument("--gen-chunk", type=parse_size, default=64 * MIB, help="elements per generated/verified chunk")
    ap.add_argument("--warm-cache", action="store_true", help="large: do not evict the inputs from the page cache")
    ap.add_argument("--wait-idle", type=float, default=15.0,
                    help="before each timed run wait up to this many seconds for other processes to leave the CPUs "
                         "idle (the machine may be shared); 0 disables")
    ap.add_argument("--idle-threshold", type=float, default=0.1, help="'idle' = at most this fraction of all CPUs busy")
    ap.add_argument("--tmp-dir", default=tempfile.gettempdir(), help="where the scratch store goes")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(args.verbose)
    root = Path(tempfile.mkdtemp(prefix="gradshard-bench-", dir=args.tmp_dir))
    log.info("scratch store under %s (LocalStore fsync=False)", root)
    try:
        if args.large:
            large = bench_large(args, root)
            write_section(args.out, "large", large)
            print_large(large)
        else:
            if not args.skip_throughput:
                thr = bench_throughput(args, root)
                write_section(args.out, "throughput", thr)
                print_throughput(thr)
            if not args.skip_flower:
                fl = bench_flower(args, root)
                write_section(args.out, "flower", fl)
                print_flower(fl)
        print(f"\nresults written to {args.out}")
    finally:
        if args.keep:
            print(f"generated files kept in {root}")
        else:
            import shutil

            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
