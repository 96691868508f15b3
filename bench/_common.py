"""Helpers shared by the benchmark scripts: logging, units, result files, memory and page-cache utilities.

Also the body of the fresh "Flower server" process (:func:`flower_child`): it imports only numpy, safetensors and
Flower, so its measured memory is what a Flower server holding the updates would use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
GB = 1e9
BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH_DIR / "out" / "aggregate.json"

log = logging.getLogger("bench")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname).1s %(message)s", datefmt="%H:%M:%S")


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def parse_size(text: str) -> int:
    """``1GiB``, ``512MiB``, ``64Mi``, ``2.5e9``, ``33554432`` -> an int (binary suffixes, or a plain number)."""
    t = text.strip()
    for suffix, mult in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB), ("Gi", GIB), ("Mi", MIB), ("Ki", KIB)):
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * mult)
    return int(float(t))


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def maxrss_bytes() -> int:
    """Peak resident set of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def vm_hwm_bytes() -> int:
    """Peak resident set of this process's current address space (``VmHWM``; starts afresh at exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_hwm() -> bool:
    """Reset ``VmHWM`` to the current resident set (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def free_disk_bytes(path: str | os.PathLike[str]) -> int:
    return shutil.disk_usage(path).free


def warm_files(paths: Iterable[Path], piece: int = 64 * MIB) -> int:
    """Read every file once so it sits in the page cache; returns the bytes read."""
    buf = bytearray(piece)
    view = memoryview(buf)
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def drop_from_page_cache(paths: Iterable[Path]) -> None:
    """Flush these files and ask the kernel to evict their pages (only ours; no global cache drop)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _cpu_jiffies() -> tuple[int, int]:
    """(total, idle) jiffies of all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    return sum(values), values[3] + values[4]


class CpuMeter:
    """How busy the whole machine was (all processes, 0..1 of all CPUs) between ``__enter__`` and ``__exit__``."""

    def __init__(self) -> None:
        self.busy = float("nan")
        self._start = (0, 0)

    def __enter__(self) -> CpuMeter:
        self._start = _cpu_jiffies()
        return self

    def __exit__(self, *exc: object) -> None:
        total, idle = _cpu_jiffies()
        d_total, d_idle = total - self._start[0], idle - self._start[1]
        self.busy = 1.0 - d_idle / d_total if d_total > 0 else float("nan")


def machine_busy(probe_s: float = 0.5) -> float:
    """Fraction of all CPUs busy over ``probe_s`` while this process sleeps (i.e. other processes' load)."""
    with CpuMeter() as meter:
        time.sleep(probe_s)
    return meter.busy


def wait_idle(max_wait_s: float, threshold: float = 0.1, probe_s: float = 0.5) -> float:
    """Wait (up to ``max_wait_s``) until other processes leave the CPUs idle; returns the last probe's busy fraction.

    The machine may be shared: a benchmark of two workers on two cores is meaningless while something else runs.
    """
    deadline = time.monotonic() + max_wait_s
    busy = machine_busy(probe_s)
    while busy > threshold and time.monotonic() < deadline:
        busy = machine_busy(probe_s)
    if busy > threshold:
        log.warning("the machine is busy with other processes (%.0f%% of all CPUs); timings will be noisy",
                    100 * busy)
    return busy


def best(times: list[float]) -> float:
    return min(times)


def write_section(out: Path, section: str, data: dict[str, Any]) -> None:
    """Merge ``{section: data}`` into the JSON result file (other sections from earlier runs are kept)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    merged: dict[str, Any] = {}
    if out.exists():
        try:
            merged = json.loads(out.read_text())
        except json.JSONDecodeError:
            merged = {}
    merged[section] = {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **data}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(merged, indent=1, default=str) + "\n")
    tmp.replace(out)


# --- the fresh Flower process --------------------------------------------------------------------------------------
def run_flower_process(request: dict[str, Any], timeout_s: float = 900.0) -> dict[str, Any]:
    """Run :func:`flower_child` in a fresh interpreter; ``request`` goes in on stdin, the result comes back as JSON."""
    code = f"import sys; sys.path.insert(0, {str(BENCH_DIR)!r}); from _common import flower_child; flower_child()"
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(request).encode(), capture_output=True,
                          timeout=timeout_s, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the Flower process failed ({proc.returncode}): {proc.stderr.decode()[-4000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    return result


def flower_child() -> None:
    """Load the updates as a Flower server holds them (lists of ndarrays), time one of Flower's aggregators, measure
    memory.

    Request: ``paths`` (safetensors files, canonical client order), ``examples``, ``names`` (tensor order),
    ``repeats``, ``result_path`` (where to save the flat float32 result as .npy), and optionally ``aggregator``:
    ``mean`` (``aggregate``, the default), ``median`` (``aggregate_median``) or ``trimmed-mean`` with
    ``proportiontocut`` (``aggregate_trimmed_avg``).

    Memory is the address space's high-water mark ``VmHWM``: ``ru_maxrss`` would be wrong here, because Linux
    carries it across ``exec`` from the parent (a process started by a 4 GiB benchmark reports >= 4 GiB). Both are
    returned; ``VmHWM`` is reset to the resident set after the imports, so "before loading" is the interpreter.
    """
    import numpy as np
    from flwr.server.strategy import aggregate as flower_aggregate
    from safetensors.numpy import load_file

    request = json.loads(sys.stdin.read())
    aggregate = _flower_aggregator(flower_aggregate, request.get("aggregator", "mean"),
                                   request.get("proportiontocut"), request.get("f"), request.get("k"))
    hwm_reset = reset_hwm()
    rss_interpreter = vm_hwm_bytes()  # numpy, safetensors and Flower imported, nothing loaded
    ru_interpreter = maxrss_bytes()
    t0 = time.perf_counter()
    results = []
    for path, n in zip(request["paths"], request["examples"], strict=True):
        tensors = load_file(path)
        results.append(([tensors[name] for name in request["names"]], int(n)))
        del tensors
    load_s = time.perf_counter() - t0
    rss_loaded = vm_hwm_bytes()
    times = []
    t = time.perf_counter()
    out = aggregate(results)
    times.append(time.perf_counter() - t)
    rss_first = vm_hwm_bytes()  # the peak of one aggregate call on top of the loaded updates
    ru_first = maxrss_bytes()
    for _ in range(int(request["repeats"]) - 1):
        del out
        t = time.perf_counter()
        out = aggregate(results)
        times.append(time.perf_counter() - t)
    flat = np.concatenate([np.ascontiguousarray(a).reshape(-1) for a in out])
    np.save(request["result_path"], flat)
    print(json.dumps({"times_s": times, "load_s": load_s, "rss_interpreter_bytes": rss_interpreter,
                      "rss_after_load_bytes": rss_loaded, "rss_peak_bytes": rss_first,
                      "rss_peak_all_repeats_bytes": vm_hwm_bytes(), "hwm_reset": hwm_reset,
                      "ru_maxrss_interpreter_bytes": ru_interpreter, "ru_maxrss_peak_bytes": ru_first,
                      "result_dtype": str(flat.dtype), "flwr_version": _flwr_version(),
                      "aggregator": request.get("aggregator", "mean")}))


def _flower_aggregator(module: Any, name: str, proportiontocut: float | None, f: int | None = None,
                       k: int | None = None) -> Any:
    """``results -> NDArrays``: Flower's function for ``mean``, ``median``, ``trimmed-mean`` (``proportiontocut``),
    ``krum`` (``f``), ``multi-krum`` (``f``, ``k``) or ``bulyan`` (``f``, Krum as its first rule)."""
    if name in ("krum", "multi-krum", "bulyan"):
        if f is None or (name == "multi-krum" and k is None):
            raise ValueError(f"aggregator {name!r} needs 'f'{' and k' if name == 'multi-krum' else ''}")
        if name == "bulyan":
            return lambda results: module.aggregate_bulyan(list(results), int(f), module.aggregate_krum, to_keep=0)
        return lambda results: module.aggregate_krum(results, int(f), int(k or 0))
    if name == "mean":
        return module.aggregate
    if name == "median":
        return module.aggregate_median
    if name == "trimmed-mean":
        if proportiontocut is None:
            raise ValueError("aggregator 'trimmed-mean' needs 'proportiontocut'")
        return lambda results: module.aggregate_trimmed_avg(results, float(proportiontocut))
    raise ValueError(f"unknown Flower aggregator {name!r}; known: mean, median, trimmed-mean, krum, multi-krum, "
                     "bulyan")


def _flwr_version() -> str:
    try:
        from importlib.metadata import version

        return version("flwr")
    except Exception:
        return "?"
