"""The memory acceptance criteria, measured with the LocalExecutor on real aggregations.

* a shard function's peak does not grow with the number of clients N (it streams one window at a time);
* it does grow with the window (read buffer + accumulator = 2 x window);
* a cap too small for the window fails the round with ``InvocationError`` and publishes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from gradshard.aggregation.driver import AggregateConfig, aggregate_round
from gradshard.core.zoo import synthetic
from gradshard.errors import InvocationError
from gradshard.format.keys import aggregate_key, update_key
from gradshard.format.round import RoundSpec, open_round
from gradshard.format.update import UpdateMeta
from gradshard.format.writer import write_update
from gradshard.runtime import LocalExecutor
from gradshard.store import LocalStore
from gradshard.topology.base import Invocation, Plan
from gradshard.units import MIB

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def executor() -> Iterator[LocalExecutor]:
    """One uncapped executor for the measurements of this module (one worker: nothing else runs beside it)."""
    with LocalExecutor(workers=1, retries=0) as ex:
        yield ex


@pytest.fixture(scope="module")
def baseline_rss(executor: LocalExecutor, tmp_path_factory: pytest.TempPathFactory) -> int:
    """Peak RSS of a function that does nothing, the largest of three runs."""
    scratch = LocalStore(tmp_path_factory.mktemp("baseline"), fsync=False)
    peaks = []
    for _ in range(3):
        (report,) = executor.run(Plan("adhoc", (Invocation("noop", "noop", {}, 0),)), scratch)
        assert report.ok and report.peak_rss_bytes is not None
        peaks.append(report.peak_rss_bytes)
    print(f"\nbaseline peak RSS: {max(peaks) / MIB:.1f} MiB")
    return max(peaks)


def write_round(root: Path, numel: int, clients: int, r: int = 0, tensor_elems: int = 1 << 24) -> LocalStore:
    """A store with round ``r`` of ``clients`` random float32 updates of ``numel`` elements (default chunks)."""
    store = LocalStore(root, fsync=False)
    layout = synthetic(numel, tensor_elems=tensor_elems)
    spec = RoundSpec.create(r, layout)
    open_round(store, spec)
    rng = np.random.default_rng(clients)
    for i in range(clients):
        client = f"c{i:04d}"
        write_update(store, update_key(r, client), layout, rng.standard_normal(numel, dtype=np.float32),
                     UpdateMeta(client=client, round=r, examples=1 + i % 5, layout_digest=layout.digest(),
                                chunk_elems=spec.chunk_elems))
    return store


def shard_peak(store: LocalStore, executor: LocalExecutor, window_bytes: int) -> int:
    """Aggregate round 0 with one shard; the shard function's measured peak RSS."""
    result = aggregate_round(store, 0, executor, AggregateConfig(shards=1, window_bytes=window_bytes))
    (report,) = result.reports
    assert report.ok, report.error
    assert report.peak_rss_bytes is not None
    return report.peak_rss_bytes


def _check_peak_independent_of_n(tmp_path: Path, executor: LocalExecutor, numel: int, few: int, many: int,
                                 tensor_elems: int = 1 << 24) -> None:
    # Prepare
    window = 256 << 10
    few_store = write_round(tmp_path / f"n{few}", numel, few, tensor_elems=tensor_elems)
    many_store = write_round(tmp_path / f"n{many}", numel, many, tensor_elems=tensor_elems)

    # Execute
    few_peak = shard_peak(few_store, executor, window)
    many_peak = shard_peak(many_store, executor, window)

    # Assert
    print(f"\nshard peak RSS, P={numel}, window {window >> 10} KiB: N={few}: {few_peak / MIB:.1f} MiB, "
          f"N={many}: {many_peak / MIB:.1f} MiB")
    tolerance = max(0.10 * few_peak, 8 * MIB)
    assert abs(many_peak - few_peak) <= tolerance, (
        f"peak grew with N: {few_peak / MIB:.1f} MiB (N={few}) vs {many_peak / MIB:.1f} MiB (N={many})")


def test_shard_peak_does_not_grow_with_the_number_of_clients(tmp_path: Path, executor: LocalExecutor) -> None:
    _check_peak_independent_of_n(tmp_path, executor, numel=1 << 20, few=4, many=64)


@pytest.mark.slow  # ~42 s; the same property without many tensors runs by default
def test_shard_peak_does_not_grow_with_n_for_a_model_of_many_tensors(tmp_path: Path, executor: LocalExecutor) -> None:
    """4096 tensors: a reader that kept each client's parsed header (a dict per tensor) grew ~10 MiB per client."""
    _check_peak_independent_of_n(tmp_path, executor, numel=1 << 20, few=4, many=64, tensor_elems=256)


@pytest.mark.slow
def test_shard_peak_does_not_grow_with_the_number_of_clients_at_scale(tmp_path: Path,
                                                                     executor: LocalExecutor) -> None:
    _check_peak_independent_of_n(tmp_path, executor, numel=1 << 20, few=4, many=256)  # 1 GiB of updates


def test_shard_peak_grows_with_the_window(tmp_path: Path, executor: LocalExecutor, baseline_rss: int) -> None:
    # Prepare
    store = write_round(tmp_path, numel=1 << 24, clients=2)  # 64 MiB per client: a 64 MiB window is the shard
    small, large = 1 * MIB, 64 * MIB

    # Execute
    small_peak = shard_peak(store, executor, small)
    large_peak = shard_peak(store, executor, large)

    # Assert
    print(f"\nshard peak RSS, P=2^24, N=2: window 1 MiB: {small_peak / MIB:.1f} MiB, "
          f"window 64 MiB: {large_peak / MIB:.1f} MiB (baseline {baseline_rss / MIB:.1f} MiB)")
    assert small_peak < baseline_rss + 3 * small + 16 * MIB
    assert large_peak - small_peak >= 100 * MIB  # read buffer + accumulator: 2 x 64 MiB
    assert large_peak < baseline_rss + 3 * large + 16 * MIB


def test_a_cap_too_small_for_the_window_fails_the_round_and_publishes_nothing(
        tmp_path: Path, baseline_rss: int) -> None:
    # Prepare
    store = write_round(tmp_path, numel=1 << 22, clients=2)  # the 64 MiB window is cut to the 16 MiB shard
    cap = baseline_rss + 8 * MIB
    config = AggregateConfig(shards=1, window_bytes=64 * MIB)

    # Execute
    with LocalExecutor(workers=1, retries=2, memory_cap_bytes=cap) as capped, \
            pytest.raises(InvocationError) as excinfo:
        aggregate_round(store, 0, capped, config)

    # Assert
    message = str(excinfo.value)
    assert "round 0 (sharded) failed" in message
    assert "shard-0000 (shard_reduce, 1 attempt(s)): MemoryLimitError" in message
    assert "memory cap" in message
    assert f"cap {cap / MIB:.1f} MiB" in message
    assert not store.exists(aggregate_key(0))
    assert store.list("rounds/000000/") == sorted(
        ["rounds/000000/round.json", "rounds/000000/manifest.json",
         "rounds/000000/updates/c0000.safetensors", "rounds/000000/updates/c0001.safetensors"])
    uploads = store.root / ".uploads"
    assert not uploads.exists() or list(uploads.iterdir()) == []
