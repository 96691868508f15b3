"""The Lambda path on this machine: the deployment package, and a round through the invoke contract vs locally.

1. ``write_aws_deployment`` builds the vendored ``package.zip`` from this environment (glibc check off: this is
   local emulation, not a package for Amazon Linux); its size, entries and build time are reported.
2. Each round (``--rounds`` as params:clients:shards) is aggregated with a ``LocalExecutor`` and with a
   ``LambdaExecutor`` talking to the local Invoke-API emulator of the tests (``tests/lambda_emulator.py``: every call
   runs the handler from the unzipped package in a fresh isolated interpreter, ``--interpreter`` if given); per
   invocation wall time and the function's own ``duration_s`` (medians), the largest peak resident set, and whether
   the two aggregates are the same bytes.

These are emulator figures: a cold interpreter on every call. They say nothing about Lambda's own start times.
Figures go to stdout and to ``bench/out/lambda_emulated.json``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from _common import BENCH_DIR, MIB, setup_logging, write_section

from gradshard.aggregation.driver import AggregateConfig, aggregate_round
from gradshard.core.zoo import synthetic
from gradshard.demo.synthetic import make_round
from gradshard.deploy.aws import write_aws_deployment
from gradshard.runtime import Executor, InvocationReport, LocalExecutor
from gradshard.runtime.aws_lambda import LambdaExecutor
from gradshard.store import LocalStore

sys.path.insert(0, str(BENCH_DIR.parent / "tests"))
from lambda_emulator import Function, LambdaEmulator  # the tests' emulator (tests/ is not a package)

DEFAULT_OUT = BENCH_DIR / "out" / "lambda_emulated.json"


def summarise(reports: list[InvocationReport]) -> dict[str, Any]:
    return {"invocations": len(reports), "wall_s_median": statistics.median(r.wall_s for r in reports),
            "duration_s_median": statistics.median(r.duration_s for r in reports),
            "peak_rss_bytes_max": max(r.peak_rss_bytes or 0 for r in reports)}


def run_round(root: Path, params: int, clients: int, shards: int, local: Executor,
              remote: Executor) -> dict[str, Any]:
    make_round(LocalStore(root / "local", fsync=False), 0, synthetic(params), clients, seed=3)
    shutil.copytree(root / "local", root / "lambda")
    config = AggregateConfig(topology="sharded", shards=shards)
    out: dict[str, Any] = {"params": params, "clients": clients, "shards": shards}
    blobs = {}
    for name, executor in (("local", local), ("lambda", remote)):
        store = LocalStore(root / name, fsync=False)
        result = aggregate_round(store, 0, executor, config)
        out[name] = summarise(result.reports)
        blobs[name] = store.get(result.output_key)
    out["identical"] = blobs["local"] == blobs["lambda"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", default="300000:5:3,20000000:5:4", help="params:clients:shards, comma-separated")
    parser.add_argument("--interpreter", default=sys.executable, help="the Python the emulated function runs on")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    setup_logging()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    with tempfile.TemporaryDirectory(prefix="lambda-bench-") as scratch:
        root = Path(scratch)
        started = time.perf_counter()
        deployment = write_aws_deployment(root / "deploy", memory_mb=2048, check_glibc=False)
        build_s = time.perf_counter() - started
        with zipfile.ZipFile(deployment.package) as archive:
            entries, unzipped = len(archive.infolist()), sum(i.file_size for i in archive.infolist())
            archive.extractall(root / "package")
        package = {"zip_bytes": deployment.package.stat().st_size, "entries": entries, "unzipped_bytes": unzipped,
                   "build_s": build_s}
        function = Function("bench", root / "package", memory_mb=2048, timeout_s=300.0, interpreter=args.interpreter)
        rounds = []
        with LambdaEmulator({"bench": function}) as emulator, LocalExecutor(workers=2, retries=0) as local:
            remote = LambdaExecutor("bench", endpoint_url=emulator.endpoint_url, region="us-east-1", workers=2,
                                    retries=0, allow_local_store=True)
            for i, spec in enumerate(args.rounds.split(",")):
                params, clients, shards = (int(x) for x in spec.split(":"))
                rounds.append(run_round(root / f"round{i}", params, clients, shards, local, remote))
    write_section(args.out, "emulator", {"interpreter": args.interpreter, "package": package, "rounds": rounds})
    print(f"package.zip (vendored): {package['zip_bytes']:,} bytes, {entries:,} entries, "
          f"{unzipped / 1e6:.1f} MB unzipped, built in {build_s:.1f} s")
    for r in rounds:
        print(f"{r['params']:,} params, {r['clients']} clients, M = {r['shards']}: identical={r['identical']}")
        for name in ("local", "lambda"):
            s = r[name]
            print(f"  {name:6s}: per invocation {s['wall_s_median']:.3f} s wall, {s['duration_s_median']:.3f} s "
                  f"in the function, peak {s['peak_rss_bytes_max'] / MIB:.1f} MiB")
        ratio = r["lambda"]["wall_s_median"] / r["local"]["wall_s_median"]
        print(f"  lambda / local wall per invocation: {ratio:.2f}x")


if __name__ == "__main__":
    main()
