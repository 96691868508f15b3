"""Peak training memory of block-wise stages vs the full model, measured in fresh processes (issue 15).

A sequential CNN (VGG-style, ``--width`` channels doubling per stage, 32×32 inputs, 10 classes) is split into
``--blocks`` blocks. Each measurement runs in its own fresh Python process: it builds the model, runs ``--steps``
SGD steps (momentum 0.9) on a batch of ``--batch`` random images, and reports its peak resident set (VmHWM) minus
the same process's resident set just before training (model built, data made) — the memory training itself adds.
Blocks are balanced by parameters plus activations (``--split memory``, the default) or by parameters only.
"full" trains the whole model; "stage t" trains block t (plus its co-adapted neighbour and output module) with the
earlier blocks frozen (no autograd), via :class:`gradshard.blockwise.blocks.StageModel`. Alternating over
``--repeats`` rounds; medians. Also printed: the analytic estimate :func:`stage_memory_bytes`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r'''
import json, sys, resource
import torch
from torch import nn
from gradshard.blockwise.blocks import StageModel, child_sizes, output_module, split_sequential, stage_memory_bytes

width, blocks, batch, steps, stage, by_memory = (int(a) for a in sys.argv[1:7])
torch.manual_seed(0)
torch.set_num_threads(1)
layers = []
channels = 3
for s in range(4):
    out = width * 2 ** s
    layers += [nn.Conv2d(channels, out, 3, padding=1), nn.ReLU(), nn.Conv2d(out, out, 3, padding=1), nn.ReLU()]
    if s < 3:
        layers.append(nn.MaxPool2d(2))
    channels = out
layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10)]
model = nn.Sequential(*layers)
x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
split = split_sequential(model, blocks, child_sizes(model, x) if by_memory else None)

def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

if stage < 0:
    params, forward = list(model.parameters()), lambda: model(x)
    estimate = stage_memory_bytes(model, split_sequential(model, [0, len(layers)]), 0, x, 10)
else:
    probe = StageModel(model, split, stage, nn.Identity())
    with torch.no_grad():
        z = probe.features(x)
    head = output_module(z, 10, layers[-1])
    staged = StageModel(model, split, stage, head)
    params, forward = staged.parameters(), lambda: staged(x)[1]
    estimate = stage_memory_bytes(model, split, stage, x, 10)
opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = rss()
for _ in range(steps):
    opt.zero_grad()
    loss = nn.functional.cross_entropy(forward(), y)
    loss.backward()
    opt.step()
with open("/proc/self/status") as f:
    peak = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
print(json.dumps({"added": peak - before, "estimate": estimate, "bounds": list(split.bounds)}))
'''


def measure(width: int, blocks: int, batch: int, steps: int, stage: int, by_memory: bool) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(width), str(blocks), str(batch), str(steps), str(stage),
                          str(int(by_memory))],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--split", choices=["memory", "params"], default="memory",
                        help="balance blocks by parameters + activations (child_sizes) or by parameters only")
    args = parser.parse_args()
    names = ["full"] + [f"stage {t}" for t in range(args.blocks)]
    samples: dict[str, list[int]] = {n: [] for n in names}
    estimates: dict[str, int] = {}
    for _ in range(args.repeats):
        for i, name in enumerate(names):
            result = measure(args.width, args.blocks, args.batch, args.steps, i - 1, args.split == "memory")
            samples[name].append(result["added"])
            estimates[name] = result["estimate"]
    full = statistics.median(samples["full"])
    print(f"VGG-style CNN, width {args.width}, {args.blocks} blocks (balanced by {args.split}), batch {args.batch} "
          f"of 3x32x32, {args.steps} SGD steps, fresh process each, medians of {args.repeats}")
    print(f"{'':10} {'added RSS MiB':>14} {'range':>17} {'vs full':>8} {'estimate MiB':>13}")
    for name in names:
        med = statistics.median(samples[name])
        lo, hi = min(samples[name]) / 2**20, max(samples[name]) / 2**20
        print(f"{name:10} {med / 2**20:14.1f} {lo:8.1f}-{hi:<8.1f} {med / full:8.2f} {estimates[name] / 2**20:13.1f}")
    worst = max(statistics.median(samples[n]) for n in names[1:])
    print(f"largest stage vs full model: {worst / full:.2f} ({100 * (1 - worst / full):.1f} % lower peak)")


if __name__ == "__main__":
    main()
