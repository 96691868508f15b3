"""Accuracy against ε on digits (issue 13's report): non-private runs, client DP-SGD and central DP at several ε.

Every setting is the same federated run — the built-in ``mlp`` task on digits, 10 IID clients all taking part in
every round, the same rounds, epochs, batch size and learning rate — with one :class:`TrainConfig` override: none
(non-private) or a ``[privacy.client]`` table. For client DP-SGD the noise multiplier z is calibrated with the
accountant (bisection) so that the clients' ε composed over all rounds hits a target (ε ≈ 1, 3, 8 at δ = 1e-5);
the ε reported is the one the run's ledger composed (the largest over clients), not the target.

Central DP needs many clients per round (its noise is σ = z·C / clients per round, added to every element), so its
rows use their own base run, :data:`CENTRAL_BASE`: 100 IID clients (~14 examples each), 20 expected per round drawn
by Poisson sampling (q = 0.2, the amplification the accountant applies), uniform weighting, with its own
non-private row. Its noise multipliers are fixed (0.5, 1, 2, 4); ε is what the run's central ledger composed.

The runs use the training driver (:class:`~gradshard.fl.driver.Trainer`, what ``gradshard train`` runs) with
in-process executors on an in-memory store, to fit in a few minutes on two shared cores; clients are deterministic,
so the local executor gives the same models. Output: a table on stdout, ``bench/out/dp_accuracy.json`` and
``docs/img/dp_accuracy.png``.
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import BENCH_DIR, setup_logging, write_section

from gradshard.fl.builtin import builtin_ref
from gradshard.fl.config import DataConfig, TrainConfig
from gradshard.fl.driver import Trainer
from gradshard.fl.task import load_task
from gradshard.privacy.accountant import Release
from gradshard.privacy.client_ledger import composed_epsilon
from gradshard.runtime import InlineExecutor
from gradshard.store import MemoryStore

DELTA = 1e-5
CLIP = 1.0
BASE = TrainConfig(model="mlp", data=DataConfig(name="digits", partition="iid"), clients=10, rounds=12, epochs=2,
                   batch_size=16, lr=0.1, momentum=0.9, seed=0)
CENTRAL_BASE = TrainConfig(model="mlp", data=DataConfig(name="digits", partition="iid"), clients=100, per_round=20,
                           sampling="poisson", rounds=12, epochs=3, batch_size=8, lr=0.1, momentum=0.9, seed=0,
                           aggregation={"shards": 2, "weighting": "uniform"})
PNG = BENCH_DIR.parent / "docs" / "img" / "dp_accuracy.png"


@dataclass(frozen=True)
class Setting:
    """One row: a name and how it changes :data:`BASE` (a function of the base config, so an override can be
    calibrated against it)."""

    name: str
    override: Callable[[TrainConfig], dict[str, Any]] = field(default=lambda base: {})
    kind: str = "client"  # which base run: "client" (BASE) or "central" (CENTRAL_BASE)


def train_set(base: TrainConfig) -> Any:
    task = load_task(builtin_ref(base.model, base.data.name, base.data.test_fraction, base.seed))
    assert task.data is not None
    return task.data()[0]


def client_release(base: TrainConfig, z: float, examples: int) -> Release:
    """The whole run's release of a client with ``examples`` examples (all its rounds merged)."""
    batches = math.ceil(examples / base.batch_size)
    return Release(noise_multiplier=z, sampler="poisson", sample_rate=1 / batches,
                   steps=base.rounds * base.epochs * batches)


def calibrate(base: TrainConfig, target: float, examples: int) -> float:
    """The noise multiplier whose composed ε over the run is ``target`` (to 0.5 %), by bisection on log z."""
    low, high = 0.3, 50.0
    for _ in range(40):
        mid = math.sqrt(low * high)
        if composed_epsilon((client_release(base, mid, examples),), DELTA) > target:
            low = mid
        else:
            high = mid
        if high / low < 1.005:
            break
    return high


def client_dp(target: float) -> Callable[[TrainConfig], dict[str, Any]]:
    def override(base: TrainConfig) -> dict[str, Any]:
        examples = len(train_set(base)) // base.clients  # the smallest IID client
        z = calibrate(base, target, examples)
        return {"privacy": {"client": {"noise_multiplier": round(z, 3), "max_grad_norm": CLIP, "delta": DELTA}}}
    return override


SETTINGS: list[Setting] = [
    Setting("non-private"),
    Setting("client DP-SGD, target ε 8", client_dp(8.0)),
    Setting("client DP-SGD, target ε 3", client_dp(3.0)),
    Setting("client DP-SGD, target ε 1", client_dp(1.0)),
    Setting("central: non-private", kind="central"),
    *[Setting(f"central DP, z {z:g}", lambda base, z=z: {"privacy": {"central": {
        "noise_multiplier": z, "clip": CLIP, "delta": DELTA, "key_file": ""}}}, kind="central")
      for z in (0.5, 1.0, 2.0, 4.0)],
]


def run(setting: Setting, base: TrainConfig) -> dict[str, Any]:
    config = TrainConfig.model_validate({**base.model_dump(), **setting.override(base)})
    started = time.perf_counter()
    history = Trainer(MemoryStore(), config, InlineExecutor(), InlineExecutor()).run()
    last = history[-1]
    privacy = last.get("client_privacy")
    client = config.privacy.client
    central = config.privacy.central
    if central is not None:
        epsilon = last["central_dp"]["epsilon"] if last.get("central_dp") else None
        z, clip, delta = central.noise_multiplier, central.clip, central.delta
    else:
        epsilon = privacy["max_epsilon"] if privacy else None
        z, clip, delta = ((client.noise_multiplier, client.max_grad_norm, client.delta) if client
                          else (None, None, None))
    return {"name": setting.name, "kind": setting.kind, "noise_multiplier": z, "clip": clip, "delta": delta,
            "epsilon": epsilon,
            "final_test_accuracy": last["test_accuracy"],
            "best_test_accuracy": max(m["test_accuracy"] for m in history),
            "accuracy_per_round": [m["test_accuracy"] for m in history], "seconds": time.perf_counter() - started}


def plot(rows: list[dict[str, Any]], base: TrainConfig) -> bytes:
    """Left: test accuracy per round for every setting; right: final accuracy against ε."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    per_round, vs_eps = fig.subplots(1, 2)
    for row in rows:
        label = row["name"] if row["epsilon"] is None else f"ε = {row['epsilon']:.2f} (z = {row['noise_multiplier']})"
        per_round.plot(range(len(row["accuracy_per_round"])), row["accuracy_per_round"], marker="o", markersize=3,
                       label=label)
    per_round.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1), title="test accuracy per round")
    per_round.grid(True, alpha=0.3)
    per_round.legend(fontsize=8, loc="lower right")
    private = [r for r in rows if r["epsilon"] is not None]
    for kind, label in (("client", "client DP-SGD"), ("central", "central DP")):
        series = sorted((r for r in private if r["kind"] == kind), key=lambda r: r["epsilon"])
        if series:
            vs_eps.plot([r["epsilon"] for r in series], [r["final_test_accuracy"] for r in series], marker="o",
                        label=label)
    for r in private:
        vs_eps.annotate(f"{r['final_test_accuracy']:.3f}", (r["epsilon"], r["final_test_accuracy"]),
                        xytext=(4, -12), textcoords="offset points", fontsize=8)
    for r in rows:
        if r["epsilon"] is None:
            vs_eps.axhline(r["final_test_accuracy"], linestyle="--", color="grey",
                           label=f"{r['name']} ({r['final_test_accuracy']:.3f})")
    vs_eps.set(xscale="log", xlabel=f"ε (δ = {DELTA:g}), composed over {base.rounds} rounds",
               ylabel="final test accuracy", ylim=(0, 1), title="accuracy against ε")
    ticks = [t for t in (0.5, 1, 2, 3, 5, 8, 16, 32) if private and min(r["epsilon"] for r in private) / 1.5 <= t
             <= max(r["epsilon"] for r in private) * 1.5]
    vs_eps.set_xticks(ticks, [f"{t:g}" for t in ticks])
    vs_eps.minorticks_off()
    vs_eps.grid(True, alpha=0.3)
    vs_eps.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"digits, mlp, {base.rounds} rounds, clip {CLIP}; client DP-SGD: {base.clients} IID clients, all "
                 f"per round; central DP: {CENTRAL_BASE.clients} clients, Poisson {CENTRAL_BASE.per_round} per round",
                 fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=BASE.rounds)
    parser.add_argument("--only", default="", help="run only the settings whose name contains this")
    parser.add_argument("--png", type=Path, default=PNG)
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "out" / "dp_accuracy.json")
    args = parser.parse_args()
    setup_logging()
    logging.getLogger("gradshard").setLevel(logging.WARNING)  # the driver's per-round lines
    base = BASE.model_copy(update={"rounds": args.rounds})
    bases = {"client": base, "central": CENTRAL_BASE.model_copy(update={"rounds": args.rounds})}
    rows = []
    for setting in SETTINGS:
        if args.only in setting.name:
            rows.append(run(setting, bases[setting.kind]))
            r = rows[-1]
            print(f"{r['name']:<28} z {r['noise_multiplier'] or '–':>6}  ε {r['epsilon'] or float('inf'):7.3f}  "
                  f"final {r['final_test_accuracy']:.4f}  best {r['best_test_accuracy']:.4f}  {r['seconds']:.0f} s",
                  flush=True)
    print("\n| setting | noise multiplier z | ε (δ = 1e-5) | final test accuracy |\n|---|---|---|---|")
    for r in rows:
        eps = "∞" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        print(f"| {r['name']} | {r['noise_multiplier'] or '–'} | {eps} | {r['final_test_accuracy']:.4f} |")
    write_section(args.out, "dp_accuracy", {"config": base.model_dump(mode="json"),
                                            "central_config": bases["central"].model_dump(mode="json"), "clip": CLIP,
                                            "rows": rows})
    args.png.parent.mkdir(parents=True, exist_ok=True)
    args.png.write_bytes(plot(rows, base))
    print(f"wrote {args.out} and {args.png}")


if __name__ == "__main__":
    main()
