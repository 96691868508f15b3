"""Tests of the RayExecutor on a small one-machine Ray: identical aggregates, caps, the memory resource, timeouts.

One Ray instance (2 CPUs, 1 GiB of Ray's ``memory`` resource) serves the whole module; executors are created
through the ``make_executor`` fixture, which closes them at teardown (leaving that Ray running: they did not
start it). Only a one-machine Ray is exercised here; a multi-node cluster is not.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from gradshard.aggregation.driver import AggregateConfig, aggregate_round  # noqa: E402
from gradshard.core.zoo import synthetic  # noqa: E402
from gradshard.demo.synthetic import make_round  # noqa: E402
from gradshard.errors import StoreError  # noqa: E402
from gradshard.format.keys import aggregate_key  # noqa: E402
from gradshard.runtime import InvocationReport, LocalExecutor  # noqa: E402
from gradshard.runtime.ray import INTERPRETER_BASELINE_BYTES, RayExecutor  # noqa: E402
from gradshard.store import LocalStore, MemoryStore, Store  # noqa: E402
from gradshard.topology.base import Invocation, Plan  # noqa: E402
from gradshard.units import MIB  # noqa: E402

pytestmark = pytest.mark.integration

CLUSTER_MEMORY = 1024 * MIB  # Ray's logical memory resource of the test node
MakeExecutor = Callable[..., RayExecutor]


@pytest.fixture(scope="module")
def ray_node() -> Iterator[str]:
    """A light local Ray for the module; yields its node id."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 * MIB,
             _memory=CLUSTER_MEMORY, configure_logging=False)
    try:
        yield ray.get_runtime_context().get_node_id()
    finally:
        ray.shutdown()


@pytest.fixture
def make_executor(ray_node: str) -> Iterator[MakeExecutor]:
    """Builds RayExecutors with the given options; every one is closed when the test ends."""
    made: list[RayExecutor] = []

    def make(**options: Any) -> RayExecutor:
        executor = RayExecutor(**options)
        made.append(executor)
        return executor

    yield make
    for executor in made:
        executor.close()


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store", fsync=False)


@pytest.fixture(scope="module")
def baseline_rss(ray_node: str, tmp_path_factory: pytest.TempPathFactory) -> int:
    """Peak RSS of a function that does nothing, run as a Ray task (the interpreter baseline)."""
    scratch = LocalStore(tmp_path_factory.mktemp("baseline"), fsync=False)
    with RayExecutor(workers=1, retries=0) as executor:
        peak = run_single(executor, scratch, "noop").peak_rss_bytes
    assert peak is not None
    return peak


def run_single(executor: RayExecutor, store: Store, function: str, args: dict[str, Any] | None = None,
               memory_bytes: int = 0) -> InvocationReport:
    """Run one ad-hoc invocation of ``function`` and return its report."""
    plan = Plan("adhoc", (Invocation("only", function, args or {}, memory_bytes),))
    (report,) = executor.run(plan, store)
    return report


def test_importing_gradshard_runtime_does_not_import_ray() -> None:
    # Execute
    code = "import sys, gradshard.runtime, gradshard.aggregation.driver; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout

    # Assert
    assert out.strip() == "False"


@pytest.mark.parametrize("config", [AggregateConfig(topology="sharded", shards=3),
                                    AggregateConfig(topology="lambda-fl"),
                                    AggregateConfig(topology="flat")], ids=lambda c: c.topology)
def test_a_round_aggregated_on_ray_is_byte_identical_to_the_local_one(
        make_executor: MakeExecutor, ray_node: str, tmp_path: Path, config: AggregateConfig) -> None:
    # Prepare: the same synthetic round in two stores
    layout = synthetic(300_000, tensor_elems=70_000)
    stores = [LocalStore(tmp_path / name, fsync=False) for name in ("local", "ray")]
    for s in stores:
        make_round(s, 0, layout, 6, seed=3)

    # Execute
    with LocalExecutor(workers=2, retries=0) as local:
        expected = aggregate_round(stores[0], 0, local, config)
    result = aggregate_round(stores[1], 0, make_executor(workers=2, retries=0), config)

    # Assert
    assert len(result.reports) == len(expected.reports) == len(result.plan.invocations)
    if config.topology == "sharded":
        assert len(result.reports) == 3
    assert stores[1].get(aggregate_key(0)) == stores[0].get(aggregate_key(0))
    for report in result.reports:
        assert report.ok, report.error
        assert report.host == ray_node
        assert report.peak_rss_bytes is not None and report.peak_rss_bytes > 10 * MIB
        assert report.bytes_read > 0 and report.bytes_written > 0


def test_an_allocation_over_the_cap_fails_in_the_task_and_is_not_retried(
        make_executor: MakeExecutor, store: LocalStore, baseline_rss: int, ray_node: str) -> None:
    # Prepare
    cap = baseline_rss + 120 * MIB
    executor = make_executor(workers=1, retries=2, memory_cap_bytes=cap)

    # Execute
    report = run_single(executor, store, "allocate", {"bytes": 200 * MIB})

    # Assert
    assert not report.ok
    assert report.error_type == "MemoryLimitError"
    assert report.attempts == 1
    assert report.memory_cap_bytes == cap
    assert report.error is not None and "exceeded its memory cap" in report.error
    assert f"cap {cap / MIB:.1f} MiB" in report.error
    assert report.peak_rss_bytes is not None and report.peak_rss_bytes > cap
    assert report.host == ray_node


def test_an_allocation_under_the_cap_succeeds_with_its_peak_measured(
        make_executor: MakeExecutor, store: LocalStore, baseline_rss: int, ray_node: str) -> None:
    # Prepare
    cap = baseline_rss + 120 * MIB
    executor = make_executor(workers=1, retries=0, memory_cap_bytes=cap)

    # Execute
    report = run_single(executor, store, "allocate", {"bytes": 60 * MIB})

    # Assert
    assert report.ok, report.error
    assert report.result == {"sum": -(-60 * MIB // 4096)}
    assert report.peak_rss_bytes is not None
    growth = report.peak_rss_bytes - baseline_rss
    assert 55 * MIB <= growth <= 100 * MIB, f"peak grew by {growth / MIB:.1f} MiB for a 60 MiB allocation"
    assert report.peak_rss_bytes <= cap
    assert report.host == ray_node
    assert report.wall_s >= report.duration_s > 0


def test_the_memory_request_is_the_need_plus_the_baseline_or_the_cap() -> None:
    # Prepare
    inv = Invocation("x", "noop", {}, 100 * MIB)

    # Execute / Assert (no Ray needed: the executor connects on first use)
    assert RayExecutor().memory_request(inv) == 100 * MIB + INTERPRETER_BASELINE_BYTES
    assert RayExecutor(memory_cap_bytes=512 * MIB).memory_request(inv) == 512 * MIB
    assert RayExecutor(memory_cap_bytes=64 * MIB).memory_request(inv) == 100 * MIB + INTERPRETER_BASELINE_BYTES


def test_ray_runs_tasks_one_at_a_time_when_their_memory_requests_do_not_fit_together(
        make_executor: MakeExecutor, store: LocalStore) -> None:
    # Prepare: two CPUs, but two requests of 600 MiB (+ baseline) do not fit into 1 GiB together
    executor = make_executor(workers=2, retries=0)
    run_single(executor, store, "noop")  # start the Ray workers and their zygotes

    def timed(memory_bytes: int) -> float:
        plan = Plan("adhoc", tuple(Invocation(f"s{i}", "sleep", {"seconds": 0.8}, memory_bytes) for i in range(2)))
        started = time.perf_counter()
        reports = executor.run(plan, store)
        assert all(r.ok for r in reports), [r.error for r in reports]
        return time.perf_counter() - started

    timed(100 * MIB)  # warm a second Ray worker too (on a loaded machine its start alone takes ~1 s)

    # Execute
    large = timed(600 * MIB)
    small = min(timed(100 * MIB), timed(100 * MIB))

    # Assert
    assert large >= 1.6, f"two 600 MiB tasks took {large:.2f} s: they ran together in a 1 GiB node"
    assert small < 1.4, f"two 100 MiB tasks took {small:.2f} s: they did not run together"


def test_an_invocation_larger_than_any_node_is_reported_at_once(make_executor: MakeExecutor,
                                                                store: LocalStore) -> None:
    # Prepare
    executor = make_executor(workers=1, retries=2)

    # Execute
    started = time.perf_counter()
    report = run_single(executor, store, "noop", memory_bytes=2 * CLUSTER_MEMORY)
    elapsed = time.perf_counter() - started

    # Assert
    assert not report.ok
    assert report.error_type == "PlanError"
    assert report.attempts == 1  # deterministic: not retried
    need = (2 * CLUSTER_MEMORY + INTERPRETER_BASELINE_BYTES) / MIB
    assert report.error == (f"invocation only needs {need:.0f} MiB of Ray's memory resource, but the largest node "
                            f"of the Ray cluster offers {CLUSTER_MEMORY / MIB:.0f} MiB, so Ray would never schedule "
                            "it; use more shards, a smaller memory cap, or add a larger node")
    assert elapsed < 2.0


def test_a_function_past_its_timeout_is_killed_in_the_task(make_executor: MakeExecutor, store: LocalStore,
                                                           ray_node: str) -> None:
    # Prepare
    executor = make_executor(workers=1, retries=0, timeout_s=1.0)

    # Execute
    started = time.perf_counter()
    report = run_single(executor, store, "sleep", {"seconds": 30})
    elapsed = time.perf_counter() - started

    # Assert
    assert not report.ok
    assert report.error_type == "InvocationTimeoutError"
    assert report.error == "invocation only ran past its timeout of 1 s (killed)"
    assert report.host == ray_node
    assert 1.0 <= elapsed < 6.0


def test_a_task_that_outlives_the_drivers_deadline_is_cancelled(make_executor: MakeExecutor,
                                                                store: LocalStore) -> None:
    # Prepare: a negative grace makes the driver give up before the task's own timeout, to exercise cancellation
    executor = make_executor(workers=1, retries=0, timeout_s=1.5)
    executor.grace_s = -1.0

    # Execute
    started = time.perf_counter()
    report = run_single(executor, store, "sleep", {"seconds": 3})
    elapsed = time.perf_counter() - started

    # Assert
    assert not report.ok
    assert report.error_type == "InvocationTimeoutError"
    assert report.error == ("invocation only returned no result from Ray within its timeout of 1.5 s + -1 s grace "
                            "(task cancelled)")
    assert report.host is None
    assert 0.5 <= elapsed < 3.0
    executor.grace_s = 60.0
    assert run_single(executor, store, "noop").ok  # Ray replaced the killed worker


class UnreachableStore(LocalStore):
    """A store whose spec no worker can open: the task body itself raises."""

    def spec(self) -> dict[str, Any]:
        return {"kind": "nowhere"}


def test_an_error_raised_by_the_task_is_a_retried_worker_crash_naming_the_cause(make_executor: MakeExecutor,
                                                                                  tmp_path: Path) -> None:
    # Prepare
    executor = make_executor(workers=1, retries=1)

    # Execute
    report = run_single(executor, UnreachableStore(tmp_path / "store", fsync=False), "noop")

    # Assert
    assert not report.ok
    assert report.error_type == "WorkerCrash"
    assert report.attempts == 2
    assert report.error is not None
    assert report.error.startswith("Ray task of invocation only failed: StoreError: unknown store kind 'nowhere'")


def test_a_memory_store_is_refused(make_executor: MakeExecutor) -> None:
    # Prepare
    executor = make_executor(workers=1, retries=0)

    # Execute / Assert
    with pytest.raises(StoreError, match=r"RayExecutor cannot use a MemoryStore: Ray tasks run in other processes"):
        run_single(executor, MemoryStore(), "noop")


def test_closing_an_executor_leaves_a_ray_it_did_not_start_running(make_executor: MakeExecutor,
                                                                   store: LocalStore) -> None:
    # Prepare
    executor = make_executor(workers=1, retries=0)
    assert run_single(executor, store, "noop").ok

    # Execute
    executor.close()

    # Assert
    assert ray.is_initialized()


def test_ray_tasks_verify_scoped_tokens_and_give_the_local_bytes(
        make_executor: MakeExecutor, tmp_path: Path) -> None:
    # Prepare: one round in two stores; the Ray executor mints a token per attempt, its tasks verify them
    from gradshard.security.tokens import TokenIssuer

    layout = synthetic(200_000, tensor_elems=50_000)
    stores = [LocalStore(tmp_path / name, fsync=False) for name in ("local", "ray")]
    for s in stores:
        make_round(s, 0, layout, 4, seed=5)
    config = AggregateConfig(topology="sharded", shards=3)
    issuer = TokenIssuer.generate()

    # Execute
    with LocalExecutor(workers=2, retries=0) as local:
        aggregate_round(stores[0], 0, local, config)
    result = aggregate_round(stores[1], 0, make_executor(workers=2, retries=0, tokens=issuer), config)

    # Assert: the same bytes, every task's token consumed once (one replay record per invocation)
    assert stores[1].get(aggregate_key(0)) == stores[0].get(aggregate_key(0))
    assert all(r.ok for r in result.reports)
    assert len(stores[1].list("security/jti/")) == 3
