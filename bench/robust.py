"""Robust-reducer benchmark: gradshard's coordinate-wise ``median`` and ``trimmed-mean:β`` against Flower's.

The same N synthetic updates of a zoo layout (``gradshard.demo.synthetic.make_round``; ResNet-18 and N = 16 by
default) sit in a scratch ``LocalStore`` (``fsync=False``), page cache warmed. For each reducer:

- **gradshard**: end-to-end ``aggregate_round`` on ``LocalExecutor(workers=W)``, topology ``sharded`` with M shards
  (wall time, best and median of the repeats; peak RSS per function from the reports and above the no-op
  baseline), and once with topology ``flat`` (one function over the whole model) for reference;
- **Flower**: ``aggregate_median(results)`` / ``aggregate_trimmed_avg(results, β)`` in a fresh process on the same
  files loaded as per-tensor ndarrays (time of the call: first and best of all calls; loading time; peak ``VmHWM``).

Runs are interleaved: each repeat runs gradshard, then a fresh Flower process, for one reducer after the other, so
the ratios pair measurements taken under the same machine load. Agreement: gradshard's median must equal
``np.median`` of the stacked vectors byte for byte, its trimmed mean ``np.mean`` of the sorted middle rows; both are
compared with Flower's results (max abs difference) and with a float64 reference.

Figures go to stdout and to ``bench/out/robust.json``. ``--quick``: the small ``mlp`` layout (a smoke test).
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from _common import (
    BENCH_DIR,
    GB,
    file_sha256,
    fmt_bytes,
    parse_size,
    run_flower_process,
    setup_logging,
    warm_files,
    write_section,
)
from aggregate import Idle, noop_baseline, timed_rounds

from gradshard import (
    AggregateConfig,
    AggregateResult,
    LocalExecutor,
    LocalStore,
    aggregate_key,
    get_layout,
    read_flat,
    update_key,
)
from gradshard.core.layout import ModelLayout
from gradshard.core.reducers import ReducerSpec, parse_reducer, trim_count
from gradshard.demo.synthetic import make_round
from gradshard.topology.common import DEFAULT_WINDOW_BYTES, window_elems

log = logging.getLogger("bench")

DEFAULT_OUT = BENCH_DIR / "out" / "robust.json"
ROUND = 0
STORE_NOTE = "scratch store: LocalStore(dir, fsync=False) - objects are atomically visible but not fsynced"


# --- running one side -------------------------------------------------------------------------------------------
def flower_request(spec: ReducerSpec, paths: list[Path], examples: list[int], names: list[str], calls: int,
                   result_path: Path) -> dict[str, Any]:
    request: dict[str, Any] = {"paths": [str(p) for p in paths], "examples": examples, "names": names,
                               "repeats": calls, "result_path": str(result_path), "aggregator": spec.name}
    if spec.name == "trimmed-mean":
        request["proportiontocut"] = spec.beta
    return request


def per_function(res: AggregateResult, baseline_rss: int) -> list[dict[str, Any]]:
    """Each invocation's element range, duration and peak RSS (also above the no-op baseline).

    (``bench/aggregate.py`` has its own ``per_function``, which still reads ``Invocation.args`` as a dict.)
    """
    numel = res.manifest.spec.model_layout().numel
    ranges = {inv.id: (getattr(inv.args, "start", 0), getattr(inv.args, "stop", numel))
              for inv in res.plan.invocations}
    rows = []
    for rep in res.reports:
        start, stop = ranges[rep.invocation]
        peak = rep.peak_rss_bytes or 0
        rows.append({"invocation": rep.invocation, "elements": stop - start, "duration_s": rep.duration_s,
                     "bytes_read": rep.bytes_read, "peak_rss_bytes": peak,
                     "peak_above_baseline_bytes": peak - baseline_rss})
    return rows


def run_gradshard(store: LocalStore, ex: LocalExecutor, cfg: AggregateConfig, idle: Idle,
                  baseline_rss: int) -> dict[str, Any]:
    """One timed ``aggregate_round``; its wall time, load, per-function figures and the output's sha256."""
    times, loads, res = timed_rounds(store, ROUND, ex, cfg, 1, idle)
    fns = per_function(res, baseline_rss)
    return {"time_s": times[0], **loads[0], "max_peak_rss_bytes": max(f["peak_rss_bytes"] for f in fns),
            "max_peak_above_baseline_bytes": max(f["peak_above_baseline_bytes"] for f in fns),
            "predicted_bytes": res.plan.peak_memory_bytes, "invocations": len(res.reports),
            "sha256": file_sha256(store.root / aggregate_key(ROUND)), "per_function": fns}


def summarise_gradshard(runs: list[dict[str, Any]]) -> dict[str, Any]:
    times = [r["time_s"] for r in runs]
    return {"times_s": times, "best_s": min(times), "median_s": statistics.median(times),
            "max_peak_rss_bytes": max(r["max_peak_rss_bytes"] for r in runs),
            "max_peak_above_baseline_bytes": max(r["max_peak_above_baseline_bytes"] for r in runs),
            "predicted_bytes": runs[0]["predicted_bytes"], "invocations": runs[0]["invocations"],
            "outputs_identical": len({r["sha256"] for r in runs}) == 1, "sha256": runs[0]["sha256"],
            "busy_during": [r["busy_during"] for r in runs], "per_function_last": runs[-1]["per_function"]}


def best_call(process: dict[str, Any]) -> float:
    """The process's best call, the first included: every call stacks its tensors into fresh arrays (page faults
    and all), so a later call is not systematically faster (measured: sometimes slower)."""
    return float(min(process["times_s"]))


def summarise_flower(processes: list[dict[str, Any]]) -> dict[str, Any]:
    first = [p["times_s"][0] for p in processes]
    best = [best_call(p) for p in processes]
    loads = [p["load_s"] for p in processes]
    peak = max(p["rss_peak_bytes"] for p in processes)
    interp = min(p["rss_interpreter_bytes"] for p in processes)
    return {"flwr_version": processes[0]["flwr_version"], "first_call_s": first, "best_call_per_process_s": best,
            "call_best_s": min(best), "call_median_s": statistics.median(best), "load_s": loads,
            "load_median_s": statistics.median(loads),
            "with_load_best_s": min(p["load_s"] + best_call(p) for p in processes),
            "with_load_first_median_s": statistics.median(p["load_s"] + p["times_s"][0] for p in processes),
            "rss_interpreter_bytes": interp, "peak_total_bytes": peak, "peak_above_interpreter_bytes": peak - interp,
            "rss_after_load_bytes": max(p["rss_after_load_bytes"] for p in processes),
            "hwm_reset": all(p["hwm_reset"] for p in processes),
            "timed": "the aggregator call only (updates already loaded as per-tensor ndarrays); with_load adds "
                     "safetensors.numpy.load_file of the N files", "processes": processes}


# --- agreement --------------------------------------------------------------------------------------------------
def load_stack(store: LocalStore, layout: ModelLayout, clients: list[str]) -> npt.NDArray[np.float32]:
    stack = np.empty((len(clients), layout.numel), dtype=np.float32)
    for i, client in enumerate(clients):
        stack[i] = read_flat(store, update_key(ROUND, client), layout, client)
    return stack


def compare(ours: npt.NDArray[np.float32], other: npt.NDArray[Any]) -> dict[str, Any]:
    """Byte equality, max |difference| and how many elements differ (and by how many float32 ulps at most)."""
    same_dtype = other.dtype == ours.dtype and other.shape == ours.shape
    identical = bool(same_dtype and np.array_equal(ours.view(np.uint32), other.view(np.uint32)))
    diff = np.abs(ours.astype(np.float64) - other.astype(np.float64))
    scale = float(np.abs(ours).max())
    return {"byte_identical": identical, "other_dtype": str(other.dtype), "max_abs_diff": float(diff.max()),
            "max_diff_relative_to_max_abs": float(diff.max()) / scale if scale else 0.0,
            "elements_differing": int(np.count_nonzero(diff)), "elements": int(ours.size),
            "allclose_rtol1e-6_atol1e-9": bool(np.allclose(ours, other, rtol=1e-6, atol=1e-9))}


def error_vs(x: npt.NDArray[Any], ref64: npt.NDArray[np.float64]) -> tuple[float, float]:
    """(max, mean) absolute error against a float64 reference."""
    err = np.abs(x.astype(np.float64) - ref64)
    return float(err.max()), float(err.mean())


def check_agreement(stack: npt.NDArray[np.float32], specs: list[ReducerSpec], ours: dict[str, npt.NDArray[Any]],
                    flower: dict[str, npt.NDArray[Any]]) -> dict[str, dict[str, Any]]:
    """numpy references from the stacked vectors (``stack`` is sorted in place along axis 0 on the way)."""
    n = stack.shape[0]
    out: dict[str, dict[str, Any]] = {}
    for spec in specs:  # the median first: it needs the stack unsorted only to be a literal np.median call
        if spec.name != "median":
            continue
        ref = np.median(stack, axis=0)
        out[spec.text] = {"reference": "np.median(stack, axis=0)",
                          "gradshard_vs_reference": compare(ours[spec.text], ref),
                          "flower_vs_reference": compare(flower[spec.text], ref)}
        del ref
    stack.sort(axis=0)
    for spec in specs:
        if spec.name == "median":
            h = n // 2
            ref64 = stack[h].astype(np.float64) if n % 2 else (stack[h - 1].astype(np.float64) + stack[h]) / 2
        else:
            k = trim_count(spec.beta, n)
            flower_k = int(spec.beta * n)  # Flower's _trim_mean: lowercut = int(proportiontocut * nobs)
            ref = np.mean(stack[k : n - k], axis=0)
            ref64 = np.sum(stack[k : n - k], axis=0, dtype=np.float64) / (n - 2 * k)
            out[spec.text] = {"reference": f"np.mean(np.sort(stack, axis=0)[{k}:{n - k}], axis=0)",
                              "trim_k": k, "flower_trim_k": flower_k, "trim_rule_matches": flower_k == k,
                              "gradshard_vs_reference": compare(ours[spec.text], ref)}
            del ref
        entry = out[spec.text]
        entry["gradshard_vs_flower"] = compare(ours[spec.text], flower[spec.text])
        entry["gradshard_max_abs_err_vs_f64"], entry["gradshard_mean_abs_err_vs_f64"] = error_vs(ours[spec.text], ref64)
        entry["flower_max_abs_err_vs_f64"], entry["flower_mean_abs_err_vs_f64"] = error_vs(flower[spec.text], ref64)
        entry["max_abs_value"] = float(np.abs(ref64).max())
    return out


# --- the benchmark ----------------------------------------------------------------------------------------------
def bench_robust(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    n, w, m = args.clients, args.workers, args.shards
    specs = [parse_reducer("median"), parse_reducer(f"trimmed-mean:{args.beta}")]
    trim_count(args.beta, n)  # fail early on a beta that leaves nothing
    store = LocalStore(root / "store", fsync=False)
    log.info("writing %d synthetic updates of %s", n, args.layout)
    t = time.perf_counter()
    spec, client_list = make_round(store, ROUND, get_layout(args.layout), n, seed=args.seed)
    clients = list(client_list)
    layout = spec.model_layout()
    gen_s = time.perf_counter() - t
    paths = [store.root / update_key(ROUND, c) for c in clients]
    warm_files(paths)
    examples = [1] * n  # Flower's robust aggregators ignore the example counts; so do ours
    names = [t.name for t in layout]
    idle = Idle(args.wait_idle, args.idle_threshold)
    cfgs = {s.text: AggregateConfig(topology="sharded", shards=m, window_bytes=args.window_bytes, reducer=s.text)
            for s in specs}
    gs_runs: dict[str, list[dict[str, Any]]] = {s.text: [] for s in specs}
    fl_runs: dict[str, list[dict[str, Any]]] = {s.text: [] for s in specs}
    ours: dict[str, npt.NDArray[Any]] = {}
    warm_up_sha: dict[str, str] = {}
    flat: dict[str, dict[str, Any]] = {}
    result_paths = {s.text: root / f"flower-{s.name}.npy" for s in specs}

    with LocalExecutor(workers=w) as ex:
        baseline_rss = noop_baseline(ex, store)
        for s in specs:  # warm-up (untimed); its output is the one checked below
            warm = run_gradshard(store, ex, cfgs[s.text], Idle(0, 1), baseline_rss)
            ours[s.text] = read_flat(store, aggregate_key(ROUND), layout)
            warm_up_sha[s.text] = warm["sha256"]
            log.info("warm-up %s: %.3f s", s.text, warm["time_s"])
        for rep in range(args.repeats):
            for s in specs:
                run = run_gradshard(store, ex, cfgs[s.text], idle, baseline_rss)
                gs_runs[s.text].append(run)
                before = idle.wait()
                proc = run_flower_process(flower_request(s, paths, examples, names, args.flower_calls,
                                                         result_paths[s.text]))
                proc["busy_before"] = before
                fl_runs[s.text].append(proc)
                log.info("repeat %d %s: gradshard %.3f s, Flower call %s s, load %.2f s", rep + 1, s.text,
                         run["time_s"], ", ".join(f"{x:.3f}" for x in proc["times_s"]), proc["load_s"])
        for s in specs:
            cfg = AggregateConfig(topology="flat", window_bytes=args.window_bytes, reducer=s.text)
            flat_run = run_gradshard(store, ex, cfg, idle, baseline_rss)
            flat_run.pop("per_function")
            flat_run["equals_sharded"] = flat_run["sha256"] == gs_runs[s.text][0]["sha256"]
            flat[s.text] = flat_run
            log.info("flat %s: %.3f s, peak %s", s.text, flat_run["time_s"], fmt_bytes(flat_run["max_peak_rss_bytes"]))

    log.info("agreement: numpy references from the %d stacked vectors", n)
    flower = {s.text: np.load(result_paths[s.text]) for s in specs}
    stack = load_stack(store, layout, clients)
    agreement = check_agreement(stack, specs, ours, flower)
    del stack

    reducers: dict[str, Any] = {}
    for s in specs:
        gs, fl = summarise_gradshard(gs_runs[s.text]), summarise_flower(fl_runs[s.text])
        paired = [best_call(p) / g["time_s"] for p, g in zip(fl_runs[s.text], gs_runs[s.text], strict=True)]
        gs["warm_up_output_identical"] = gs["sha256"] == warm_up_sha[s.text]
        reducers[s.text] = {
            "gradshard": gs, "flat": flat[s.text], "flower": fl, "agreement": agreement[s.text],
            "speedup_best": fl["call_best_s"] / gs["best_s"],
            "speedup_paired": paired, "speedup_paired_median": statistics.median(paired),
            "speedup_first_call_median": statistics.median(fl["first_call_s"]) / gs["median_s"],
            "speedup_with_load": fl["with_load_best_s"] / gs["best_s"],
            "memory_ratio_above_baseline": gs["max_peak_above_baseline_bytes"] / fl["peak_above_interpreter_bytes"],
            "memory_ratio_total": gs["max_peak_rss_bytes"] / fl["peak_total_bytes"],
            "flower_peak_per_client_bytes": fl["peak_above_interpreter_bytes"] / n,
            "memory_ratio_vs_flower_per_client": gs["max_peak_above_baseline_bytes"]
            / (fl["peak_above_interpreter_bytes"] / n),
        }
    window = min(window_elems(args.window_bytes, 4), math.ceil(layout.numel / m))
    largest = max(t.numel for t in layout)
    return {"note": STORE_NOTE, "model": args.layout, "clients": n, "params": layout.numel,
            "tensors": len(layout), "update_bytes": layout.nbytes, "input_bytes": n * layout.nbytes,
            "workers": w, "shards": m, "window_bytes": args.window_bytes, "window_elems": window,
            "window_formula_bytes": (n + 2) * window * 4, "largest_tensor_elems": largest,
            "flower_formula_bytes": (n * layout.numel + 2 * n * largest + layout.numel) * 4,
            "beta": args.beta, "repeats": args.repeats,
            "flower_calls_per_process": args.flower_calls, "wait_idle_s": args.wait_idle, "generate_s": gen_s,
            "noop_rss_bytes": baseline_rss, "reducers": reducers}


# --- output -----------------------------------------------------------------------------------------------------
def mib(n: float) -> str:
    return f"{n / (1 << 20):.1f}"


def print_robust(d: dict[str, Any]) -> None:
    first = next(iter(d["reducers"].values()))
    print(f"\n== Robust reducers against Flower {first['flower']['flwr_version']}: N={d['clients']} x {d['model']} "
          f"({d['params']:,} float32 in {d['tensors']} tensors, {d['update_bytes'] / 1e6:.1f} MB each, "
          f"{d['input_bytes'] / 1e6:.0f} MB in all)")
    print(f"   {d['note']}; inputs warm in the page cache; gradshard end to end, LocalExecutor(workers="
          f"{d['workers']}), sharded M={d['shards']}, window {fmt_bytes(d['window_bytes'])}; Flower in a fresh "
          f"process per repeat ({d['flower_calls_per_process']} calls each); {d['repeats']} interleaved repeats")
    print("\n   time (s)               gradshard sharded    flat   Flower call         Flower    "
          "speedup (Flower / gradshard)")
    print("   reducer                 best   median           first       best  load+call   best  paired  +load  first")
    for name, r in d["reducers"].items():
        gs, fl = r["gradshard"], r["flower"]
        print(f"   {name:<20} {gs['best_s']:7.3f} {gs['median_s']:8.3f} {r['flat']['time_s']:7.3f} "
              f"{statistics.median(fl['first_call_s']):7.3f} {fl['call_best_s']:10.3f} {fl['with_load_best_s']:10.3f} "
              f"{r['speedup_best']:6.2f}x {r['speedup_paired_median']:5.2f}x {r['speedup_with_load']:5.2f}x "
              f"{r['speedup_first_call_median']:5.2f}x")
    print(f"\n   memory (MiB)           gradshard per function     plan     flat   Flower peak           ratio "
          f"(no-op baseline {mib(d['noop_rss_bytes'])} MiB)")
    print("   reducer                  peak  above base  predicts    peak   total  above interp   above  total  "
          "vs Flower/N")
    for name, r in d["reducers"].items():
        gs, fl = r["gradshard"], r["flower"]
        print(f"   {name:<20} {mib(gs['max_peak_rss_bytes']):>8} {mib(gs['max_peak_above_baseline_bytes']):>11} "
              f"{mib(gs['predicted_bytes']):>9} {mib(r['flat']['max_peak_rss_bytes']):>7} "
              f"{mib(fl['peak_total_bytes']):>7} {mib(fl['peak_above_interpreter_bytes']):>13} "
              f"{r['memory_ratio_above_baseline']:7.4f} {r['memory_ratio_total']:6.4f} "
              f"{r['memory_ratio_vs_flower_per_client']:8.3f}")
    print(f"   gradshard's buffers (N + 2) x window x 4 B = {mib(d['window_formula_bytes'])} MiB (window "
          f"{d['window_elems']:,} elements); Flower holds the N updates, stacks one tensor's N copies (np.asarray) "
          f"and numpy copies that stack to partition it: (N*P + 2*N*largest + P) x 4 B = "
          f"{mib(d['flower_formula_bytes'])} MiB (largest tensor {d['largest_tensor_elems']:,} elements)")
    print("\n   agreement")
    for name, r in d["reducers"].items():
        a = r["agreement"]
        g, f = a["gradshard_vs_reference"], a["gradshard_vs_flower"]
        print(f"   {name:<20} gradshard == {a['reference']}: {'BYTE-IDENTICAL' if g['byte_identical'] else 'DIFFERS'}"
              f" ({g['elements_differing']:,} elements differ, max |diff| {g['max_abs_diff']:.3g})")
        if "flower_vs_reference" in a:
            fr = a["flower_vs_reference"]
            print(f"   {'':<20} Flower == the same reference: {'byte-identical' if fr['byte_identical'] else 'differs'}"
                  f" ({fr['elements_differing']:,} elements differ)")
        if "trim_k" in a:
            print(f"   {'':<20} trim count: gradshard floor(beta*N) = {a['trim_k']}, Flower int(beta*N) = "
                  f"{a['flower_trim_k']} ({'same rule' if a['trim_rule_matches'] else 'DIFFERENT'})")
        print(f"   {'':<20} vs Flower: max |diff| {f['max_abs_diff']:.3g} ({f['max_diff_relative_to_max_abs']:.2g} of "
              f"max |value|), "
              f"{f['elements_differing']:,} of {f['elements']:,} elements differ, allclose(rtol 1e-6, atol 1e-9) "
              f"{f['allclose_rtol1e-6_atol1e-9']}; max error vs float64: gradshard "
              f"{a['gradshard_max_abs_err_vs_f64']:.3g}, Flower {a['flower_max_abs_err_vs_f64']:.3g} "
              f"(mean {a['gradshard_mean_abs_err_vs_f64']:.3g} / {a['flower_mean_abs_err_vs_f64']:.3g}; max |value| "
              f"{a['max_abs_value']:.3g})")
        print(f"   {'':<20} sharded outputs identical over runs: {r['gradshard']['outputs_identical']}; flat == "
              f"sharded byte for byte: {r['flat']['equals_sharded']}")
    busy = [b for r in d["reducers"].values() for b in r["gradshard"]["busy_during"]]
    print(f"\n   machine load (all CPUs, this benchmark's own {d['workers']} workers included) during the gradshard "
          f"runs: {', '.join(f'{100 * b:.0f}%' for b in busy)}; "
          f"input {d['input_bytes'] / GB:.2f} GB")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--layout", default="resnet18", help="a gradshard.core.zoo layout name")
    ap.add_argument("--clients", type=int, default=16, help="N")
    ap.add_argument("--shards", type=int, default=4, help="M (sharded topology)")
    ap.add_argument("--workers", type=int, default=2, help="LocalExecutor workers")
    ap.add_argument("--beta", type=float, default=0.1, help="trimmed-mean: fraction cut at each end")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats (gradshard run + Flower process)")
    ap.add_argument("--flower-calls", type=int, default=2, help="aggregator calls per Flower process (best counts)")
    ap.add_argument("--window-bytes", type=parse_size, default=DEFAULT_WINDOW_BYTES)
    ap.add_argument("--quick", action="store_true", help="smoke test: layout mlp, 2 repeats")
    ap.add_argument("--wait-idle", type=float, default=2.0,
                    help="before each timed run wait up to this many seconds for the CPUs to be idle; 0 disables")
    ap.add_argument("--idle-threshold", type=float, default=0.1, help="'idle' = at most this fraction of all CPUs busy")
    ap.add_argument("--tmp-dir", default=tempfile.gettempdir(), help="where the scratch store goes")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.layout, args.repeats = "mlp", min(args.repeats, 2)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(args.verbose)
    root = Path(tempfile.mkdtemp(prefix="gradshard-robust-", dir=args.tmp_dir))
    log.info("scratch store under %s (LocalStore fsync=False)", root)
    try:
        started = time.perf_counter()
        result = bench_robust(args, root)
        result["total_s"] = time.perf_counter() - started
        write_section(args.out, "quick" if args.quick else "robust", result)
        print_robust(result)
        print(f"\nresults written to {args.out} (the whole benchmark took {result['total_s']:.0f} s)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
