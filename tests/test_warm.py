"""Warm workers: LIFL's aggregators are reused across rounds, each invocation still measured on its own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gradshard.aggregation.driver import AggregateConfig, aggregate_round
from gradshard.core.zoo import get_layout
from gradshard.demo.synthetic import make_round
from gradshard.format.keys import aggregate_key
from gradshard.format.update import read_flat
from gradshard.runtime import LocalExecutor
from gradshard.store import LocalStore
from gradshard.topology.base import Invocation, Plan

pytestmark = pytest.mark.integration
MIB = 1 << 20


def test_lifl_aggregators_run_warm_in_the_next_round_and_give_the_same_result(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    layout = get_layout("synthetic-100000")
    for r in (0, 1):
        make_round(store, r, layout, 8, seed=5)
    config = AggregateConfig(topology="lifl", nodes=2)

    with LocalExecutor(workers=2, warm=True) as executor:
        first = aggregate_round(store, 0, executor, config)
        second = aggregate_round(store, 1, executor, config)
    warm_result = read_flat(store, aggregate_key(1), layout)
    with LocalExecutor(workers=2) as executor:
        aggregate_round(store, 1, executor, config)

    assert not any(r.warm for r in first.reports)
    assert all(r.warm for r in second.reports)
    np.testing.assert_array_equal(warm_result, read_flat(store, aggregate_key(1), layout))


def test_a_warm_worker_measures_each_invocation_on_its_own(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    big = Plan("t", (Invocation("a", "allocate", {"bytes": 150 * MIB}, 0, warm_key="k"),))
    small = Plan("t", (Invocation("a", "noop", {}, 0, warm_key="k"),))

    with LocalExecutor(workers=1, warm=True) as executor:
        [after_big] = executor.run(big, store)
        [after_small] = executor.run(small, store)

    assert after_small.warm and not after_big.warm
    assert after_big.peak_rss_bytes is not None and after_small.peak_rss_bytes is not None
    assert after_big.peak_rss_bytes - after_small.peak_rss_bytes > 100 * MIB


def test_without_warm_keys_or_warm_mode_every_invocation_is_cold(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    make_round(store, 0, get_layout("mlp"), 3)

    with LocalExecutor(workers=2, warm=True) as warm, LocalExecutor(workers=2) as cold:
        sharded = [aggregate_round(store, 0, warm, AggregateConfig(shards=2)) for _ in range(2)]
        lifl = [aggregate_round(store, 0, cold, AggregateConfig(topology="lifl")) for _ in range(2)]

    assert not any(r.warm for result in sharded + lifl for r in result.reports)
