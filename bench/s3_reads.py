"""Concurrent ranged reads against a local S3 server: k ranged GETs per read vs one, measured in one run.

A moto S3 server (or, with ``--s3rver``, the Node server s3rver) runs in its own process on 127.0.0.1, so it does
not share this process's GIL, and waits ``--latency-ms`` before handling each request: a stand-in for a real
object store's time to first byte (a local server answers in about a millisecond, S3 in tens). Note that moto
copies the whole object for every ranged GET, under a lock per object, so with moto a ranged GET costs time in
proportion to the object's size; s3rver streams the range from a file. Then:

1. **Reads.** One object of ``--object-mib`` is read in windows of ``--window-mib`` through ``S3Store`` with
   ``read_concurrency`` k for every k in ``--ks`` (k = 1: one ranged GET per window, the sequential baseline),
   alternating over ``--repeats`` rounds; the median time per k and its speed-up over k = 1 are reported.
2. **A shard function.** A round of ``--clients`` updates of ``--params`` float32 elements is written to the
   store; one GradsSharding function (M = 1, a real worker process, ``--window-mib`` window) aggregates it with
   each k — k clients' windows read at once (``parallel_reads``), each read split into up to k ranged GETs —
   alternating; its measured duration and speed-up over k = 1, and every output's sha256 (they must all be
   equal) are reported.
3. **Streamed GETs.** The same function over ``--stream-clients`` clients with each client's range read by one
   streamed GET (``S3Store(max_streams=256)``, the default) and with one ranged GET per window (``max_streams=0``,
   the reader before streaming), alternating: GETs, duration, peak resident set, output sha256.
4. **Memory** (without added latency only): the peak resident set of a no-op function and of a shard function
   (M = 2, ``parallel_reads`` 1 and 4) on a local store and on S3, next to the plan's predicted need.

Figures go to stdout and to ``bench/out/s3_reads.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import BENCH_DIR, MIB, setup_logging, write_section

from gradshard.aggregation.compare import measure_baseline
from gradshard.aggregation.driver import AggregateConfig, aggregate_round
from gradshard.core.zoo import synthetic
from gradshard.demo.synthetic import make_round
from gradshard.runtime import LocalExecutor
from gradshard.store import LocalStore, S3Store, Store
from gradshard.store.s3 import DEFAULT_MAX_STREAMS

DEFAULT_OUT = BENCH_DIR / "out" / "s3_reads.json"
MOTO = """
import logging, sys, time
from werkzeug.serving import make_server
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
logging.getLogger("werkzeug").setLevel(logging.ERROR)
app, latency, rate = DomainDispatcherApplication(create_backend_app), float(sys.argv[1]), float(sys.argv[2])
def paced(body):  # at most `rate` bytes/s per response (sleeping releases the GIL: responses pace in parallel)
    for chunk in body:
        for lo in range(0, len(chunk), 65536):
            time.sleep(len(chunk[lo : lo + 65536]) / rate)
            yield chunk[lo : lo + 65536]
def delayed(environ, start_response):
    time.sleep(latency)
    body = app(environ, start_response)
    return paced(body) if rate > 0 else body
server = make_server("127.0.0.1", 0, delayed, threaded=True, request_handler=MotoRequestHandler)
print(server.server_port, flush=True)
server.serve_forever()
"""
S3RVER = """
const [module, directory, latency] = process.argv.slice(1);
const S3rver = require(module);
const handler = new S3rver({directory, silent: true, allowMismatchedSignatures: true, vhostBuckets: false}).callback();
const server = require("http").createServer((req, res) => setTimeout(() => handler(req, res), Number(latency)));
server.listen(0, "127.0.0.1", () => console.log(server.address().port));
"""


def start_server(s3rver: str | None, data_dir: Path, latency_s: float,
                 stream_rate: float) -> tuple[subprocess.Popen[str], str]:
    """moto (default) or s3rver (a Node S3 server that serves ranges from files, given its module directory) in
    their own process, waiting ``latency_s`` before handling each request; moto also sends each response at most
    ``stream_rate`` bytes/s (0: as fast as it can)."""
    if s3rver is None:
        command = [sys.executable, "-c", MOTO, str(latency_s), str(stream_rate)]
    else:
        if stream_rate:
            raise SystemExit("--stream-mb-s is only implemented for moto")
        command = ["node", "-e", S3RVER, s3rver, str(data_dir), str(latency_s * 1000)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, f"http://127.0.0.1:{proc.stdout.readline().strip()}"


def store_with(base: S3Store, k: int, max_streams: int = DEFAULT_MAX_STREAMS) -> S3Store:
    return S3Store(base.bucket, base.prefix, endpoint_url=base.endpoint_url, read_concurrency=k,
                   min_range_bytes=MIB, max_streams=max_streams)


def bench_reads(base: S3Store, ks: list[int], object_bytes: int, window: int, repeats: int) -> dict[str, Any]:
    base.put("bench/object", np.random.default_rng(0).integers(0, 256, object_bytes, dtype=np.uint8).tobytes())
    buf = memoryview(bytearray(window))
    times: dict[int, list[float]] = {k: [] for k in ks}
    for _ in range(repeats):
        for k in ks:
            store = store_with(base, k)
            with store.open_reader("bench/object") as reader:
                started = time.perf_counter()
                for offset in range(0, object_bytes, window):
                    reader.read_into(offset, buf[: min(window, object_bytes - offset)])
                times[k].append(time.perf_counter() - started)
            store.close()
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {"object_bytes": object_bytes, "window_bytes": window,
            "runs": {str(k): {"median_s": medians[k], "MB_per_s": object_bytes / medians[k] / 1e6,
                              "speedup_vs_sequential": medians[ks[0]] / medians[k]} for k in ks}}


def bench_shard_function(base: S3Store, ks: list[int], params: int, clients: int, window: int,
                         repeats: int) -> dict[str, Any]:
    make_round(base, 1, synthetic(params), clients, seed=1)
    durations: dict[int, list[float]] = {k: [] for k in ks}
    digests: set[str] = set()
    with LocalExecutor(workers=1, retries=0) as executor:
        for _ in range(repeats):
            for k in ks:
                store = store_with(base, k)
                config = AggregateConfig(topology="sharded", shards=1, window_bytes=window, parallel_reads=k)
                result = aggregate_round(store, 1, executor, config)
                durations[k].append(result.reports[0].duration_s)
                digests.add(hashlib.sha256(store.get(result.output_key)).hexdigest())
    if len(digests) != 1:
        raise SystemExit(f"outputs differ between read concurrencies: {digests}")
    medians = {k: statistics.median(v) for k, v in durations.items()}
    read = params * 4 * clients
    return {"params": params, "clients": clients, "window_bytes": window, "output_sha256": digests.pop(),
            "runs": {str(k): {"median_s": medians[k], "read_MB_per_s": read / medians[k] / 1e6,
                              "speedup_vs_sequential": medians[ks[0]] / medians[k]} for k in ks}}


def bench_streams(base: S3Store, params: int, clients: int, window: int, repeats: int) -> dict[str, Any]:
    """One shard function (M = 1) over ``clients``: streamed GETs vs one ranged GET per window, alternating."""
    make_round(base, 3, synthetic(params), clients, seed=3)
    modes = {"streamed": DEFAULT_MAX_STREAMS, "per_window": 0}
    runs: dict[str, dict[str, list[float]]] = {m: {"s": [], "gets": [], "peak": []} for m in modes}
    digests: set[str] = set()
    with LocalExecutor(workers=1, retries=0) as executor:
        for _ in range(repeats):
            for mode, streams in modes.items():
                store = store_with(base, 1, streams)
                result = aggregate_round(store, 3, executor, AggregateConfig(shards=1, window_bytes=window))
                report = result.reports[0]
                runs[mode]["s"].append(report.duration_s)
                runs[mode]["gets"].append(report.gets)
                runs[mode]["peak"].append(report.peak_rss_bytes or 0)
                digests.add(hashlib.sha256(store.get(result.output_key)).hexdigest())
    if len(digests) != 1:
        raise SystemExit(f"outputs differ between streamed and per-window reads: {digests}")
    out: dict[str, Any] = {"params": params, "clients": clients, "window_bytes": window,
                           "output_sha256": digests.pop()}
    for mode, r in runs.items():
        out[mode] = {"median_s": statistics.median(r["s"]), "gets": max(r["gets"]), "peak_bytes": max(r["peak"])}
    out["time_ratio_streamed_vs_per_window"] = out["streamed"]["median_s"] / out["per_window"]["median_s"]
    return out


CLIENT_START = """
import json, time
t0 = time.perf_counter()
from gradshard.store import s3
s3.warm_up()  # import boto3 and load the S3 model: what a runtime's zygote does once
t1 = time.perf_counter()
s3._boto_session().client("s3", region_name="us-east-1")  # what every forked function does after that
print(json.dumps({"cold_s": t1 - t0, "warm_client_s": time.perf_counter() - t1}))
"""


def bench_client_start() -> dict[str, float]:
    """Seconds to import boto3 and make the first S3 client in a fresh interpreter, and one more client after."""
    done = subprocess.run([sys.executable, "-c", CLIENT_START], capture_output=True, text=True, check=True)
    result: dict[str, float] = json.loads(done.stdout)
    return result


def bench_memory(base: S3Store, local_dir: Path, params: int, clients: int) -> dict[str, Any]:
    """Peak resident set of a no-op function and of shard functions (M = 2, parallel_reads 1 and 4), on a local
    store and on S3, next to the plan's prediction (which does not know the store)."""
    out: dict[str, Any] = {}
    stores: dict[str, Store] = {"local": LocalStore(local_dir, fsync=False), "s3": store_with(base, 4)}
    for name, store in stores.items():
        baseline = max(measure_baseline(store) for _ in range(3))
        with LocalExecutor(workers=1) as executor:
            make_round(store, 2, synthetic(params), clients, seed=2)
            runs = {}
            for k in (1, 4):
                result = aggregate_round(store, 2, executor, AggregateConfig(shards=2, parallel_reads=k))
                runs[str(k)] = {"peak_bytes": max(r.peak_rss_bytes or 0 for r in result.reports),
                                "predicted_bytes": max(i.memory_bytes for i in result.plan.invocations)}
        out[name] = {"noop_peak_bytes": baseline, "parallel_reads": runs}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", default="1,2,4,8", help="read concurrencies to compare; the first is the baseline")
    parser.add_argument("--latency-ms", type=float, default=0.0,
                        help="the server waits this long before handling each request (0: none)")
    parser.add_argument("--stream-mb-s", type=float, default=0.0,
                        help="moto sends each response at most this fast, MB/s (0: unpaced); S3 gives one stream "
                             "~50-90 MB/s, the paper measured 48 MB/s from Lambda")
    parser.add_argument("--object-mib", type=int, default=16)
    parser.add_argument("--window-mib", type=int, default=4)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--stream-clients", type=int, default=32)
    parser.add_argument("--stream-params", type=int, default=2_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--s3rver", default=None,
                        help="directory of the s3rver module (npm install s3rver@3: node_modules/s3rver) to use "
                        "instead of moto")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    setup_logging()
    key = "S3RVER" if args.s3rver else "bench"  # s3rver knows one key pair
    os.environ.update(AWS_ACCESS_KEY_ID=key, AWS_SECRET_ACCESS_KEY=key)
    ks = [int(k) for k in args.ks.split(",")]
    scratch = tempfile.TemporaryDirectory(prefix="s3-bench-")
    server, endpoint = start_server(args.s3rver, Path(scratch.name), args.latency_ms / 1000, args.stream_mb_s * 1e6)
    try:
        base = S3Store(f"bench-{os.getpid()}", "run", endpoint_url=endpoint)
        base.create_bucket()
        window = args.window_mib * MIB
        reads = bench_reads(base, ks, args.object_mib * MIB, window, args.repeats)
        function = bench_shard_function(base, ks, args.params, args.clients, window, args.repeats)
        streams = bench_streams(base, args.stream_params, args.stream_clients, 512 * 1024, args.repeats)
        memory = None if args.latency_ms or args.stream_mb_s or args.s3rver else \
            bench_memory(base, Path(scratch.name) / "local", 8_000_000, 6)
        client_start = bench_client_start()
    finally:
        server.terminate()
        server.wait(timeout=10)
        scratch.cleanup()
    name = "s3rver" if args.s3rver else "moto"
    section = f"{name}_latency_{args.latency_ms:g}ms_stream_{args.stream_mb_s:g}MBs"
    write_section(args.out, section, {"server": name, "latency_ms": args.latency_ms,
                                      "stream_MB_per_s": args.stream_mb_s, "reads": reads, "shard_function": function,
                                      "streams": streams, "memory": memory,
                                      "client_start": client_start})
    pace = f", each response paced at {args.stream_mb_s:g} MB/s" if args.stream_mb_s else ""
    print(f"S3 reads against {name} in its own process, {args.latency_ms:g} ms added latency per request{pace}, "
          f"window {args.window_mib} MiB, ranges >= 1 MiB:")
    for title, result in (("read one object", reads), ("one shard function (M = 1)", function)):
        print(f"  {title}:")
        for k, run in result["runs"].items():
            print(f"    k = {k}: {run['median_s'] * 1000:8.1f} ms   {run['speedup_vs_sequential']:.2f}x vs k = 1")
    print(f"  one shard function over {streams['clients']} clients of {streams['params']:,} float32, 512 KiB windows:")
    for mode in ("streamed", "per_window"):
        run = streams[mode]
        print(f"    {mode:10s}: {run['median_s'] * 1000:8.1f} ms  {run['gets']:5d} GETs  peak "
              f"{run['peak_bytes'] / MIB:6.1f} MiB")
    print(f"    streamed / per-window time: {streams['time_ratio_streamed_vs_per_window']:.2f}x (same output bytes)")
    print(f"  boto3 import + first S3 client: {client_start['cold_s']:.2f} s; another client after that: "
          f"{client_start['warm_client_s'] * 1000:.0f} ms")
    if memory is not None:
        print("  memory, 8 M params x 6 clients, M = 2 (peak resident set; predicted: the plan's need above it):")
        for store_name, m in memory.items():
            for k, run in m["parallel_reads"].items():
                print(f"    {store_name:5s} no-op {m['noop_peak_bytes'] / MIB:6.1f} MiB   parallel_reads {k}: shard "
                      f"{run['peak_bytes'] / MIB:6.1f} MiB ({(run['peak_bytes'] - m['noop_peak_bytes']) / MIB:5.1f} "
                      f"above no-op; predicted {run['predicted_bytes'] / MIB:5.1f})")


if __name__ == "__main__":
    main()
