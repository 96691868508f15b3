"""Robust aggregation under attack (issue 17's report): final test accuracy of every reducer on digits with 20 % of
the clients attacking, one attack kind at a time.

Every run trains the built-in ``mlp`` on scikit-learn's digits with the in-process trainer
(:class:`~gradshard.fl.driver.Trainer` on a local store, clients inline), 15 clients (IID split, all of them every
round), ``--rounds`` rounds of one local epoch, uniform weighting (so that no attacker gains weight by claiming
examples), on the same data, partition and initial model for every run of a seed. Three clients (20 %) attack
(:mod:`gradshard.fl.attacks`): ``sign-flip`` (uploads −Δ), ``scale:100`` (100·Δ), ``noise:1`` (Δ + N(0, 1) per
element) or ``label-flip`` (trains on labels 9 − y). Reducers: ``mean`` (FedAvg), ``median``, ``trimmed-mean:0.2``,
``krum:3``, ``multi-krum:3,9``, ``bulyan:3`` (n = 15 is the least Bulyan allows for f = 3) and ``fltrust`` (the
server's root update from 100 training examples). A row ``none`` trains without attackers.

The runs are spread over ``--jobs`` processes. Nothing is hard-coded: every number printed is measured by this run.

    .venv/bin/python bench/robust_accuracy.py              # 4 attacks + none, 7 reducers, 10 rounds
    .venv/bin/python bench/robust_accuracy.py --quick      # 2 rounds, 2 reducers: a smoke test

Writes ``<out>/robust_accuracy.png`` (final accuracy per attack and reducer) and, with ``--json``, every curve.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from _common import BENCH_DIR, setup_logging

log = logging.getLogger("bench")

CLIENTS = 15
ATTACKERS = ("client-0004", "client-0009", "client-0014")  # 20 %, spread over the partition
ATTACKS = ("none", "sign-flip", "scale:100", "noise:1", "label-flip")
REDUCERS = ("mean", "median", "trimmed-mean:0.2", "krum:3", "multi-krum:3,9", "bulyan:3", "fltrust")


def run_one(attack: str, reducer: str, rounds: int, seed: int, partition: str = "iid") -> dict[str, Any]:
    from gradshard.aggregation.driver import AggregateConfig
    from gradshard.fl.config import DataConfig, TrainConfig
    from gradshard.fl.driver import Trainer
    from gradshard.runtime import InlineExecutor
    from gradshard.store import LocalStore

    attacks = {} if attack == "none" else dict.fromkeys(ATTACKERS, attack)
    data = DataConfig(name="digits", partition=partition, alpha=0.5) if partition == "dirichlet" else \
        DataConfig(name="digits", partition="iid")
    cfg = TrainConfig(model="mlp", data=data, clients=CLIENTS, rounds=rounds,
                      epochs=1, batch_size=32, lr=0.1, momentum=0.9, seed=seed, attacks=attacks,
                      aggregation=AggregateConfig(reducer=reducer, weighting="uniform"))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gradshard-robust-") as tmp:
        history = Trainer(LocalStore(tmp, fsync=False), cfg, InlineExecutor()).run()
    accuracy = [float(m["test_accuracy"]) for m in history]
    kept_out = [sorted(set(m["rejected"]) & set(ATTACKERS)) for m in history]
    return {"attack": attack, "reducer": reducer, "seed": seed, "partition": partition, "test_accuracy": accuracy,
            "attackers_kept_out": [len(k) for k in kept_out],
            "honest_kept_out": [len(set(m["rejected"]) - set(ATTACKERS)) for m in history],
            "wall_s": time.perf_counter() - started}


def plot(results: list[dict[str, Any]], reducers: list[str], attacks: list[str], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(reducers)
    for k, reducer in enumerate(reducers):
        values = [final(results, attack, reducer) for attack in attacks]
        ax.bar([i + k * width for i in range(len(attacks))], values, width, label=reducer)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(attacks))], attacks)
    ax.set_ylabel("final test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"digits, {CLIENTS} clients, 3 attackers (20 %), mlp")
    ax.legend(fontsize=7, ncol=4, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def final(results: list[dict[str, Any]], attack: str, reducer: str) -> float:
    values = [r["test_accuracy"][-1] for r in results if r["attack"] == attack and r["reducer"] == reducer]
    return sum(values) / len(values) if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--reducers", default=" ".join(REDUCERS), help="space-separated (multi-krum's own comma)")
    ap.add_argument("--partition", choices=("iid", "dirichlet"), default="iid",
                    help="the clients' data: IID, or non-IID Dirichlet with alpha 0.5")
    ap.add_argument("--quick", action="store_true", help="2 rounds, mean and krum:3 only")
    ap.add_argument("--out", type=Path, default=BENCH_DIR / "out")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    setup_logging(args.verbose)
    attacks = args.attacks.split(",")
    reducers = ["mean", "krum:3"] if args.quick else args.reducers.split()
    rounds = 2 if args.quick else args.rounds
    jobs = [(a, r, rounds, s, args.partition) for s in range(args.seeds) for a in attacks for r in reducers]
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(run_one, *zip(*jobs, strict=True)))
    print(f"\nfinal test accuracy after {rounds} rounds ({args.seeds} seed(s), mean), digits ({args.partition}), "
          f"{CLIENTS} clients, "
          f"attackers {', '.join(ATTACKERS)}; in brackets: attackers kept out of the last round / honest clients "
          "kept out")
    print(f"{'attack':<12}" + "".join(f"{r:>18}" for r in reducers))
    for attack in attacks:
        cells = []
        for reducer in reducers:
            runs = [r for r in results if r["attack"] == attack and r["reducer"] == reducer]
            out = runs[0]["attackers_kept_out"][-1] if runs else 0
            honest = runs[0]["honest_kept_out"][-1] if runs else 0
            cells.append(f"{final(results, attack, reducer):.3f} [{out}/{honest}]")
        print(f"{attack:<12}" + "".join(f"{c:>18}" for c in cells))
    print(f"\nwall {time.perf_counter() - started:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        plot(results, reducers, attacks, args.out / "robust_accuracy.png")
        print(f"plot: {args.out / 'robust_accuracy.png'}")
    except ImportError:
        print("matplotlib is not installed: no plot")
    if args.json is not None:
        args.json.write_text(json.dumps({"rounds": rounds, "clients": CLIENTS, "attackers": ATTACKERS,
                                         "results": results}, indent=1))


if __name__ == "__main__":
    main()
