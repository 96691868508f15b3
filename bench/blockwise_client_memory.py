"""Peak memory of a client *function* training block-wise stages vs the full model (issue 15), measured through the
same path a training run uses, on two CNNs: a VGG-style one whose activations shrink with depth and a uniform one
whose activations are spread evenly across depth.

Every measurement is a real training run: :class:`~gradshard.fl.driver.Trainer` on a scratch
:class:`~gradshard.store.LocalStore` with a :class:`~gradshard.runtime.LocalExecutor` (one worker at a time), one
client, every round that client alone, ``epochs = 1``, ``--batch`` examples per batch, SGD with momentum 0.9. The
models and data are defined at the top level of this file, so the function processes find the task by reference.
``--arch`` picks the measured model(s), both ``nn.Sequential`` CNNs on 3×32×32 images ending in AdaptiveAvgPool2d,
Flatten, Linear to 10 classes:

- ``vgg``: VGG-style, ``--width`` channels doubling over 4 stages of two conv+ReLU pairs with max-pools between, so
  the activations shrink with depth: the first stage's full-resolution layers hold most of them;
- ``uniform``: a stem conv 3→``--width`` + ReLU, then 8 × [conv ``--width``→``--width`` 3×3, ReLU], all at 32×32
  (no pooling before the final average pool), so every layer's activations are the same size.

``--arch both`` (the default) measures both. The data is the same in every run: 256 training / 64 test images of
seeded random numbers with random labels. For each model:

- ``full``: a 1-round run without a ``[blockwise]`` table — the client trains the whole model;
- ``stage t``: one 4-round run with ``[blockwise] blocks = 4`` (blocks balanced by parameters + activations, the
  defaults: round-robin schedule, curriculum loss, co-adaptation of the previous block's last module); round r
  trains stage r, so round t's client trains block t (+ its output module) with blocks < t frozen (no autograd);
- ``naive t``: the same with naive block-wise training (λ₁ = λ₂ = 0: plain cross-entropy on the output module, no
  nHSIC terms; no co-adaptation; random output modules), to show what the curriculum mentor's loss costs in memory
  (its nHSIC(z_t, X) works on the flattened block output of the whole batch); ``--no-naive`` skips these runs;

and, shared by the measured models (each table shows the same floor samples):

- ``floor``: a 1-round run of a tiny CNN (one 4-channel conv, ReLU, max-pool, average pool, linear) on the same
  data — a client function that trains almost nothing, with the same kinds of layers (so the same torch kernels
  are paged in): the fixed cost of a client function (interpreter, torch, gradshard, task module, data, store).

How memory is measured: the value is the ``peak_rss_bytes`` of the round's ``train_client`` invocation in
``rounds/<r>/client_reports.json``, exactly what a run records and what a memory cap is checked against. The
LocalExecutor forks each invocation from a zygote process that has torch, numpy and gradshard already imported
(and one tiny training step done), and takes the larger of (a) its own samples of the worker's resident set
(psutil RSS, polled every 5 ms while the invocation runs) and (b) the worker's own peak, ``VmHWM`` from
``/proc/self/status`` (the kernel's resident high-water mark, reset by writing 5 to ``/proc/self/clear_refs`` when
the invocation starts; ``ru_maxrss`` only where /proc has no VmHWM). So it is the peak *resident set* of the whole
function process, which includes the pages of the interpreter and torch that the forked worker maps and touches,
not only the tensors training allocates. "minus floor" subtracts the median floor peak to isolate what training
this model adds. Torch's allocator statistics (``torch.cuda.max_memory_allocated``) exist only for CUDA tensors;
the clients here train on the CPU, where torch keeps no allocator statistics, so the resident set is the measure.

The allocator matters. On the CPU torch takes tensor memory from the C library's malloc (glibc here), whose
default mmap threshold is dynamic: after a large block is freed, later blocks up to its size come from the heap, and
freed heap memory is not always returned, so the peak resident set depends on how the heap fragments — the same
training step moves by 10-30 MiB from one process to the next (and repeats to ~0.1 MiB within one zygote's
children, whose heaps start identical). ``--malloc both`` (the default) therefore measures twice, interleaved:
``default`` (glibc as a deployed function runs it) and ``fixed`` (``MALLOC_MMAP_THRESHOLD_=--mmap-threshold``, 64
KiB by default, in the environment the zygote inherits: every large block is its own mapping, unmapped on free, so
the resident set follows the live tensors and the peak is reproducible).

Each repetition of ``--repeats`` runs every measurement once (floor, then per model full, stages 0-3, naive 0-3) per
malloc setting, each setting on a fresh LocalExecutor, so a fresh zygote; the ranges thus show the spread between
zygotes. The tables (one per model and malloc setting) give medians and [min, max]. "reduction" is
1 − stage / full; "training part" is the same above the floor, 1 − (stage − floor) / (full − floor). The memory a
client must have for block-wise training is the largest stage it may be given, so the largest stage's reduction is
printed separately.

The JSON has the shared settings at the top and ``archs``: model name -> ``{"model", "parameters", "malloc"}``,
where ``malloc`` maps each malloc setting to its table (``mmap_threshold``, ``zygote_rss_bytes``, ``samples_bytes``
including the shared floor, ``median_bytes``, ``reduction_vs_full``, ``reduction_above_floor``, ``largest_stage``).

    .venv/bin/python bench/blockwise_client_memory.py --json docs/img/blockwise_client_memory.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gradshard.fl.config import TrainConfig
from gradshard.fl.data import Dataset
from gradshard.fl.task import Task, TaskRef, parse_task
from gradshard.format.keys import client_reports_key
from gradshard.runtime import LocalExecutor
from gradshard.store import LocalStore

BLOCKS = 4
TRAIN, TEST, CLASSES = 256, 64, 10
MIB = 1 << 20
MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"
NAIVE = {"blocks": BLOCKS, "lambda_x": 0.0, "lambda_y": 0.0, "co_adapt": 0, "head_init": "random"}
log = logging.getLogger("bench.blockwise_client_memory")


# --- the task (imported by reference inside the client functions) --------------------------------------------------
def vgg(width: int = 32) -> nn.Sequential:
    """The VGG-style CNN of bench/blockwise_memory.py: 4 stages of two 3×3 convs + ReLU, max-pools between."""
    layers: list[nn.Module] = []
    channels = 3
    for s in range(4):
        out = width * 2**s
        layers += [nn.Conv2d(channels, out, 3, padding=1), nn.ReLU(), nn.Conv2d(out, out, 3, padding=1), nn.ReLU()]
        if s < 3:
            layers.append(nn.MaxPool2d(2))
        channels = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, CLASSES)]
    return nn.Sequential(*layers)


def uniform(width: int = 32, depth: int = 8) -> nn.Sequential:
    """Activations spread evenly: a stem conv 3→width, then ``depth`` × [conv width→width, ReLU], all at 32×32."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU()]
    for _ in range(depth):
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, CLASSES)]
    return nn.Sequential(*layers)


def tiny() -> nn.Sequential:
    """The floor's model: the same kinds of layers, next to no parameters or activations."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, CLASSES))


def images() -> tuple[Dataset, Dataset]:
    """256 train and 64 test 3×32×32 images of seeded standard-normal noise, random labels (memory needs shapes)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((TRAIN + TEST, 3, 32, 32), dtype=np.float32)
    y = rng.integers(0, CLASSES, TRAIN + TEST).astype(np.int64)
    return Dataset(x[:TRAIN], y[:TRAIN], CLASSES), Dataset(x[TRAIN:], y[TRAIN:], CLASSES)


def vgg_task(width: int = 32) -> Task:
    """The measured task (a factory: the run's reference carries ``width``)."""
    return Task(model=lambda: vgg(width), data=images, name=f"vgg-width{width}")


def uniform_task(width: int = 32) -> Task:
    """The uniform-resolution task (a factory: the run's reference carries ``width``)."""
    return Task(model=lambda: uniform(width), data=images, name=f"uniform-width{width}")


FLOOR_TASK = Task(model=tiny, data=images, name="floor")
# --arch name -> (task factory by name in this file, model builder, description for the tables)
ARCHS: dict[str, tuple[str, Callable[[int], nn.Sequential], str]] = {
    "vgg": ("vgg_task", vgg, "VGG-style CNN (channels doubling over 4 stages, max-pools between)"),
    "uniform": ("uniform_task", uniform, "uniform CNN (stem + 8 conv+ReLU, all at 32x32, no pooling until the end)"),
}


# --- measuring -----------------------------------------------------------------------------------------------------
def peaks(store: LocalStore, rounds: int) -> list[int]:
    """Round r -> the peak RSS of its (one) train_client invocation."""
    out = []
    for r in range(rounds):
        reports = json.loads(store.get(client_reports_key(r)))["reports"]
        if len(reports) != 1 or not reports[0]["ok"] or reports[0]["peak_rss_bytes"] is None:
            raise RuntimeError(f"round {r}: expected one successful client report with a peak, got {reports}")
        out.append(int(reports[0]["peak_rss_bytes"]))
    return out


def run(executor: LocalExecutor, task: Task | TaskRef, batch: int, blockwise: dict[str, Any] | None) -> list[int]:
    """A training run (1 round, or one per stage for block-wise) of one client; its peak RSS per round."""
    from gradshard.fl.driver import Trainer

    rounds = BLOCKS if blockwise is not None else 1
    config = TrainConfig.model_validate({"clients": 1, "per_round": 1, "rounds": rounds, "epochs": 1,
                                         "batch_size": batch, "lr": 0.01, "momentum": 0.9, "seed": 0,
                                         **({"blockwise": blockwise} if blockwise is not None else {})})
    with tempfile.TemporaryDirectory(prefix="bw-client-mem-") as root:
        store = LocalStore(root, fsync=False)
        Trainer(store, config, executor, task=task).run()
        return peaks(store, rounds)


def zygote_rss() -> int | None:
    """Resident set of the torch runtime's zygote (what the workers fork from), for context; None if not found."""
    import psutil

    me = psutil.Process()
    sizes = [p.memory_info().rss for p in me.children() if "gradshard.runtime.zygote" in " ".join(p.cmdline())
             and "torch" in " ".join(p.cmdline())]
    return max(sizes) if sizes else None


@contextlib.contextmanager
def malloc_env(threshold: int | None) -> Iterator[None]:
    """With ``threshold``: ``MALLOC_MMAP_THRESHOLD_`` in the environment the zygote (started on the first invocation)
    inherits, so glibc serves every allocation of at least that many bytes with its own mmap and unmaps it on free."""
    if threshold is None:
        yield
        return
    before = os.environ.get(MMAP_ENV)
    os.environ[MMAP_ENV] = str(threshold)
    try:
        yield
    finally:
        if before is None:
            del os.environ[MMAP_ENV]
        else:
            os.environ[MMAP_ENV] = before


def repetition(measured: dict[str, TaskRef], batch: int, naive: bool, floor: list[int],
               samples: dict[str, dict[str, list[int]]]) -> int | None:
    """One of each measurement (the shared floor, then every model's) on a fresh executor (so a fresh zygote); the
    zygote's RSS."""
    with LocalExecutor(workers=1) as executor:
        floor += run(executor, FLOOR_TASK, batch, None)
        for arch, task in measured.items():
            samples[arch]["full"] += run(executor, task, batch, None)
            for t, peak in enumerate(run(executor, task, batch, {"blocks": BLOCKS})):
                samples[arch][f"stage {t}"].append(peak)
            if naive:
                for t, peak in enumerate(run(executor, task, batch, NAIVE)):
                    samples[arch][f"naive {t}"].append(peak)
        return zygote_rss()


def report(title: str, samples: dict[str, list[int]], stages: list[str], naive: list[str]) -> dict[str, Any]:
    """Print one allocator setting's table; its summary for the JSON."""
    names = list(samples)
    med = {n: statistics.median(v) for n, v in samples.items()}
    floor, full = med["floor"], med["full"]
    print(title)
    print(f"{'':8} {'peak MiB':>9} {'range MiB':>15} {'minus floor':>12} {'reduction':>10} {'training part':>14}")
    for n in names:
        lo, hi = min(samples[n]) / MIB, max(samples[n]) / MIB
        red = "" if n == "floor" else f"{100 * (1 - med[n] / full):9.1f}%"
        part = "" if n in ("floor", "full") else f"{100 * (1 - (med[n] - floor) / (full - floor)):13.1f}%"
        print(f"{n:8} {med[n] / MIB:9.1f} {lo:7.1f}-{hi:<7.1f} {(med[n] - floor) / MIB:12.1f} {red:>10} {part:>14}")
    largest = {}
    for label, group in (("block-wise (defaults)", stages), ("naive block-wise", naive)):
        if group:
            worst = largest[label] = max(group, key=lambda n: med[n])
            print(f"{label}: largest stage ({worst}) {100 * (1 - med[worst] / full):.1f} % lower peak RSS than the "
                  f"full model ({100 * (1 - (med[worst] - floor) / (full - floor)):.1f} % lower above the floor)")
    print()
    return {"samples_bytes": samples, "median_bytes": med,
            "reduction_vs_full": {n: 1 - med[n] / full for n in names[2:]},
            "reduction_above_floor": {n: 1 - (med[n] - floor) / (full - floor) for n in names[2:]},
            "largest_stage": largest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["vgg", "uniform", "both"], default="both",
                        help="the measured model: VGG-style, uniform resolution, or both")
    parser.add_argument("--width", type=int, default=32, help="channels: VGG's first stage, uniform's every layer")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-naive", dest="naive", action="store_false", help="skip the naive block-wise runs")
    parser.add_argument("--malloc", choices=["default", "fixed", "both"], default="both",
                        help="glibc's default (dynamic mmap threshold), a fixed --mmap-threshold, or both")
    parser.add_argument("--mmap-threshold", type=int, default=65536, help="MALLOC_MMAP_THRESHOLD_ of 'fixed'")
    parser.add_argument("--json", type=Path, default=None, help="write the raw results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    # function processes import this file and call vgg_task(width=...) / uniform_task(width=...) there
    archs = list(ARCHS) if args.arch == "both" else [args.arch]
    measured = {a: parse_task(f"{Path(__file__).resolve()}:{ARCHS[a][0]}", {"width": args.width}) for a in archs}
    stages = [f"stage {t}" for t in range(BLOCKS)]
    naive = [f"naive {t}" for t in range(BLOCKS)] if args.naive else []
    settings = {"default": None, "fixed": args.mmap_threshold}
    chosen = list(settings) if args.malloc == "both" else [args.malloc]
    floor: dict[str, list[int]] = {m: [] for m in chosen}
    samples = {m: {a: {n: [] for n in ["full", *stages, *naive]} for a in archs} for m in chosen}
    zygote: dict[str, int | None] = {}
    started = time.perf_counter()
    for i in range(args.repeats):
        for m in chosen:  # interleaved: every setting once per repetition, each on a fresh zygote
            with malloc_env(settings[m]):
                zygote[m] = repetition(measured, args.batch, args.naive, floor[m], samples[m]) or zygote.get(m)
        log.warning("repeat %d/%d done (%.0f s)", i + 1, args.repeats, time.perf_counter() - started)
    wall = time.perf_counter() - started

    print(f"client function peak RSS (LocalExecutor: max of 5 ms RSS polls and the worker's VmHWM), {BLOCKS} blocks, "
          f"batch {args.batch} of 3x32x32, {TRAIN} examples, 1 epoch, SGD momentum 0.9; medians of {args.repeats} "
          f"(a fresh zygote each, floor shared by the models), CPU (torch keeps no allocator statistics there)\n")
    results: dict[str, Any] = {}
    for a in archs:
        _, build, description = ARCHS[a]
        params = sum(p.numel() for p in build(args.width).parameters())
        print(f"=== {a}: {description}, width {args.width}, {params:,} parameters ===\n")
        per_malloc = {}
        for m in chosen:
            title = ("glibc malloc as deployed (dynamic mmap threshold)" if settings[m] is None else
                     f"glibc malloc with {MMAP_ENV}={settings[m]} (fixed: large blocks unmapped on free)")
            if zygote.get(m) is not None:
                title += f"; the torch zygote the workers fork from: {zygote[m] / MIB:.1f} MiB resident"
            per_malloc[m] = {"mmap_threshold": settings[m], "zygote_rss_bytes": zygote.get(m),
                             **report(f"{a}, {title}", {"floor": floor[m], **samples[m][a]}, stages, naive)}
        results[a] = {"model": description, "parameters": params, "malloc": per_malloc}
    print(f"wall time {wall:.0f} s")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "what": "peak_rss_bytes of the train_client invocation (LocalExecutor: max of RSS polled every 5 ms and "
                    "the worker's VmHWM reset at invocation start); floor = a client training a tiny CNN, shared "
                    "by the models (the same samples in each model's table)",
            "width": args.width, "batch": args.batch, "blocks": BLOCKS, "train_examples": TRAIN, "epochs": 1,
            "repeats": args.repeats, "naive_config": NAIVE if args.naive else None,
            "archs": results, "wall_s": wall,
            "torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
        }, indent=1) + "\n")


if __name__ == "__main__":
    main()
