"""Tests of the LocalExecutor: measured memory, memory caps, timeouts, crashes, concurrency and I/O counters.

Every invocation here runs in a worker process forked from the executor's zygote, so all tests are integration
tests. Executors are created through the ``make_executor`` fixture, which closes them at teardown.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from gradshard.aggregation.driver import AggregateConfig, aggregate_round
from gradshard.core.zoo import synthetic
from gradshard.errors import GradshardError
from gradshard.format.keys import update_key
from gradshard.format.round import RoundSpec, open_round
from gradshard.format.update import UpdateMeta
from gradshard.format.writer import write_update
from gradshard.runtime import InvocationReport, LocalExecutor, registry
from gradshard.runtime.diagnostics import AllocateArgs
from gradshard.runtime.local import ResidentProbe
from gradshard.store import LocalStore
from gradshard.topology.base import Invocation, Plan
from gradshard.units import MIB

pytestmark = pytest.mark.integration

MakeExecutor = Callable[..., LocalExecutor]


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store", fsync=False)


@pytest.fixture
def make_executor() -> Iterator[MakeExecutor]:
    """Builds LocalExecutors with the given options; every one is closed when the test ends."""
    made: list[LocalExecutor] = []

    def make(**options: Any) -> LocalExecutor:
        executor = LocalExecutor(**options)
        made.append(executor)
        return executor

    yield make
    for executor in made:
        executor.close()


@pytest.fixture(scope="module")
def baseline_rss(tmp_path_factory: pytest.TempPathFactory) -> int:
    """Peak RSS of a function that does nothing (the interpreter baseline), the largest of three runs."""
    scratch = LocalStore(tmp_path_factory.mktemp("baseline"), fsync=False)
    with LocalExecutor(workers=1, retries=0) as executor:
        peaks = [run_single(executor, scratch, "noop").peak_rss_bytes for _ in range(3)]
    assert all(p is not None for p in peaks)
    return max(p for p in peaks if p is not None)


def run_single(executor: LocalExecutor, store: LocalStore, function: str,
               args: dict[str, Any] | None = None) -> InvocationReport:
    """Run one ad-hoc invocation of ``function`` and return its report."""
    plan = Plan("adhoc", (Invocation("only", function, args or {}, 0),))
    (report,) = executor.run(plan, store)
    return report


def test_noop_reports_ok_with_duration_and_a_baseline_peak(make_executor: MakeExecutor, store: LocalStore) -> None:
    # Prepare
    executor = make_executor(workers=1, retries=0)

    # Execute
    report = run_single(executor, store, "noop")

    # Assert
    assert report.ok, report.error
    assert report.function == "noop"
    assert report.attempts == 1
    assert report.error_type is None
    assert report.duration_s > 0
    assert report.wall_s >= report.duration_s
    assert report.peak_rss_bytes is not None
    assert 10 * MIB <= report.peak_rss_bytes <= 300 * MIB, f"baseline {report.peak_rss_bytes / MIB:.1f} MiB"
    print(f"baseline peak RSS of a noop function: {report.peak_rss_bytes / MIB:.1f} MiB")


def test_allocation_over_the_cap_fails_with_memory_limit_error_and_is_not_retried(
        make_executor: MakeExecutor, store: LocalStore, baseline_rss: int) -> None:
    # Prepare
    cap = baseline_rss + 120 * MIB
    executor = make_executor(workers=1, retries=2, memory_cap_bytes=cap)

    # Execute
    report = run_single(executor, store, "allocate", {"bytes": 200 * MIB})

    # Assert
    assert not report.ok
    assert report.error_type == "MemoryLimitError"
    assert report.attempts == 1  # deterministic failure: never retried
    assert report.memory_cap_bytes == cap
    assert report.error is not None
    assert "memory cap" in report.error
    figures = re.search(r"resident (\d+\.\d) MiB > cap (\d+\.\d) MiB", report.error)
    assert figures is not None, report.error
    assert figures.group(2) == f"{cap / MIB:.1f}"
    assert float(figures.group(1)) > cap / MIB
    assert report.peak_rss_bytes is not None and report.peak_rss_bytes > cap


def test_allocation_without_a_cap_succeeds_and_the_peak_grows_by_the_allocation(
        make_executor: MakeExecutor, store: LocalStore, baseline_rss: int) -> None:
    # Prepare
    executor = make_executor(workers=1, retries=0)

    # Execute
    report = run_single(executor, store, "allocate", {"bytes": 200 * MIB})

    # Assert
    assert report.ok, report.error
    assert report.memory_cap_bytes is None
    assert report.result == {"sum": -(-200 * MIB // 4096)}  # every 4096th byte of a block of ones
    assert report.peak_rss_bytes is not None
    growth = report.peak_rss_bytes - baseline_rss
    assert 195 * MIB <= growth <= 240 * MIB, f"peak grew by {growth / MIB:.1f} MiB for a 200 MiB allocation"


def test_timeout_kills_the_invocation_and_is_retried(make_executor: MakeExecutor, store: LocalStore) -> None:
    # Prepare
    executor = make_executor(workers=1, retries=1, timeout_s=0.4)
    run_single(executor, store, "noop")  # start the zygote, so that only the sleep counts against the timeout

    # Execute
    started = time.perf_counter()
    report = run_single(executor, store, "sleep", {"seconds": 30})
    elapsed = time.perf_counter() - started

    # Assert
    assert not report.ok
    assert report.error_type == "InvocationTimeoutError"
    assert report.error == "invocation only ran past its timeout of 0.4 s (killed)"
    assert report.retryable
    assert report.attempts == executor.retries + 1
    assert 0.4 <= report.wall_s < 2.0
    assert elapsed < 5.0  # both attempts were killed, not waited for


def test_a_sleep_shorter_than_the_timeout_succeeds(make_executor: MakeExecutor, store: LocalStore) -> None:
    # Prepare
    executor = make_executor(workers=1, retries=0, timeout_s=5.0)

    # Execute
    report = run_single(executor, store, "sleep", {"seconds": 0.2})

    # Assert
    assert report.ok, report.error
    assert report.duration_s >= 0.2


def test_a_crashing_worker_reports_worker_crash_and_is_retried(make_executor: MakeExecutor, store: LocalStore) -> None:
    # Prepare
    executor = make_executor(workers=1, retries=2)

    # Execute
    report = run_single(executor, store, "crash")

    # Assert
    assert not report.ok
    assert report.error_type == "WorkerCrash"
    assert report.error == "worker of invocation only died without a result"
    assert report.attempts == 3
    # the zygote survives its children's crashes: the executor still runs functions
    assert run_single(executor, store, "noop").ok


def test_a_running_function_does_not_outlive_its_executor(make_executor: MakeExecutor, store: LocalStore) -> None:
    # Prepare: a function that would sleep for a minute, running in a background thread's invocation
    executor = make_executor(workers=1, retries=0)
    runner = threading.Thread(target=run_single, args=(executor, store, "sleep", {"seconds": 60}))
    runner.start()
    deadline = time.monotonic() + 30
    while not (children := [c for z in executor._zygotes.values() if z._proc is not None
                            for c in psutil.Process(z._proc.pid).children()]):
        assert time.monotonic() < deadline, "the function never started"
        time.sleep(0.05)

    # Execute
    executor.close()
    runner.join(timeout=30)

    # Assert: the kernel killed the function with its zygote
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == []
    assert not runner.is_alive()


def test_an_unknown_function_is_refused_when_the_plan_is_made_naming_the_known_ones() -> None:
    with pytest.raises(GradshardError, match=r"unknown function 'no_such_function'; known: \[.*'noop'"):
        Invocation("only", "no_such_function", {}, 0)


def test_a_worker_refuses_a_module_outside_the_trusted_packages(make_executor: MakeExecutor,
                                                                store: LocalStore) -> None:
    # Prepare: an invocation of a function no one registered, naming a module to import for it
    executor = make_executor(workers=1, retries=0)
    plan = Plan("adhoc", (Invocation("only", "noop", {}, 0),))
    rogue = Invocation("only", "noop", {}, 0, module="os")  # registered here, so no import is attempted
    assert rogue.module == "gradshard.runtime.diagnostics"

    # Execute / Assert: the registry never imports a module outside the trusted prefixes
    with pytest.raises(GradshardError, match="refusing to import 'os' for function 'ghost'"):
        registry.resolve("ghost", "os")
    (report,) = executor.run(plan, store)
    assert report.ok


def test_arguments_of_the_wrong_model_are_refused() -> None:
    with pytest.raises(GradshardError, match="function 'sleep' takes SleepArgs, got AllocateArgs"):
        Invocation("only", "sleep", AllocateArgs(bytes=1), 0)


def test_two_workers_run_four_sleeps_two_at_a_time(make_executor: MakeExecutor, store: LocalStore) -> None:
    # Prepare
    executor = make_executor(workers=2, retries=0)
    run_single(executor, store, "noop")  # warm the zygote
    plan = Plan("adhoc", tuple(Invocation(f"sleep-{i}", "sleep", {"seconds": 0.5}, 0) for i in range(4)))

    # Execute
    started = time.perf_counter()
    reports = executor.run(plan, store)
    wall = time.perf_counter() - started

    # Assert
    assert [r.invocation for r in reports] == ["sleep-0", "sleep-1", "sleep-2", "sleep-3"]
    assert all(r.ok for r in reports), [r.error for r in reports]
    assert all(r.duration_s >= 0.5 for r in reports)
    serial = sum(r.wall_s for r in reports)  # what one worker would have needed (>= 2 s)
    assert 1.0 <= wall < 0.85 * serial, f"4 x 0.5 s on 2 workers took {wall:.2f} s, serially {serial:.2f} s"


def test_a_later_stage_does_not_start_when_an_earlier_one_failed(make_executor: MakeExecutor,
                                                                  store: LocalStore) -> None:
    # Prepare
    executor = make_executor(workers=2, retries=0)
    plan = Plan("adhoc", (Invocation("first", "crash", {}, 0),
                          Invocation("second", "noop", {}, 0, depends_on=("first",))))

    # Execute
    reports = executor.run(plan, store)

    # Assert
    assert [(r.invocation, r.ok, r.error_type) for r in reports] == [("first", False, "WorkerCrash")]


def _write_round(store: LocalStore, numel: int, clients: int, chunk_elems: int) -> None:
    layout = synthetic(numel, tensor_elems=numel // 3)
    spec = RoundSpec.create(0, layout, chunk_elems=chunk_elems)
    open_round(store, spec)
    rng = np.random.default_rng(7)
    for i in range(clients):
        client = f"c{i}"
        write_update(store, update_key(0, client), layout, rng.standard_normal(numel, dtype=np.float32),
                     UpdateMeta(client=client, round=0, examples=10 + i, layout_digest=layout.digest(),
                                chunk_elems=chunk_elems))


def test_reports_carry_the_io_of_the_worker_store(make_executor: MakeExecutor, store: LocalStore) -> None:
    # Prepare
    numel, clients, chunk, window_bytes = 1 << 16, 3, 4096, 32 << 10  # 2 shards of 8 windows of 8192 elements
    _write_round(store, numel, clients, chunk)
    executor = make_executor(workers=2, retries=0)
    driver_reads_before = store.io.bytes_read

    # Execute
    result = aggregate_round(store, 0, executor, AggregateConfig(shards=2, window_bytes=window_bytes))

    # Assert
    assert [r.invocation for r in result.reports] == ["shard-0000", "shard-0001"]
    for report, inv in zip(result.reports, result.plan.invocations, strict=True):
        assert report.ok, report.error
        length = inv.args.stop - inv.args.start
        windows = -(-length // (window_bytes // 4))
        data = clients * length * 4
        assert report.bytes_written == length * 4  # its own byte range of the output, nothing else
        assert report.puts >= windows
        assert data < report.bytes_read < data + 256 * 1024  # inputs, plus manifest and headers
        assert report.gets >= clients * windows + 1
    assert sum(r.bytes_written for r in result.reports) == numel * 4
    assert result.summary()["bytes_read"] == sum(r.bytes_read for r in result.reports)
    # the workers read through their own store: the driver's store only read headers
    assert store.io.bytes_read - driver_reads_before < clients * numel * 4 // 4


def test_prestart_starts_the_runtime_in_the_background_and_ignores_unknown_functions(
        make_executor: MakeExecutor, store: LocalStore) -> None:
    # Prepare
    executor = make_executor(workers=1, retries=0)

    # Execute: returns at once; the zygote process comes up behind it
    started = time.perf_counter()
    executor.prestart(["noop", "no-such-function"], store)
    returned = time.perf_counter() - started
    report = run_single(executor, store, "noop")

    # Assert: one zygote for noop's runtime, and the invocation ran on it
    assert returned < 0.1
    assert report.ok, report.error
    zygotes = list(executor._zygotes.values())
    assert len(zygotes) == 1 and zygotes[0]._proc is not None and zygotes[0]._proc.poll() is None


def test_prestart_with_wait_returns_a_running_runtime_and_refuses_unknown_functions(
        make_executor: MakeExecutor, store: LocalStore) -> None:
    # Prepare
    executor = make_executor(workers=1, retries=0)

    # Execute: returns once the zygote process is up
    executor.prestart(["noop"], store, wait=True)

    # Assert: running before any invocation; an unknown function is an error naming it
    (zygote,) = executor._zygotes.values()
    assert zygote._proc is not None and zygote._proc.poll() is None
    with pytest.raises(GradshardError, match="no-such-function"):
        executor.prestart(["no-such-function"], store, wait=True)
    assert run_single(executor, store, "noop").ok


def test_a_per_invocation_cap_below_the_executors_kills_that_invocation_only(
        make_executor: MakeExecutor, store: LocalStore, baseline_rss: int) -> None:
    # Prepare: the executor has no cap; one invocation carries its own, below what it allocates
    executor = make_executor(workers=1, retries=0)
    big = AllocateArgs(bytes=200 * MIB)
    plan = Plan("adhoc", (Invocation("capped", "allocate", big, 0, memory_cap_bytes=baseline_rss + 64 * MIB),
                          Invocation("free", "allocate", big, 0)))

    # Execute
    reports = {r.invocation: r for r in executor.run(plan, store)}

    # Assert
    assert reports["capped"].error_type == "MemoryLimitError"
    assert reports["capped"].memory_cap_bytes == baseline_rss + 64 * MIB
    assert reports["free"].ok, reports["free"].error


@pytest.mark.parametrize("cap", [0, -5, "512", 1.5, True])
def test_an_invocation_cap_that_is_not_a_positive_integer_is_a_plan_error(cap: object) -> None:
    from gradshard.errors import PlanError

    with pytest.raises(PlanError, match="memory_cap_bytes must be an integer >= 1"):
        Invocation("x", "noop", {}, 0, memory_cap_bytes=cap)  # type: ignore[arg-type]


def test_the_resident_probe_reads_what_psutil_reads_and_zero_once_the_process_is_gone() -> None:
    # Prepare: a child process that holds 64 MiB resident, then exits when told
    child = subprocess.Popen([sys.executable, "-c", "import sys; b = bytearray(64 << 20); sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    try:
        probe = ResidentProbe(child.pid)
        deadline = time.monotonic() + 10
        while probe.read() < 64 * MIB and time.monotonic() < deadline:
            time.sleep(0.01)

        # Execute / Assert: the same resident set as psutil (pages may move between the two reads)
        assert abs(probe.read() - psutil.Process(child.pid).memory_info().rss) < 4 * MIB
        assert probe.read() >= 64 * MIB
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()
    assert probe.read() == 0  # reaped: /proc has no such process any more
    probe.close()
