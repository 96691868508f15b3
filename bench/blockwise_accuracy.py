"""Block-wise training (issue 15): test accuracy at the same number of rounds, NeuLite's curriculum + harmonizer vs
naive block-wise training vs full-model FedAvg.

Every run trains the built-in sequential ``convnet`` (4 stages of conv + GroupNorm + ReLU, 28,650 parameters) with
the in-process trainer (:class:`~gradshard.fl.driver.Trainer` on a local store, clients run inline one after the
other), on the same clients, data partition, sampled cohorts, local epochs, batch size, learning rate and number of
rounds. The methods:

1. ``fedavg``: full-model FedAvg (no ``[blockwise]`` table): every client trains the whole model every round;
2. ``naive``: block-wise training, 4 blocks, round-robin stages (stage r mod 4), plain cross-entropy on each stage's
   output module (λ₁ = λ₂ = 0), no co-adaptation, randomly initialised output modules;
3. ``neulite``: block-wise training with the ``[blockwise]`` defaults: the curriculum mentor (λ₁ from 0.1 at the
   first stage to 0 at the last, λ₂ = 0.1, σ = 5) and the harmonizer (the last module of the previous block
   co-adapts; output modules start from the model's classifier);
4. ``neulite, later heads``: the same with ``head_init = "later"``: each output module is a copy of the model's
   last block, reloaded from its current values whenever its stage trains (NeuLite's output modules);
5. optionally (``--lambdas LX:LY,...``), more rows of 3 with constant λ₁ = LX and λ₂ = LY, labelled as such
   (``0:0`` keeps only the harmonizer: an ablation of the curriculum).

Data sets (``--data``, default ``digits,digits-hard``):

- ``digits``: scikit-learn's 8×8 digits (1,797 images, 10 classes, pixels in [0, 1]), the trainer's bundled split
  (:func:`gradshard.fl.data.load_digits`, 20% test, stratified, split by the run's seed);
- ``digits-hard``: a harder image set generated from the same split of the same digits (see :func:`digits_hard`):
  every image, train and test alike, is shifted by a random whole number of pixels dx, dy ∈ {-1, 0, +1} (each
  uniform and independent per example; the pixels shifted in are 0, nothing wraps around), then gets additive
  Gaussian noise N(0, σ²) per pixel with σ = ``--noise`` (default 0.25), and is clipped to [0, 1]. The shifts and
  the noise come from a generator seeded by the run's seed (one stream for train, an independent one for test), so
  a seed always gives the same arrays. σ was picked once, from full-model FedAvg runs only (default settings, of
  σ = 0.2, 0.25, 0.3 and 0.5 the one at which FedAvg ends near 0.8, clearly below plain digits' ~0.97; not tuned
  for the block-wise methods);
- ``synthetic`` (optional, not in the default): Gaussian blobs from :func:`gradshard.fl.data.make_synthetic`, 64
  features shaped 1×8×8, 10 classes, class means ``--separation`` noise standard deviations apart. They have no
  spatial structure, so the convnet is a poor fit for them.

The accuracy is the global model's test
accuracy after each round (for block-wise runs, the model's own output, i.e. the last block's; the accuracy of
every stage's output module is kept in the JSON). "client s" is the measured wall time of all client functions of
the run (the trainer's ``client_seconds``, summed over rounds; the clients run sequentially in this process).
With ``--seeds N`` every run is repeated with seeds 0..N-1 (the seed sets the data split / synthetic draw, the
partition, the cohorts and the initial model, and the
digits-hard shifts and noise); the table then gives the mean and [min, max].

Nothing is hard-coded: every number printed or plotted is measured by this run.

    .venv/bin/python bench/blockwise_accuracy.py            # 10 clients, 5 per round, 24 rounds, 3 epochs
    .venv/bin/python bench/blockwise_accuracy.py --quick    # 4 rounds: a smoke test
    .venv/bin/python bench/blockwise_accuracy.py --seeds 3 --lambdas 0.5:0.5

Writes ``<out>/blockwise_accuracy.png`` (test accuracy per round, one panel per data set) and, with ``--json``,
the raw results.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradshard.fl import data as fldata
from gradshard.fl.config import TrainConfig
from gradshard.fl.driver import Trainer
from gradshard.runtime.inline import InlineExecutor
from gradshard.store import LocalStore

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = 4
DATAS = ("digits", "digits-hard", "synthetic")
log = logging.getLogger("bench.blockwise_accuracy")

#: method -> its ``[blockwise]`` table (None: full-model FedAvg)
METHODS: dict[str, dict[str, Any] | None] = {
    "fedavg": None,
    "naive": {"blocks": BLOCKS, "lambda_x": 0.0, "lambda_y": 0.0, "co_adapt": 0, "head_init": "random"},
    "neulite": {"blocks": BLOCKS},
    "neulite, later heads": {"blocks": BLOCKS, "head_init": "later"},
}
LABELS = {"fedavg": "full-model FedAvg", "naive": "naive block-wise",
          "neulite": "block-wise + curriculum + harmonizer (defaults)",
          "neulite, later heads": "the same, output modules = copies of the last block (NeuLite's)"}


def parse_lambdas(text: str) -> list[tuple[float, float]]:
    """``"0.5:0.5,0:0.1"`` -> [(0.5, 0.5), (0.0, 0.1)]."""
    out = []
    for item in text.split(","):
        if item.strip():
            lx, _, ly = item.partition(":")
            out.append((float(lx), float(ly)))
    return out


def methods_for(lambdas: Sequence[tuple[float, float]]) -> dict[str, dict[str, Any] | None]:
    """The three methods plus one curriculum + harmonizer row per extra (λ₁, λ₂)."""
    methods = dict(METHODS)
    for lx, ly in lambdas:
        if lx == ly == 0:  # no curriculum left: the harmonizer alone (co-adaptation, heads from the classifier)
            name, label = "harmonizer only λx=0 λy=0", "block-wise + harmonizer only (λ₁ = λ₂ = 0)"
        else:
            name = f"neulite λx={lx:g} λy={ly:g}"
            label = f"block-wise + curriculum + harmonizer, constant λ₁={lx:g}, λ₂={ly:g}"
        methods[name] = {"blocks": BLOCKS, "lambda_x": lx, "lambda_y": ly}
        LABELS[name] = label
    return methods


def shift_and_noise(images: fldata.Dataset, noise: float, rng: np.random.Generator) -> fldata.Dataset:
    """``images`` (n, 1, side, side) with each example shifted by dx, dy ∈ {-1, 0, 1} pixels (zero fill, no wrap),
    plus N(0, noise²) per pixel, clipped to [0, 1]."""
    x = images.x
    n, _, side, _ = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))  # zeros all round: a shifted-in pixel is 0
    dy, dx = rng.integers(-1, 2, size=n), rng.integers(-1, 2, size=n)
    out = np.empty_like(x)
    for sy in (-1, 0, 1):  # the crop that starts at (1 - sy, 1 - sx) moves the image by (+sy, +sx)
        for sx in (-1, 0, 1):
            mask = (dy == sy) & (dx == sx)
            out[mask] = padded[mask, :, 1 - sy:1 - sy + side, 1 - sx:1 - sx + side]
    out += rng.normal(0.0, noise, size=out.shape).astype(np.float32)
    np.clip(out, 0.0, 1.0, out=out)
    return fldata.Dataset(out.astype(np.float32), images.y.copy(), images.num_classes)


def digits_hard(seed: int, noise: float, test_fraction: float = 0.2) -> tuple[fldata.Dataset, fldata.Dataset]:
    """The digits split the trainer uses for ``seed``, every image randomly shifted by up to ±1 pixel in x and y
    and with Gaussian noise of standard deviation ``noise`` (see the module docstring); deterministic in ``seed``,
    with independent draws for train and test."""
    train, test = fldata.load_digits(test_fraction=test_fraction, seed=seed, images=True)
    train_rng, test_rng = (np.random.default_rng([seed, part]) for part in (0, 1))
    return shift_and_noise(train, noise, train_rng), shift_and_noise(test, noise, test_rng)


def datasets_for(name: str, seed: int, args: argparse.Namespace) -> tuple[fldata.Dataset, fldata.Dataset] | None:
    """None for digits (the trainer loads the bundled set, split by the run's seed); else the (train, test)."""
    if name == "digits":
        return None
    if name == "digits-hard":
        return digits_hard(seed, args.noise)
    return fldata.make_synthetic(args.synthetic_n, features=64, classes=10, seed=seed, test_fraction=0.2,
                                 separation=args.separation)


def run_one(data: str, method: str, blockwise: dict[str, Any] | None, seed: int,
            args: argparse.Namespace) -> dict[str, Any]:
    """One training run; its per-round accuracy, client seconds and (block-wise) stage accuracies."""
    config: dict[str, Any] = {"model": "convnet", "clients": args.clients, "per_round": args.per_round,
                              "rounds": args.rounds, "epochs": args.epochs, "batch_size": args.batch_size,
                              "lr": args.lr, "seed": seed, "data": {"partition": args.partition}}
    if blockwise is not None:
        config["blockwise"] = blockwise
    cfg = TrainConfig.model_validate(config)
    with tempfile.TemporaryDirectory(prefix="blockwise-acc-") as tmp:
        trainer = Trainer(LocalStore(tmp, fsync=False), cfg, InlineExecutor(), datasets=datasets_for(data, seed, args))
        started = time.perf_counter()
        history = trainer.run()
        wall = time.perf_counter() - started
    accuracy = [float(m["test_accuracy"]) for m in history]
    return {"data": data, "method": method, "seed": seed, "blockwise": blockwise, "wall_s": wall,
            "test_accuracy": accuracy, "client_seconds": [float(m["client_seconds"]) for m in history],
            "client_seconds_total": sum(float(m["client_seconds"]) for m in history),
            "final_accuracy": accuracy[-1], "best_accuracy": max(accuracy),
            "stage": [m.get("plugin", {}).get("stage") for m in history],
            "stage_accuracy": [m.get("plugin", {}).get("stage_accuracy") for m in history]}


def spread(values: Sequence[float], fmt: str = "{:.3f}") -> str:
    """One value, or the mean and [min, max] of several."""
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.fmean(values))} [{fmt.format(min(values))}, {fmt.format(max(values))}]"


def summarise(runs: list[dict[str, Any]], datas: Sequence[str], methods: Sequence[str]) -> list[dict[str, Any]]:
    """Per (data set, method): the runs' final and best accuracy, client seconds, and the paired (same seed)
    comparison with naive block-wise and with full FedAvg."""
    by = {(r["data"], r["method"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    rows = []
    for data in datas:
        for method in methods:
            mine = [by[data, method, s] for s in seeds]
            row: dict[str, Any] = {"data": data, "method": method,
                                   "final": [r["final_accuracy"] for r in mine],
                                   "best": [r["best_accuracy"] for r in mine],
                                   "client_s": [r["client_seconds_total"] for r in mine]}
            for base in ("naive", "fedavg"):
                other = [by[data, base, s] for s in seeds]
                row[f"ratio_{base}"] = [a["final_accuracy"] / b["final_accuracy"] if b["final_accuracy"] else None
                                        for a, b in zip(mine, other, strict=True)]
                row[f"points_{base}"] = [100 * (a["final_accuracy"] - b["final_accuracy"])
                                         for a, b in zip(mine, other, strict=True)]
                row[f"time_ratio_{base}"] = [a["client_seconds_total"] / b["client_seconds_total"]
                                             for a, b in zip(mine, other, strict=True)]
            rows.append(row)
    return rows


def ratio_text(values: Sequence[float | None]) -> str:
    known = [v for v in values if v is not None]
    return spread(known, "{:.2f}") + "×" if known else "n/a (base 0)"


def print_tables(rows: list[dict[str, Any]], runs: list[dict[str, Any]], rounds: int) -> None:
    print(f"\n## Test accuracy after {rounds} rounds (convnet)\n")
    print("| data | method | final acc | best acc | client s (total) | vs FedAvg: final acc | vs FedAvg: points | "
          "vs FedAvg: client s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        vs = "—" if row["method"] == "fedavg" else None
        print(f"| {row['data']} | {row['method']} | {spread(row['final'])} | {spread(row['best'])} | "
              f"{spread(row['client_s'], '{:.1f}')} | {vs or ratio_text(row['ratio_fedavg'])} | "
              f"{vs or spread(row['points_fedavg'], '{:+.1f}')} | {vs or ratio_text(row['time_ratio_fedavg'])} |")
    print("\n## Curriculum + harmonizer over naive block-wise (same seeds, final test accuracy)\n")
    print("| data | method | accuracy ratio (÷ naive) | difference (points) | client s ratio (÷ naive) |")
    print("|---|---|---:|---:|---:|")
    for row in rows:
        if row["method"] in ("fedavg", "naive"):
            continue
        print(f"| {row['data']} | {row['method']} | {ratio_text(row['ratio_naive'])} | "
              f"{spread(row['points_naive'], '{:+.1f}')} | {ratio_text(row['time_ratio_naive'])} |")
    print("\n## Block-wise runs: final test accuracy of every stage's output module (stage 3 = the model)\n")
    print("| data | method | seed | " + " | ".join(f"stage {t}" for t in range(BLOCKS)) + " |")
    print("|---|---|---:|" + "---:|" * BLOCKS)
    for r in runs:
        final = r["stage_accuracy"][-1]
        if final is not None:
            print(f"| {r['data']} | {r['method']} | {r['seed']} | " + " | ".join(f"{a:.3f}" for a in final) + " |")


def display_path(path: Path) -> str:
    """``path`` relative to the repository when it is inside it (no machine's absolute paths in results)."""
    resolved = path.resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def plot(runs: list[dict[str, Any]], datas: Sequence[str], methods: Sequence[str], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(datas), figsize=(6 * len(datas), 4.2), squeeze=False)
    styles = {"fedavg": "k-", "naive": "C3--", "neulite": "C0-", "neulite, later heads": "C2-."}
    for ax, data in zip(axes[0], datas, strict=True):
        for i, method in enumerate(methods):
            curves = [r["test_accuracy"] for r in runs if r["data"] == data and r["method"] == method]
            rounds = list(range(1, len(curves[0]) + 1))
            mean = [statistics.fmean(c[k] for c in curves) for k in range(len(rounds))]
            style = styles.get(method, f"C{i + 1}:")
            (line,) = ax.plot(rounds, mean, style, label=LABELS.get(method, method), lw=1.6)
            if len(curves) > 1:
                ax.fill_between(rounds, [min(c[k] for c in curves) for k in range(len(rounds))],
                                [max(c[k] for c in curves) for k in range(len(rounds))],
                                color=line.get_color(), alpha=0.15, lw=0)
        ax.set_title(data)
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "blockwise_accuracy.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=24, help=f"rounds of every run (a multiple of {BLOCKS}, so "
                                                               "every stage gets the same share)")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=5, help="clients sampled per round")
    parser.add_argument("--epochs", type=int, default=3, help="local epochs per round")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seeds", type=int, default=1, help="repeat every run with seeds 0..N-1 (mean and range)")
    parser.add_argument("--data", default="digits,digits-hard",
                        help=f"comma-separated: {', '.join(DATAS)}")
    parser.add_argument("--partition", choices=("iid", "dirichlet"), default="iid",
                        help="dirichlet: label skew with α = 0.5")
    parser.add_argument("--noise", type=float, default=0.25,
                        help="digits-hard: standard deviation of the additive Gaussian pixel noise (pixels in [0, 1])")
    parser.add_argument("--separation", type=float, default=3.0,
                        help="synthetic: distance between class means in noise standard deviations (lower: harder)")
    parser.add_argument("--synthetic-n", type=int, default=2000, help="synthetic: examples (train + test)")
    parser.add_argument("--lambdas", type=parse_lambdas, default=[], metavar="LX:LY,...",
                        help="extra curriculum + harmonizer rows with constant λ₁ = LX, λ₂ = LY")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="directory of the plot")
    parser.add_argument("--json", type=Path, default=None, help="write the raw results here")
    parser.add_argument("--quick", action="store_true", help=f"{BLOCKS} rounds (a smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.rounds = BLOCKS
    if args.rounds < BLOCKS or args.rounds % BLOCKS:
        parser.error(f"--rounds must be a positive multiple of {BLOCKS} (every stage the same share), got "
                     f"{args.rounds}")
    datas = [d.strip() for d in args.data.split(",") if d.strip()]
    if not datas or any(d not in DATAS for d in datas):
        parser.error(f"--data takes some of {', '.join(DATAS)}, got {args.data!r}")
    if args.noise < 0:
        parser.error("--noise must be >= 0")
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("gradshard").setLevel(logging.WARNING)
    methods = methods_for(args.lambdas)

    started = time.perf_counter()
    runs = []
    for data in datas:
        for seed in range(args.seeds):
            for method, blockwise in methods.items():
                run = run_one(data, method, blockwise, seed, args)
                runs.append(run)
                log.info("%s seed %d %-26s final %.3f best %.3f client %.1f s wall %.1f s", data, seed, method,
                         run["final_accuracy"], run["best_accuracy"], run["client_seconds_total"], run["wall_s"])
    wall = time.perf_counter() - started

    rows = summarise(runs, datas, list(methods))
    print_tables(rows, runs, args.rounds)
    settings = (f"{args.clients} clients, {args.per_round} per round, {args.rounds} rounds, {args.epochs} epochs, "
                f"batch {args.batch_size}, lr {args.lr:g}, {args.partition}, seeds 0..{args.seeds - 1}"
                + (f"; digits-hard noise σ {args.noise:g}" if "digits-hard" in datas else "")
                + (f"; synthetic separation {args.separation:g}, n {args.synthetic_n}" if "synthetic" in datas
                   else ""))
    print(f"\n{settings}; total wall {wall:.0f} s")
    plot(runs, datas, list(methods), args.out, f"convnet, {settings}")
    print(f"wrote {display_path(args.out / 'blockwise_accuracy.png')}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": {k: (display_path(v) if isinstance(v, Path) else v)
                                                      for k, v in vars(args).items()},
                                         "methods": methods, "labels": {m: LABELS.get(m, m) for m in methods},
                                         "wall_s": wall, "summary": rows, "runs": runs}, indent=1))
        print(f"wrote {display_path(args.json)}")


if __name__ == "__main__":
    main()
