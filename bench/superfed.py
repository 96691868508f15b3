"""SuperFed on digits: one supernet for a family of subnetworks versus training each of them separately.

1. trains the elastic ResNet supernet with the SuperFed plugin (tracking sandwich, β 0.9 → 0.125 cosine over 80 %
   of the rounds, coverage-mean) and evaluates every subnetwork of the family after every round;
2. trains each subnetwork of the family *separately* as a standalone model with plain FedAvg, on the same clients,
   data partition, cohorts, rounds and local training;
3. reports, for the family and for the separate runs: final test accuracy per subnetwork, client compute (the
   client seconds the client functions measured and reported, and analytic training FLOPs), and bytes moved by
   the client functions (updates written and everything read, both measured by the store's I/O counters).

Writes ``bench/out/superfed.json`` and the plot ``docs/img/superfed_accuracy.png``.

    python bench/superfed.py            # 16 clients, 8 per round, 15 rounds (about 5 minutes on 2 cores)
    python bench/superfed.py --quick    # a smoke run
    python bench/superfed.py --family grid9 --out bench/out/superfed_k9.json --plot docs/img/superfed_k9.png
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from gradshard.fl.config import DataConfig, TrainConfig
from gradshard.fl.driver import Trainer
from gradshard.fl.task import TaskRef
from gradshard.format.keys import client_reports_key, model_key
from gradshard.runtime import LocalExecutor
from gradshard.runtime.inline import InlineExecutor
from gradshard.store import LocalStore
from gradshard.supernet.config import SupernetConfig
from gradshard.supernet.model import Subnet
from gradshard.supernet.plugin import SupernetPlugin

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("bench.superfed")


def base_config(quick: bool) -> dict[str, Any]:
    return {"clients": 16, "per_round": 8, "rounds": 3 if quick else 15, "epochs": 2, "batch_size": 32,
            "lr": 0.05, "momentum": 0.9, "seed": 0, "data": DataConfig(name="digits", partition="iid"),
            "aggregation": {"topology": "sharded", "shards": 4}}


def client_totals(store: LocalStore, rounds: int) -> dict[str, float]:
    """Measured over every client invocation of the run: client seconds (train_s reported by the client function),
    bytes written (the updates) and bytes read (global model, kept buffers, the client's data)."""
    seconds = written = read = 0.0
    invocations = 0
    for r in range(rounds):
        for rep in json.loads(store.get(client_reports_key(r)))["reports"]:
            if rep["ok"]:
                seconds += rep["result"]["train_s"]
                written += rep["bytes_written"]
                read += rep["bytes_read"]
                invocations += 1
    return {"client_seconds": seconds, "bytes_written": written, "bytes_read": read, "invocations": invocations}


def train_flops(macs: int, examples: int, epochs: int) -> float:
    """Analytic training FLOPs of one client round: forward + backward ≈ 3 forward passes, 2 FLOPs per MAC."""
    return 6.0 * macs * examples * epochs


def examples_of(store: LocalStore, client: str) -> int:
    from gradshard.fl.client import load_arrays
    from gradshard.format.keys import client_data_key

    return len(load_arrays(store, client_data_key(client))["y"])


def run_family(path: Path, config: TrainConfig, clients: LocalExecutor) -> dict[str, Any]:
    store = LocalStore(path, fsync=False)
    trainer = Trainer(store, config, InlineExecutor(), clients)
    plugin = trainer.plugin
    assert isinstance(plugin, SupernetPlugin)
    started = time.perf_counter()
    history = trainer.run(lambda m: log.info("family round %d: %s", m.round, " ".join(
        f"{s['label']}={s['test_accuracy']:.3f}" for s in (m.plugin or {}).get("subnets", []))))
    wall = time.perf_counter() - started
    flops = compact = 0.0
    for m in history:
        for client, index in m["plugin"]["assignment"].items():
            if client in m["aggregated"]:
                flops += train_flops(plugin.macs[index], examples_of(store, client), config.epochs)
                compact += 4 * plugin.params[index]  # float32 payload of a compact update (part 1 of issue 14)
    return {"history": [m["plugin"]["subnets"] for m in history], "wall_s": wall, "train_flops": flops,
            "compact_payload_bytes": compact,
            "model_bytes": len(store.get(model_key(0))), **client_totals(store, config.rounds)}


def run_separate(path: Path, config: TrainConfig, sub: Subnet, group_size: int, macs: int, params: int,
                 clients: LocalExecutor) -> dict[str, Any]:
    store = LocalStore(path, fsync=False)
    task = TaskRef(target="gradshard.supernet.task:supernet_task",
                   options={"widths": list(sub.channels), "depths": list(sub.depth), "mids": list(sub.inner),
                            "group_size": group_size,
                            "classes": 10, "data": "digits", "test_fraction": config.data.test_fraction,
                            "seed": config.seed})
    started = time.perf_counter()
    history = Trainer(store, config, InlineExecutor(), clients, task=task).run()
    wall = time.perf_counter() - started
    flops = sum(train_flops(macs, examples_of(store, c), config.epochs) for m in history for c in m["aggregated"])
    payload = 4 * params * sum(len(m["aggregated"]) for m in history)  # a standalone model's update is all payload
    return {"accuracy": [m["test_accuracy"] for m in history], "wall_s": wall, "train_flops": flops,
            "compact_payload_bytes": payload,
            "model_bytes": len(store.get(model_key(0))), **client_totals(store, config.rounds)}


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["subnets"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "params", "parameters"), (axes[1], "macs", "MACs per 8×8 image")):
        ordered = sorted(rows, key=lambda r: r[key])
        xs = [r[key] for r in ordered]
        ax.plot(xs, [r["superfed_accuracy"] for r in ordered], "o-", label="SuperFed (one supernet)")
        ax.plot(xs, [r["separate_accuracy"] for r in ordered], "s--", label="each trained separately (FedAvg)")
        for r in rows:
            ax.annotate(r["label"], (r[key], r["superfed_accuracy"]), fontsize=7, textcoords="offset points",
                        xytext=(4, -10))
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"digits, {result['config']['clients']} clients, {result['config']['rounds']} rounds: "
                 "accuracy of every subnetwork")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds (a smoke run)")
    parser.add_argument("--family", choices=("corners4", "grid9"), default="corners4",
                        help="corners4: 4 subnetworks of a depth-2 supernet; grid9: SuperFed's k = 9 (depth 1-3 by "
                             "width 0.25/0.5/1 of a depth-3 supernet)")
    parser.add_argument("--sandwich", type=int, default=1, help="clients per round given the largest (and the "
                                                                  "smallest) subnetwork")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "superfed.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "superfed_accuracy.png")
    parser.add_argument("--replot", action="store_true", help="only redraw the plot from --out")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(args.out.read_text()), args.plot)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("gradshard").setLevel(logging.ERROR)  # β weighting makes one client dominant on purpose
    supernet = SupernetConfig(family=args.family, depths=(3, 3, 3) if args.family == "grid9" else (2, 2, 2),
                              sandwich_clients=args.sandwich)
    base = base_config(args.quick)
    family_config = TrainConfig.model_validate({**base, "supernet": supernet})
    plain_config = TrainConfig.model_validate(base)
    plugin = SupernetPlugin(supernet)
    with tempfile.TemporaryDirectory(prefix="superfed-") as tmp, \
            LocalExecutor(workers=2, timeout_s=300.0) as clients:
        family = run_family(Path(tmp) / "family", family_config, clients)
        separate = []
        for i, sub in enumerate(plugin.subnets):
            log.info("separate FedAvg of subnet %d (%s)", i, plugin.specs[i].label)
            separate.append(run_separate(Path(tmp) / f"separate-{i}", plain_config, sub, supernet.group_size,
                                         plugin.macs[i], plugin.params[i], clients))
    final = family["history"][-1]
    rows = [{"label": plugin.specs[i].label, "depth": list(sub.depth), "channels": list(sub.channels),
             "params": plugin.params[i], "macs": plugin.macs[i], "superfed_accuracy": final[i]["test_accuracy"],
             "separate_accuracy": separate[i]["accuracy"][-1]} for i, sub in enumerate(plugin.subnets)]

    def total(key: str) -> float:
        return sum(s[key] for s in separate)

    ratios = {key: total(key) / family[key] for key in ("client_seconds", "train_flops", "bytes_written",
                                                        "bytes_read", "compact_payload_bytes")}
    ratios["bytes_moved"] = (total("bytes_written") + total("bytes_read")) / (family["bytes_written"]
                                                                              + family["bytes_read"])
    result = {"config": {k: v for k, v in base.items() if k not in ("data", "aggregation")}, "subnets": rows,
              "family": {k: v for k, v in family.items() if k != "history"}, "family_history": family["history"],
              "separate": separate, "ratios_separate_over_family": ratios}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(result, args.plot)
    print("| subnet | params | MACs | SuperFed acc | separate FedAvg acc |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['label']} | {r['params']:,} | {r['macs']:,} | {r['superfed_accuracy']:.3f} | "
              f"{r['separate_accuracy']:.3f} |")
    print(f"\n| | SuperFed family | {len(rows)} separately | separate / family |")
    print("|---|---:|---:|---:|")
    for key, label in (("client_seconds", "client seconds (measured)"), ("train_flops", "client FLOPs (analytic)"),
                       ("bytes_written", "update bytes written (measured)"),
                       ("bytes_read", "bytes read by clients (measured)"),
                       ("compact_payload_bytes", "update payload if compact (analytic)")):
        print(f"| {label} | {family[key]:,.3g} | {total(key):,.3g} | {ratios[key]:.2f}× |")
    print(f"| bytes moved (written + read) | | | {ratios['bytes_moved']:.2f}× |")
    print(f"\nwall: family {family['wall_s']:.0f} s, separate {total('wall_s'):.0f} s; wrote {args.out}, {args.plot}")


if __name__ == "__main__":
    main()
