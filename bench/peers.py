"""Peers benchmark (issue 16, "an honest benchmark"): weighted FedAvg end to end, gradshard against its peers.

On the **same files** — N client updates written once with ``gradshard.demo.synthetic.make_round`` into a scratch
``LocalStore`` directory — every contender computes the example-weighted mean **from the store to a written
aggregate file**, each measurement in a **fresh process**, the contenders **interleaved** (one run of each per
repeat, the order rotated from repeat to repeat), and every time is reported as a **paired ratio** to the
hand-written loop of the same repeat (median and range over the repeats).

Contenders (``--contenders``):

``gradshard-api``
    a fresh process creates ``LocalStore(root)`` (default ``fsync=True``) and ``LocalExecutor(workers=2)``, starts
    the function runtime and waits for it (``executor.prestart(["shard_reduce"], store, wait=True)``: the row
    **runtime cold start**, the zygote's interpreter and imports), then calls
    ``aggregate_round(store, 0, executor, AggregateConfig(shards=M))``: the row **(started)**, a first round on a
    running runtime. **(cold)** is the two together: what the first call of a fresh process costs. Then, in the same
    process, ``aggregate_round`` on round 1 (a second round of the same size written up front): **(warm)**.
    ``--shards`` defaults to ``auto``, the library's default (one shard per worker: 2 here); per-function peak RSS
    comes from the invocation reports.
``gradshard-cli``
    ``gradshard aggregate --store DIR --round 0 --shards M --workers 2`` as a command: its whole wall time,
    interpreter start and imports included. (The CLI re-aggregates a round whose aggregate exists; the aggregate is
    deleted, untimed, before every run anyway, so every run writes a new object like the first.)
``flower-aggregate``
    Flower's ``flwr.server.strategy.aggregate.aggregate``: load every update (safetensors -> a list of numpy
    arrays per client, as a Flower server holds them), call ``aggregate([(arrays, examples), ...])``, write the
    result with ``safetensors.numpy.save_file``.
``flower-aggregate-inplace``
    Flower's ``aggregate_inplace`` (what ``FedAvg`` calls by default): each update is loaded and serialised with
    ``ndarrays_to_parameters`` into a ``FitRes`` (the arrays are then dropped: a server holds the serialised
    ``Parameters``), then ``aggregate_inplace`` deserialises and folds them; the result is written the same way.
``nvflare-streaming`` / ``nvflare-preloaded``
    NVFlare 2.9's ``WeightedAggregationHelper`` (installed by this script into its own virtualenv,
    ``bench/out/nvflare-venv``; skipped with the reason if that fails): ``add()`` one client at a time as it is
    loaded, or load all first and then ``add()`` all; ``get_result()``; written the same way.
``handwritten``
    the baseline: 2 threads, each owning half of the elements, ``os.preadv`` windows of 4 MiB from every file in
    canonical client order into one buffer, ``acc = w_0·x_0; acc += w_i·x_i`` in float32 with the same float32
    weights gradshard uses (``n_i / Σn`` in float64, rounded once), each thread ``os.pwrite``-ing its half of the
    output (a safetensors header in layout order, then the data).
``read-add-bound``
    the same 2-thread loop without weights and without writing: read and add only (a ceiling, not an aggregator).

Fairness rules:

* Times are taken inside each fresh process from just before its first read (after its imports) to its output
  being written **and fsynced** (gradshard's ``LocalStore`` fsyncs what it publishes by default, so every
  contender's output is fsynced too; ``--no-fsync`` turns that off for the others, never for gradshard). Imports are
  timed separately. ``gradshard-cli`` is the exception: a command's time is its whole run.
* The inputs are read once up front (untimed), so every contender reads them **from the page cache**; interleaving
  keeps that the same for all. This measures aggregation from memory-speed reads, not a disk.
* Peak memory of a Python contender is its own ``VmHWM`` (reset after the imports; "above interp." is the peak
  minus the resident set at that point). gradshard's work happens in worker processes: its rows show the driver's
  own peak and, separately, the largest per-function peak from the reports. For the CLI the peak is ``ru_maxrss``
  of the command's process tree (``RUSAGE_CHILDREN`` of a small wrapper).
* Agreement: every output is read back (after the timing and memory were taken) and compared with a float64
  reference computed once by this script; "== hw" says whether its float32 bits equal the hand-written loop's.
* gradshard does work the others do not: it validates every header and the round's manifest, verifies every
  chunk checksum of every input, checks values are finite, computes the output's chunk checksums, and writes a
  manifest and a reports object.

``--large`` adds VGG-16 (134.3 M float32, 537 MB per client) with N = 20 (10.7 GB of inputs per round) if the disk
has room; contenders that hold every update in memory are skipped when their estimated peak exceeds 70% of the
memory available, and gradshard's warm round is left out when two rounds would not fit the page cache. At that size
the inputs only just fit the page cache of a 24 GiB machine: a contender that preloads every update evicts part of
them, and whoever runs next reads some from disk (the rotation spreads that over the contenders; say so when you
quote such numbers). The scratch store is removed at the end; results go to stdout and ``--json``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    BENCH_DIR,
    GIB,
    MIB,
    CpuMeter,
    fmt_bytes,
    free_disk_bytes,
    reset_hwm,
    setup_logging,
    vm_hwm_bytes,
    wait_idle,
    warm_files,
)

log = logging.getLogger("bench")

CONTENDERS = ("gradshard-api", "gradshard-cli", "flower-aggregate", "flower-aggregate-inplace", "nvflare-streaming",
              "nvflare-preloaded", "handwritten", "read-add-bound")
NVFLARE = ("nvflare-streaming", "nvflare-preloaded")
BASELINE = "handwritten"
DEFAULT_SIZES = "resnet18:4,resnet18:16,resnet18:64"
LARGE_SIZE = "vgg16:20"
DEFAULT_JSON = BENCH_DIR / "out" / "peers.json"
NVFLARE_VENV = BENCH_DIR / "out" / "nvflare-venv"
NVFLARE_SPEC = "nvflare==2.9.*"
HW_WINDOW_BYTES = 4 * MIB
R_COLD, R_WARM = 0, 1
DISK_MARGIN = 2 * GIB
EXAMPLES_KEY = "gradshard.examples"


# --- safetensors headers (stdlib + numpy only: also runs in the NVFlare virtualenv) ---------------------------------
def read_header(fd: int) -> tuple[dict[str, Any], int]:
    """(parsed JSON header, data start offset) of an open safetensors file."""
    (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    raw = os.pread(fd, n, 8)
    if len(raw) != n:
        raise OSError(f"short header read ({len(raw)} of {n} bytes)")
    return json.loads(raw), 8 + n


def header_of(path: str | Path) -> tuple[dict[str, Any], int]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return read_header(fd)
    finally:
        os.close(fd)


def flat_ranges(header: dict[str, Any], names: list[str]) -> list[tuple[int, int]]:
    """Byte ranges (relative to the data start) of ``names``, all float32."""
    out = []
    for name in names:
        entry = header[name]
        if entry["dtype"] != "F32":
            raise ValueError(f"tensor {name} is {entry['dtype']}, expected F32")
        a, b = entry["data_offsets"]
        out.append((int(a), int(b)))
    return out


def contiguous_in_order(header: dict[str, Any], names: list[str]) -> bool:
    """Whether the data section is the flat float32 vector in layout order (gradshard's files are)."""
    pos = 0
    for a, b in flat_ranges(header, names):
        if a != pos:
            return False
        pos = b
    return True


def safetensors_header(names: list[str], shapes: list[list[int]]) -> bytes:
    """A safetensors header (length prefix included) for float32 tensors stored in this order, padded to 8."""
    pos, body = 0, {}
    for name, shape in zip(names, shapes, strict=True):
        size = 4 * int(np.prod(shape, dtype=np.int64))
        body[name] = {"dtype": "F32", "shape": shape, "data_offsets": [pos, pos + size]}
        pos += size
    raw = json.dumps(body, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def read_exact(fd: int, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n <= 0:
            raise OSError(f"short read at offset {offset + done}")
        done += n


def fsync_path(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify_output(path: str | Path, names: list[str], ref_path: str, window: int = 4 << 20) -> dict[str, Any]:
    """sha256 of the float32 data in layout order and max |out - ref| against the float64 reference (streamed)."""
    header, start = header_of(path)
    ref = np.load(ref_path, mmap_mode="r")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    digest = hashlib.sha256()
    max_abs, max_ref, pos, nonfinite = 0.0, 0.0, 0, 0
    for a, b in flat_ranges(header, names):
        part = data[start + a : start + b].view(np.float32)
        digest.update(part)
        for lo in range(0, len(part), window):
            x = np.asarray(part[lo : lo + window], dtype=np.float64)
            r = ref[pos + lo : pos + lo + len(x)]
            nonfinite += int(np.count_nonzero(~np.isfinite(x)))
            max_abs = max(max_abs, float(np.max(np.abs(x - r))))
            max_ref = max(max_ref, float(np.max(np.abs(r))))
        pos += len(part)
    if pos != len(ref):
        raise ValueError(f"output has {pos} elements, the reference {len(ref)}")
    return {"sha256_data": digest.hexdigest(), "max_abs_diff_vs_f64": max_abs, "max_abs_ref": max_ref,
            "nonfinite": nonfinite, "elements": pos}


# --- children --------------------------------------------------------------------------------------------------------
class Phases:
    """Named wall-clock phases of a timed region."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.last = self.t0
        self.phases: dict[str, float] = {}

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = self.phases.get(name, 0.0) + now - self.last
        self.last = now

    @property
    def total(self) -> float:
        return self.last - self.t0


def load_client(path: str, names: list[str]) -> tuple[list[Any], int]:
    """One update as a Flower/NVFlare server holds it: a list of numpy arrays (layout order) and its example count."""
    from safetensors import safe_open

    with safe_open(path, "np") as f:
        examples = int((f.metadata() or {})[EXAMPLES_KEY])
        return [f.get_tensor(name) for name in names], examples


def write_result(out_path: str, names: list[str], arrays: list[Any], fsync: bool) -> None:
    from safetensors.numpy import save_file

    save_file({name: np.ascontiguousarray(a) for name, a in zip(names, arrays, strict=True)}, out_path)
    if fsync:
        fsync_path(out_path)


def child_flower(req: dict[str, Any], inplace: bool) -> dict[str, Any]:
    t = time.perf_counter()
    from flwr.server.strategy.aggregate import aggregate, aggregate_inplace

    if inplace:
        from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    import_s = time.perf_counter() - t
    names = req["names"]
    reset_hwm()
    rss_interp = vm_hwm_bytes()
    ph = Phases()
    if not inplace:
        results = []
        for path in req["paths"]:
            results.append(load_client(path, names))
        ph.mark("load")
        rss_loaded = vm_hwm_bytes()
        out = aggregate(results)
        ph.mark("aggregate")
    else:
        fit_results = []
        for path in req["paths"]:
            arrays, examples = load_client(path, names)
            ph.mark("load")
            params = ndarrays_to_parameters(arrays)
            del arrays  # the server holds the serialised Parameters, as received
            fit_results.append((None, FitRes(status=Status(code=Code.OK, message=""), parameters=params,
                                             num_examples=examples, metrics={})))
            ph.mark("serialise")
        rss_loaded = vm_hwm_bytes()
        out = aggregate_inplace(fit_results)  # type: ignore[arg-type]  # the ClientProxy is never used
        ph.mark("aggregate")
    from importlib.metadata import version

    return write_and_report(req, names, out, ph, import_s, rss_interp, rss_loaded, version=version("flwr"))


def child_nvflare(req: dict[str, Any], preload: bool) -> dict[str, Any]:
    t = time.perf_counter()
    from nvflare.app_common.aggregators.weighted_aggregation_helper import WeightedAggregationHelper

    import_s = time.perf_counter() - t
    names = req["names"]
    reset_hwm()
    rss_interp = vm_hwm_bytes()
    ph = Phases()
    helper = WeightedAggregationHelper()
    rss_loaded = None
    if preload:
        loaded = []
        for path in req["paths"]:
            arrays, examples = load_client(path, names)
            loaded.append((dict(zip(names, arrays, strict=True)), examples))
        ph.mark("load")
        rss_loaded = vm_hwm_bytes()
        for i, (data, examples) in enumerate(loaded):
            helper.add(data, weight=examples, contributor_name=f"client-{i:04d}", contribution_round=0)
        ph.mark("aggregate")
    else:
        for i, path in enumerate(req["paths"]):
            arrays, examples = load_client(path, names)
            ph.mark("load")
            helper.add(dict(zip(names, arrays, strict=True)), weight=examples, contributor_name=f"client-{i:04d}",
                       contribution_round=0)
            del arrays
            ph.mark("aggregate")
    result = helper.get_result()
    out = [result[name] for name in names]
    ph.mark("aggregate")
    import nvflare

    return write_and_report(req, names, out, ph, import_s, rss_interp, rss_loaded, version=nvflare.__version__,
                            numpy_version=np.__version__)


def write_and_report(req: dict[str, Any], names: list[str], out: list[Any], ph: Phases, import_s: float,
                     rss_interp: int, rss_loaded: int | None, **extra: Any) -> dict[str, Any]:
    """Write a peer's result (timed as its ``write`` phase) and the child's JSON record."""
    dtype = str(out[0].dtype)
    write_result(req["out_path"], names, out, req["fsync"])
    ph.mark("write")
    return {"e2e_s": ph.total, "phases": ph.phases, "import_s": import_s, "rss_interp_bytes": rss_interp,
            "rss_after_load_bytes": rss_loaded, "peak_rss_bytes": vm_hwm_bytes(), "result_dtype": dtype, **extra}


def child_loop(req: dict[str, Any], weighted: bool) -> dict[str, Any]:
    """The hand-written 2-thread pread + multiply-add loop (``weighted``), or the read-and-add bound."""
    names, shapes, threads = req["names"], req["shapes"], int(req["threads"])
    reset_hwm()
    rss_interp = vm_hwm_bytes()
    ph = Phases()
    fds, starts, examples = [], [], []
    try:
        for path in req["paths"]:
            fd = os.open(path, os.O_RDONLY)
            fds.append(fd)
            header, start = read_header(fd)
            if not contiguous_in_order(header, names):
                raise ValueError(f"{path}: data is not the flat vector in layout order")
            starts.append(start)
            examples.append(int(header["__metadata__"][EXAMPLES_KEY]))
        total = float(sum(examples))
        weights = [np.float32(n / total) for n in examples]  # gradshard's: float64 quotient, rounded once
        numel = sum(int(np.prod(s, dtype=np.int64)) for s in shapes)
        win = max(1, int(req["window_bytes"]) // 4)
        out_fd, head = -1, b""
        if weighted:
            head = safetensors_header(names, shapes)
            out_fd = os.open(req["out_path"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.ftruncate(out_fd, len(head) + 4 * numel)
            os.pwrite(out_fd, head, 0)
        ph.mark("open")
        errors: list[BaseException] = []

        def work(k: int) -> None:
            try:
                lo, hi = numel * k // threads, numel * (k + 1) // threads
                acc = np.empty(win, dtype=np.float32)
                x = np.empty(win, dtype=np.float32)
                for a in range(lo, hi, win):
                    n = min(win, hi - a)
                    av, xv = acc[:n], x[:n]
                    for i, fd in enumerate(fds):
                        if i == 0 and not weighted:
                            read_exact(fd, memoryview(av).cast("B"), starts[i] + 4 * a)
                            continue
                        read_exact(fd, memoryview(xv).cast("B"), starts[i] + 4 * a)
                        if not weighted:
                            np.add(av, xv, out=av)
                        elif i == 0:
                            np.multiply(xv, weights[0], out=av)
                        else:
                            np.multiply(xv, weights[i], out=xv)
                            np.add(av, xv, out=av)
                    if weighted:
                        mv = memoryview(av).cast("B")
                        done = 0
                        while done < len(mv):
                            done += os.pwrite(out_fd, mv[done:], len(head) + 4 * a + done)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        pool = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
        for th in pool:
            th.start()
        for th in pool:
            th.join()
        if errors:
            raise errors[0]
        ph.mark("reduce")
        if weighted:
            if req["fsync"]:
                os.fsync(out_fd)
            os.close(out_fd)
            ph.mark("write")
    finally:
        for fd in fds:
            os.close(fd)
    return {"e2e_s": ph.total, "phases": ph.phases, "import_s": 0.0, "rss_interp_bytes": rss_interp,
            "peak_rss_bytes": vm_hwm_bytes(), "result_dtype": "float32"}


def _per_function(reports: list[Any]) -> dict[str, Any]:
    peaks = [r.peak_rss_bytes or 0 for r in reports]
    return {"fn_peak_rss_bytes": max(peaks), "fn_durations_s": [r.duration_s for r in reports],
            "fn_peaks_rss_bytes": peaks, "invocations": len(reports)}


def child_gradshard_api(req: dict[str, Any]) -> dict[str, Any]:
    t = time.perf_counter()
    from gradshard.aggregation.driver import AggregateConfig, aggregate_round
    from gradshard.runtime import LocalExecutor
    from gradshard.runtime.diagnostics import NoArgs
    from gradshard.store import LocalStore
    from gradshard.topology import Invocation, Plan

    import_s = time.perf_counter() - t
    reset_hwm()
    rss_interp = vm_hwm_bytes()
    shards = req["shards"] if req["shards"] == "auto" else int(req["shards"])
    cfg = AggregateConfig(shards=shards)
    t0 = time.perf_counter()
    store = LocalStore(req["root"])
    executor = LocalExecutor(workers=2)
    try:
        executor.prestart(["shard_reduce"], store, wait=True)
        started_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        cold = aggregate_round(store, R_COLD, executor, cfg)
        round_s = time.perf_counter() - t1
        rss_cold = vm_hwm_bytes()
        out: dict[str, Any] = {"e2e_s": started_s + round_s, "import_s": import_s, "rss_interp_bytes": rss_interp,
                               "peak_rss_bytes": rss_cold, "driver_wall_s": cold.wall_s,
                               **_per_function(cold.reports), "result_dtype": "float32", "m": cold.plan.params["m"],
                               "ok": all(r.ok for r in cold.reports) and not cold.manifest.rejected}
        out["runtime_start"] = {"e2e_s": started_s, "peak_rss_bytes": rss_cold, "ok": True}
        out["started"] = {"e2e_s": round_s, "peak_rss_bytes": rss_cold, "driver_wall_s": cold.wall_s,
                          **_per_function(cold.reports), "ok": out["ok"]}
        if req.get("warm_round"):
            t1 = time.perf_counter()
            warm = aggregate_round(store, R_WARM, executor, cfg)
            warm_s = time.perf_counter() - t1
            out["warm"] = {"e2e_s": warm_s, "peak_rss_bytes": vm_hwm_bytes(), "driver_wall_s": warm.wall_s,
                           **_per_function(warm.reports),
                           "ok": all(r.ok for r in warm.reports) and not warm.manifest.rejected}
        (noop,) = executor.run(Plan("noop", (Invocation("noop", "noop", NoArgs(), 0),)), store)
        out["noop_fn_peak_rss_bytes"] = noop.peak_rss_bytes
    finally:
        executor.close()
    out["children_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    from importlib.metadata import version

    out["version"] = version("gradshard")
    return out


def child_gradshard_cli(req: dict[str, Any]) -> dict[str, Any]:
    """A thin wrapper: runs the ``gradshard aggregate`` command, times it whole, reads its reports."""
    reports = Path(req["reports_path"])
    cmd = [req["gradshard_bin"], "aggregate", "--store", req["root"], "--round", str(R_COLD), "--shards",
           str(req["shards"]), "--workers", "2", "--reports", str(reports)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, check=False, env={**os.environ, "COLUMNS": "150"})
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"gradshard aggregate failed ({proc.returncode}): {proc.stdout.decode()[-2000:]} "
                           f"{proc.stderr.decode()[-2000:]}")
    data = json.loads(reports.read_text())
    peaks = [r.get("peak_rss_bytes") or 0 for r in data["reports"]]
    return {"e2e_s": wall, "import_s": None, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            * 1024, "peak_is": "ru_maxrss of the command's process tree", "driver_wall_s": data["summary"]["wall_s"],
            "fn_peak_rss_bytes": max(peaks), "fn_durations_s": [r["duration_s"] for r in data["reports"]],
            "invocations": len(peaks), "command": " ".join(cmd), "result_dtype": "float32"}


def child_main() -> None:
    req = json.loads(sys.stdin.read())
    kind = req["contender"]
    if kind == "gradshard-api":
        res = child_gradshard_api(req)
    elif kind == "gradshard-cli":
        res = child_gradshard_cli(req)
    elif kind in ("flower-aggregate", "flower-aggregate-inplace"):
        res = child_flower(req, inplace=kind.endswith("inplace"))
    elif kind in NVFLARE:
        res = child_nvflare(req, preload=kind == "nvflare-preloaded")
    elif kind in ("handwritten", "read-add-bound"):
        res = child_loop(req, weighted=kind == "handwritten")
    else:
        raise SystemExit(f"unknown contender {kind!r}")
    # agreement, after the timing and the memory were taken
    if req.get("out_path"):
        res["verify"] = verify_output(req["out_path"], req["names"], req["ref_path"])
    if "warm" in res and req.get("warm_out_path"):
        res["warm"]["verify"] = verify_output(req["warm_out_path"], req["names"], req["warm_ref_path"])
    print(json.dumps({"contender": kind, **res}))


# --- the parent ------------------------------------------------------------------------------------------------------
def parse_sizes(text: str) -> list[tuple[str, int]]:
    out = []
    for item in text.split(","):
        if item.strip():
            model, _, n = item.strip().partition(":")
            out.append((model, int(n)))
    return out


def ensure_nvflare(venv: Path) -> dict[str, Any]:
    """A virtualenv with NVFlare 2.9 (and this environment's numpy and safetensors): reused if it works."""
    py = venv / "bin" / "python"
    probe = ["-c", "import nvflare, numpy, safetensors; print(nvflare.__version__, numpy.__version__)"]

    def works() -> str | None:
        if not py.exists():
            return None
        p = subprocess.run([str(py), *probe], capture_output=True, check=False, timeout=120)
        text = p.stdout.decode().split()
        return " ".join(text) if p.returncode == 0 and text and text[0].startswith("2.9.") else None

    found = works()
    if found:
        log.info("NVFlare: reusing %s (nvflare, numpy: %s)", venv, found)
        return {"ok": True, "python": str(py), "installed_now": False, "versions": found}
    from importlib.metadata import version

    pins = [f"numpy=={version('numpy')}", f"safetensors=={version('safetensors')}"]
    log.info("NVFlare: creating %s and installing %s with %s (this takes a minute)", venv, NVFLARE_SPEC, pins)
    t = time.perf_counter()
    shutil.rmtree(venv, ignore_errors=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
        errors = []
        for extra in (pins, ["numpy", "safetensors"]):
            p = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", NVFLARE_SPEC,
                                *extra], capture_output=True, check=False, timeout=900)
            if p.returncode == 0:
                break
            errors.append(p.stderr.decode()[-1500:])
            log.warning("pip install %s %s failed: %s", NVFLARE_SPEC, extra, errors[-1][-400:])
    except (OSError, subprocess.SubprocessError) as exc:
        errors = [f"{type(exc).__name__}: {exc}"]
    found = works()
    if not found:
        return {"ok": False, "reason": "; ".join(errors)[-2000:] or "nvflare did not import after installing"}
    log.info("NVFlare: installed in %.0f s (nvflare, numpy: %s)", time.perf_counter() - t, found)
    return {"ok": True, "python": str(py), "installed_now": True, "versions": found,
            "install_s": time.perf_counter() - t}


def float64_reference(paths: list[Path], names: list[str], numel: int, out: Path, step: int = 8 << 20) -> None:
    """The weighted mean in float64, one client and one window at a time, saved as .npy."""
    ref = np.zeros(numel, dtype=np.float64)
    examples = []
    for path in paths:
        header, start = header_of(path)
        if not contiguous_in_order(header, names):
            raise ValueError(f"{path}: data is not the flat vector in layout order")
        n = int(header["__metadata__"][EXAMPLES_KEY])
        examples.append(n)
        x = np.memmap(path, dtype=np.float32, mode="r", offset=start, shape=(numel,))
        for a in range(0, numel, step):
            ref[a : a + step] += n * x[a : a + step].astype(np.float64)
        del x
    ref /= float(sum(examples))
    np.save(out, ref)


def memory_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def memory_estimate(contender: str, n: int, nbytes: int) -> int:
    """A rough peak of one run (bytes), to skip contenders that would exhaust the machine at --large sizes."""
    return {"flower-aggregate": 2 * n * nbytes + 2 * nbytes, "flower-aggregate-inplace": n * nbytes + 4 * nbytes,
            "nvflare-preloaded": n * nbytes + 4 * nbytes, "nvflare-streaming": 5 * nbytes}.get(contender, 0)


def run_child(python: str, req: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    t = time.perf_counter()
    with CpuMeter() as meter:
        proc = subprocess.run([python, str(Path(__file__).resolve()), "--child"], input=json.dumps(req).encode(),
                              capture_output=True, timeout=timeout_s, check=False)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {proc.stderr.decode()[-3000:]}")
    res: dict[str, Any] = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    res["process_wall_s"] = wall
    res["busy_during"] = meter.busy
    return res


def paired(times: dict[int, float], base: dict[int, float]) -> dict[str, Any] | None:
    ratios = [times[k] / base[k] for k in sorted(times) if k in base and base[k] > 0]
    if not ratios:
        return None
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "ratios": ratios}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per row (contender, and gradshard-api's warm round): times, paired ratios to handwritten, memory, agreement."""
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    for run in runs:
        if "error" in run:
            continue
        name = run["contender"]
        if name == "gradshard-api":
            rows.setdefault("gradshard-api (cold)", {})[run["repeat"]] = run
            for part, row in (("runtime_start", "runtime cold start"), ("started", "gradshard-api (started)"),
                              ("warm", "gradshard-api (warm)")):
                if part in run:
                    rows.setdefault(row, {})[run["repeat"]] = {**run[part], "import_s": run["import_s"],
                                                               "rss_interp_bytes": None,
                                                               "busy_during": run["busy_during"],
                                                               **({"verify": run["verify"]} if part == "started"
                                                                  and "verify" in run else {})}
        else:
            rows.setdefault(name, {})[run["repeat"]] = run
    base = {k: r["e2e_s"] for k, r in rows.get(BASELINE, {}).items()}
    gs = {k: r["e2e_s"] for k, r in rows.get("gradshard-api (cold)", {}).items()}
    started = {k: r["e2e_s"] for k, r in rows.get("gradshard-api (started)", {}).items()}
    base_sha = next((r["verify"]["sha256_data"] for r in rows.get(BASELINE, {}).values() if "verify" in r), None)
    out: dict[str, Any] = {}
    for row, by_repeat in rows.items():
        times = {k: r["e2e_s"] for k, r in by_repeat.items()}
        any_run = next(iter(by_repeat.values()))
        phases: dict[str, float] = {}
        for key in any_run.get("phases", {}):
            phases[key] = statistics.median(r["phases"].get(key, 0.0) for r in by_repeat.values())
        if not phases and any_run.get("fn_durations_s"):  # gradshard: the driver's own clock, the slowest function
            phases["driver"] = statistics.median(r["driver_wall_s"] for r in by_repeat.values())
            phases["slowest fn"] = statistics.median(max(r["fn_durations_s"]) for r in by_repeat.values())
        verify = [r["verify"] for r in by_repeat.values() if "verify" in r]
        imports = [r["import_s"] for r in by_repeat.values() if r.get("import_s") is not None]
        interp = [r["rss_interp_bytes"] for r in by_repeat.values() if r.get("rss_interp_bytes")]
        fn = [r["fn_peak_rss_bytes"] for r in by_repeat.values() if r.get("fn_peak_rss_bytes")]
        out[row] = {
            "repeats": len(times), "times_s": [times[k] for k in sorted(times)],
            "median_s": statistics.median(times.values()), "vs_handwritten": paired(times, base),
            "gradshard_cold_speedup": paired(times, gs) if not _ours(row) else None,
            "gradshard_started_speedup": paired(times, started) if not _ours(row) else None,
            "phases_median_s": phases, "import_s_median": statistics.median(imports) if imports else None,
            "peak_rss_bytes_max": max(r["peak_rss_bytes"] for r in by_repeat.values()),
            "rss_interp_bytes_median": statistics.median(interp) if interp else None,
            "fn_peak_rss_bytes_max": max(fn) if fn else None,
            "children_maxrss_bytes_max": max((r["children_maxrss_bytes"] for r in by_repeat.values()
                                              if r.get("children_maxrss_bytes")), default=None),
            "max_abs_diff_vs_f64": max((v["max_abs_diff_vs_f64"] for v in verify), default=None),
            "max_abs_ref": max((v["max_abs_ref"] for v in verify), default=None),
            "sha256_data": sorted({v["sha256_data"] for v in verify}),
            "bit_identical_to_handwritten": (all(v["sha256_data"] == base_sha for v in verify)
                                             if verify and base_sha and row not in ("read-add-bound",
                                                                                    "gradshard-api (warm)",
                                                                                    "runtime cold start") else None),
            "busy_during_median": statistics.median(r.get("busy_during", float("nan"))
                                                    for r in by_repeat.values()),
            "result_dtype": any_run.get("result_dtype"), "version": any_run.get("version"),
        }
        if row == "gradshard-api (warm)":
            out[row]["note"] = "round 1 (same size, other synthetic values): its float64 reference is round 1's"
    return out


def _ours(row: str) -> bool:
    return row.startswith("gradshard-api") or row == "runtime cold start"


def bench_size(args: argparse.Namespace, model: str, n: int, root: Path, contenders: list[str],
               nvflare: dict[str, Any]) -> dict[str, Any]:
    from gradshard.core.zoo import get_layout
    from gradshard.demo.synthetic import make_round
    from gradshard.format.keys import aggregate_key, update_key
    from gradshard.store import LocalStore

    layout = get_layout(model).aggregated()
    names = [s.name for s in layout]
    shapes = [list(s.shape) for s in layout]
    info: dict[str, Any] = {"model": model, "clients": n, "params": layout.numel, "update_bytes": layout.nbytes,
                            "input_bytes": n * layout.nbytes, "shards": args.shards, "repeats": args.repeats}
    free = free_disk_bytes(root)
    one_round = n * layout.nbytes + 2 * layout.nbytes  # inputs, gradshard's aggregate, one other output
    warm_round = "gradshard-api" in contenders
    if free < one_round + DISK_MARGIN:
        msg = (f"skipped: not enough free disk in {root}: {fmt_bytes(free)} free, one round needs "
               f"{fmt_bytes(one_round + DISK_MARGIN)}")
        log.warning("%s x %d: %s", model, n, msg)
        return {**info, "skipped": msg}
    if warm_round and free < 2 * one_round + DISK_MARGIN:
        log.warning("%s x %d: disk room for one round only: gradshard-api's warm round is not measured", model, n)
        warm_round = False
    avail = memory_available()
    if warm_round and 2 * n * layout.nbytes > avail // 2:
        log.warning("%s x %d: two rounds of inputs (%s) would not stay in the page cache: gradshard-api's warm round "
                    "is not measured", model, n, fmt_bytes(2 * n * layout.nbytes))
        warm_round = False
    info["warm_round"] = warm_round
    skipped: dict[str, str] = {}
    runnable = []
    for c in contenders:
        need = memory_estimate(c, n, layout.nbytes)
        if need > 0.7 * avail:
            skipped[c] = (f"its estimated peak {fmt_bytes(need)} exceeds 70% of the memory available "
                          f"({fmt_bytes(avail)})")
            log.warning("%s x %d: skipping %s: %s", model, n, c, skipped[c])
        elif c in NVFLARE and not nvflare.get("ok"):
            skipped[c] = f"NVFlare is not installed: {nvflare.get('reason', '?')}"
        else:
            runnable.append(c)
    info["skipped_contenders"] = skipped

    store_dir = root / f"{model}-{n}"
    writer = LocalStore(store_dir, fsync=False)  # scratch inputs need no durability
    t = time.perf_counter()
    log.info("%s x %d: writing %s of updates (%s each) with make_round%s", model, n, fmt_bytes(n * layout.nbytes),
             fmt_bytes(layout.nbytes), " (twice: rounds 0 and 1)" if warm_round else "")
    _, clients = make_round(writer, R_COLD, layout, n)
    if warm_round:
        make_round(writer, R_WARM, layout, n)
    info["generate_s"] = time.perf_counter() - t
    paths = [store_dir / update_key(R_COLD, c) for c in sorted(clients)]
    warm_paths = [store_dir / update_key(R_WARM, c) for c in sorted(clients)]
    refs = {R_COLD: root / f"ref-{model}-{n}-0.npy", R_WARM: root / f"ref-{model}-{n}-1.npy"}
    t = time.perf_counter()
    float64_reference(paths, names, layout.numel, refs[R_COLD])
    if warm_round:
        float64_reference(warm_paths, names, layout.numel, refs[R_WARM])
    log.info("%s x %d: written in %.1f s, float64 references in %.1f s; reading every input once so all contenders "
             "read them from the page cache", model, n, info["generate_s"], time.perf_counter() - t)
    warm_files(paths + (warm_paths if warm_round else []))
    outputs = root / "outputs"
    outputs.mkdir(exist_ok=True)
    common = {"paths": [str(p) for p in paths], "names": names, "shapes": shapes, "ref_path": str(refs[R_COLD]),
              "fsync": args.fsync, "threads": 2, "window_bytes": HW_WINDOW_BYTES, "shards": args.shards,
              "root": str(store_dir), "gradshard_bin": str(Path(sys.executable).parent / "gradshard")}
    runs: list[dict[str, Any]] = []
    for rep in range(args.repeats):
        order = runnable[rep % len(runnable):] + runnable[: rep % len(runnable)]
        log.info("%s x %d: repeat %d/%d, order %s", model, n, rep + 1, args.repeats, ", ".join(order))
        for c in order:
            for key in (aggregate_key(R_COLD), aggregate_key(R_WARM)):  # untimed: every run writes a new object
                writer.delete(key)
            req = {**common, "contender": c}
            out_path = outputs / f"{c}.safetensors"
            if c == "gradshard-api":
                req.update(out_path=str(store_dir / aggregate_key(R_COLD)), warm_round=warm_round)
                if warm_round:
                    req.update(warm_out_path=str(store_dir / aggregate_key(R_WARM)), warm_ref_path=str(refs[R_WARM]))
            elif c == "gradshard-cli":
                req.update(out_path=str(store_dir / aggregate_key(R_COLD)),
                           reports_path=str(outputs / "cli-reports.json"))
            elif c != "read-add-bound":
                req["out_path"] = str(out_path)
            python = nvflare["python"] if c in NVFLARE else sys.executable
            busy_before = wait_idle(args.wait_idle, args.idle_threshold) if args.wait_idle > 0 else float("nan")
            try:
                res = run_child(python, req, args.timeout)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                log.error("%s x %d: %s failed: %s", model, n, c, str(exc)[-1500:])
                res = {"contender": c, "error": str(exc)[-3000:]}
            res.update(repeat=rep, position=order.index(c), busy_before=busy_before)
            runs.append(res)
            if "e2e_s" in res:
                warm = f", warm {res['warm']['e2e_s']:.3f} s" if "warm" in res else ""
                log.info("  %-26s %.3f s%s (busy before %.0f%%, during %.0f%%)", c, res["e2e_s"], warm,
                         100 * busy_before, 100 * res["busy_during"])
            out_path.unlink(missing_ok=True)
    shutil.rmtree(store_dir, ignore_errors=True)
    for ref in refs.values():
        ref.unlink(missing_ok=True)
    shutil.rmtree(outputs, ignore_errors=True)
    return {**info, "runs": runs, "summary": summarise(runs)}


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x / MIB:,.0f}"


def print_size(d: dict[str, Any], fsync: bool) -> None:
    head = (f"\n== {d['model']} x N={d['clients']}: {d['params']:,} float32 ({d['update_bytes'] / 1e6:.1f} MB) per "
            f"client, {d['input_bytes'] / 1e6:,.0f} MB of input")
    if "skipped" in d:
        print(f"{head}\n   {d['skipped']}")
        return
    used = sorted({str(r["m"]) for r in d["runs"] if r.get("m")})
    m = f"{d['shards']} (= {', '.join(used)})" if d["shards"] == "auto" and used else d["shards"]
    print(f"{head}; {d['repeats']} repeat(s), interleaved, fresh process each; M={m}; inputs in the page "
          f"cache; outputs fsynced: gradshard always, others {'yes' if fsync else 'no'}")
    print(f"   {'contender':<26} {'median s':>8} {'x handwritten: median [min-max]':>32} {'imports':>7} "
          f"{'peak MiB':>8} {'-interp':>7} {'fn peak':>7} {'max|d| f64':>10} {'== hw':>5}  phases (median s)")
    summary = d["summary"]
    order = ["runtime cold start", "gradshard-api (cold)", "gradshard-api (started)", "gradshard-api (warm)",
             *[c for c in CONTENDERS if c != "gradshard-api"]]
    for row in [r for r in order if r in summary]:
        s = summary[row]
        v = s["vs_handwritten"]
        ratio = f"{v['median']:6.2f} [{v['min']:.2f}-{v['max']:.2f}]" if v else "-"
        imp = "-" if s["import_s_median"] is None else f"{s['import_s_median']:.2f}"
        above = (None if s["rss_interp_bytes_median"] is None
                 else s["peak_rss_bytes_max"] - s["rss_interp_bytes_median"])
        diff = "-" if s["max_abs_diff_vs_f64"] is None else f"{s['max_abs_diff_vs_f64']:.2e}"
        same = {True: "yes", False: "no", None: "-"}[s["bit_identical_to_handwritten"]]
        phases = " ".join(f"{k} {v:.3f}" for k, v in s["phases_median_s"].items())
        print(f"   {row:<26} {s['median_s']:8.3f} {ratio:>32} {imp:>7} {_mb(s['peak_rss_bytes_max']):>8} "
              f"{_mb(above):>7} {_mb(s['fn_peak_rss_bytes_max']):>7} {diff:>10} {same:>5}  {phases}")
    for c, why in d.get("skipped_contenders", {}).items():
        print(f"   {c:<26} skipped: {why}")
    for run in d["runs"]:
        if "error" in run:
            print(f"   {run['contender']:<26} FAILED in repeat {run['repeat'] + 1}: {run['error'][-300:]}")
    for which in ("cold", "started"):
        peers = [(r, summary[r][f"gradshard_{which}_speedup"]) for r in order if r in summary
                 and summary[r].get(f"gradshard_{which}_speedup")]
        if peers:
            print(f"   gradshard-api ({which}) vs each contender, paired (their time / gradshard's; > 1: gradshard "
                  "faster): " + "; ".join(f"{r} {p['median']:.2f} [{p['min']:.2f}-{p['max']:.2f}]"
                                          for r, p in peers))
    busy = [r.get("busy_before") for r in d["runs"] if r.get("busy_before") == r.get("busy_before")]
    if busy:
        print(f"   machine load before the runs (all CPUs, other processes): median "
              f"{100 * statistics.median(busy):.0f}%, max {100 * max(busy):.0f}%")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help="model:N pairs (zoo layouts), comma-separated")
    ap.add_argument("--large", action="store_true", help=f"also {LARGE_SIZE} (10.7 GB of inputs; disk checked)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shards", default="auto", help="gradshard's M: a number, or auto (the library's default: "
                                                      "one per worker)")
    ap.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated; handwritten is always run")
    ap.add_argument("--quick", action="store_true", help="smoke test: resnet18 N=4, 1 repeat")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--fsync", action=argparse.BooleanOptionalAction, default=True,
                    help="fsync the other contenders' outputs too (gradshard's LocalStore always does)")
    ap.add_argument("--nvflare-venv", type=Path, default=NVFLARE_VENV)
    ap.add_argument("--wait-idle", type=float, default=10.0,
                    help="before each run wait up to this many seconds for the (shared) machine to be idle; 0: no")
    ap.add_argument("--idle-threshold", type=float, default=0.15)
    ap.add_argument("--timeout", type=float, default=1800.0, help="per child process, seconds")
    ap.add_argument("--tmp-dir", default=tempfile.gettempdir(), help="parent of the scratch store")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats = "resnet18:4", 1
    if args.large:
        args.sizes += "," + LARGE_SIZE
    return args


def byte_compile_gradshard() -> bool:
    """Byte-compile gradshard's sources, as installing its wheel does: otherwise, where ``PYTHONDONTWRITEBYTECODE``
    is set (or the source tree is read-only), every fresh process and every function runtime recompiles gradshard
    from source, and the cold start measures the compiler. True if every module compiled."""
    import compileall

    import gradshard

    return bool(compileall.compile_dir(str(Path(gradshard.__file__).parent), quiet=1))


def main(argv: list[str] | None = None) -> None:
    if "--child" in sys.argv[1:]:
        child_main()
        return
    args = parse_args(argv)
    setup_logging(args.verbose)
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = [c for c in contenders if c not in CONTENDERS]
    if unknown:
        raise SystemExit(f"unknown contenders {unknown}; known: {', '.join(CONTENDERS)}")
    if BASELINE not in contenders:
        contenders.append(BASELINE)
    started = time.perf_counter()
    compiled = byte_compile_gradshard()
    nvflare: dict[str, Any] = {"ok": False, "reason": "not requested"}
    if any(c in NVFLARE for c in contenders):
        nvflare = ensure_nvflare(args.nvflare_venv)
        if not nvflare["ok"]:
            print(f"NVFlare could not be installed ({NVFLARE_SPEC}); nvflare-streaming and nvflare-preloaded are "
                  f"skipped. Why: {nvflare['reason'][-800:]}")
    root = Path(tempfile.mkdtemp(prefix="gradshard-peers-", dir=args.tmp_dir))
    log.info("scratch directory %s", root)
    results: dict[str, Any] = {
        "what": "weighted FedAvg end to end (store -> written aggregate), fresh process per measurement, contenders "
                "interleaved, ratios paired with the hand-written 2-thread loop of the same repeat",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpus": os.cpu_count(),
        "mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "python": sys.version.split()[0], "numpy": np.__version__, "nvflare": nvflare,
        "gradshard_byte_compiled": compiled,
        "settings": {"sizes": args.sizes, "repeats": args.repeats, "shards": args.shards, "contenders": contenders,
                     "fsync_others": args.fsync, "handwritten_window_bytes": HW_WINDOW_BYTES,
                     "wait_idle_s": args.wait_idle, "idle_threshold": args.idle_threshold},
        "notes": ["inputs are read once before the runs: every contender reads them from the page cache",
                  "e2e_s: inside the fresh process, after imports, until the output is written (and fsynced); "
                  "gradshard-cli: the whole command",
                  "gradshard-api warm: a second round (round 1, same size) in the same process and executor",
                  "gradshard validates headers, manifest, every chunk checksum and finiteness; writes manifest and "
                  "reports; the others do none of that"],
        "sizes": []}
    try:
        for model, n in parse_sizes(args.sizes):
            d = bench_size(args, model, n, root, contenders, nvflare)
            results["sizes"].append(d)
            print_size(d, args.fsync)
            sys.stdout.flush()
    finally:
        shutil.rmtree(root, ignore_errors=True)
        log.info("removed the scratch directory %s", root)
    results["wall_s"] = time.perf_counter() - started
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_name(f".{args.json.name}.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
    tmp.replace(args.json)
    print(f"\nwall {results['wall_s']:.0f} s; results written to {args.json}")


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
