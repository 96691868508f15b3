"""What running invocations as Ray tasks costs over the LocalExecutor, on this machine, measured in one run.

1. ``ray.init`` of a local one-machine Ray (and ``ray.shutdown``), timed once.
2. One synthetic round (``--params`` float32 elements, ``--clients`` clients) aggregated by each ``--topologies``
   with a ``LocalExecutor`` and with a ``RayExecutor`` on that Ray, alternating, ``--repeats`` times after one
   first run each (timed too: the first run of each executor starts its zygote, Ray's also its Ray workers);
   medians and Ray / local ratios are reported.
   Every Ray aggregate is checked to be the same bytes as the local one.
3. One ``noop`` invocation, ``--repeats`` times on each executor: the fixed cost of one invocation.

Only a one-machine Ray is measured: the ratio is Ray's scheduling and hand-back overhead, not a cluster's network.
Figures go to stdout and to ``bench/out/ray_overhead.json``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from _common import BENCH_DIR, setup_logging, write_section

from gradshard.aggregation.driver import AggregateConfig, aggregate_round
from gradshard.core.zoo import synthetic
from gradshard.demo.synthetic import make_round
from gradshard.format.keys import aggregate_key
from gradshard.runtime import Executor, LocalExecutor
from gradshard.runtime.ray import RayExecutor
from gradshard.store import LocalStore
from gradshard.topology.base import Invocation, Plan

DEFAULT_OUT = BENCH_DIR / "out" / "ray_overhead.json"
CONFIGS = {"sharded": AggregateConfig(topology="sharded", shards=4), "lambda-fl": AggregateConfig(topology="lambda-fl"),
           "flat": AggregateConfig(topology="flat")}


def timed(run: Callable[[], Any]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def compare(name: str, repeats: int, local: Callable[[], Any], remote: Callable[[], Any],
            check: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Time a first (cold) run of each, then alternate; medians and the ratio of the medians."""
    first_local, first_ray = timed(local), timed(remote)
    check()
    local_s, ray_s = [], []
    for _ in range(repeats):
        local_s.append(timed(local))
        ray_s.append(timed(remote))
        check()
    lm, rm = statistics.median(local_s), statistics.median(ray_s)
    print(f"  {name:<10} local {lm * 1e3:>8.1f} ms   ray {rm * 1e3:>8.1f} ms   ratio {rm / lm:>5.2f}   "
          f"(+{(rm - lm) * 1e3:.1f} ms; first runs {first_local * 1e3:.0f} / {first_ray * 1e3:.0f} ms)")
    return {"name": name, "first_local_s": first_local, "first_ray_s": first_ray, "local_s": local_s,
            "ray_s": ray_s, "local_median_s": lm, "ray_median_s": rm, "ratio": rm / lm}


def noop_once(executor: Executor, store: LocalStore) -> None:
    (report,) = executor.run(Plan("noop", (Invocation("noop", "noop", {}, 0),)), store)
    if not report.ok:
        raise RuntimeError(f"noop failed: {report.error_type}: {report.error}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=4_000_000, help="float32 elements of the synthetic model")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--topologies", default="sharded,lambda-fl,flat", help=f"of {', '.join(CONFIGS)}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2, help="concurrent invocations (and Ray CPUs)")
    parser.add_argument("--scratch", type=Path, default=None, help="parent directory of the scratch stores")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    setup_logging(args.verbose)

    init_s = timed(lambda: ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False))
    print(f"ray {ray.__version__}: ray.init of a local Ray with {args.workers} CPUs took {init_s:.2f} s")
    rows = []
    with tempfile.TemporaryDirectory(dir=args.scratch, prefix="ray-overhead-") as tmp, \
            LocalExecutor(workers=args.workers, retries=0) as local, \
            RayExecutor(workers=args.workers, retries=0) as remote:
        stores = {"local": LocalStore(Path(tmp) / "local", fsync=False),
                  "ray": LocalStore(Path(tmp) / "ray", fsync=False)}
        for store in stores.values():
            make_round(store, 0, synthetic(args.params, tensor_elems=args.params // 7 + 1), args.clients, seed=1)
        print(f"{args.params:,} parameters, {args.clients} clients, {args.workers} workers; medians of "
              f"{args.repeats} runs after a first one")

        def same_bytes() -> None:
            if stores["ray"].get(aggregate_key(0)) != stores["local"].get(aggregate_key(0)):
                raise RuntimeError("the Ray aggregate differs from the local one")

        for name in args.topologies.split(","):
            config = CONFIGS[name.strip()]
            rows.append(compare(name, args.repeats, lambda c=config: aggregate_round(stores["local"], 0, local, c),
                                lambda c=config: aggregate_round(stores["ray"], 0, remote, c), same_bytes))
        rows.append(compare("noop", args.repeats, lambda: noop_once(local, stores["local"]),
                            lambda: noop_once(remote, stores["ray"])))
    shutdown_s = timed(ray.shutdown)
    print(f"ray.shutdown took {shutdown_s:.2f} s")
    write_section(args.out, "ray_overhead", {"ray": ray.__version__, "params": args.params, "clients": args.clients,
                                             "workers": args.workers, "repeats": args.repeats, "init_s": init_s,
                                             "shutdown_s": shutdown_s, "rows": rows})
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
