"""Tests of shard plans (the paper's partition, alignment, tensor-aligned cuts) and per-chunk checksums."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gradshard.core import checksum
from gradshard.core.layout import ModelLayout, TensorSpec
from gradshard.core.shards import ShardPlan
from gradshard.core.zoo import synthetic
from gradshard.errors import GradshardError, PlanError


@st.composite
def _plan_params(draw: st.DrawFn) -> tuple[int, int, int]:
    """(P, M, align) with M no larger than the number of aligned units."""
    p = draw(st.integers(1, 10**6))
    align = draw(st.one_of(st.just(1), st.integers(1, 4096)))
    units = -(-p // align)
    m = draw(st.integers(1, min(units, 64)))
    return p, m, align


# --- contiguous: the paper's partition ---------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(_plan_params())
def test_contiguous_covers_the_vector_with_m_balanced_aligned_shards(params: tuple[int, int, int]) -> None:
    # Prepare
    p, m, align = params
    units = -(-p // align)

    # Execute
    plan = ShardPlan.contiguous(p, m, align=align)

    # Assert: contiguous cover of [0, P) by exactly M non-empty ranges
    ranges = plan.ranges
    assert plan.m == m
    assert len(ranges) == m
    assert ranges[0][0] == 0
    assert ranges[-1][1] == p
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    assert all(lo < hi for lo, hi in ranges)
    # inner boundaries on multiples of align
    assert all(b % align == 0 for b in plan.boundaries[1:-1])
    # sizes in units: floor(units / M), the first units % M one longer
    sizes = [-(-(hi - lo) // align) for lo, hi in ranges]
    size, extra = divmod(units, m)
    assert sizes == [size + 1] * extra + [size] * (m - extra)
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == units


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 10**6), st.integers(1, 64))
def test_contiguous_unaligned_matches_the_paper_partition_in_elements(p: int, m: int) -> None:
    # Prepare
    assume(m <= p)

    # Execute
    plan = ShardPlan.contiguous(p, m)

    # Assert
    sizes = [hi - lo for lo, hi in plan.ranges]
    assert sizes == [p // m + 1] * (p % m) + [p // m] * (m - p % m)
    assert plan.kind == "contiguous"
    assert plan.align == 1


@settings(max_examples=100, deadline=None)
@given(_plan_params(), st.data())
def test_shard_of_returns_the_range_holding_the_element(params: tuple[int, int, int], data: st.DataObject) -> None:
    # Prepare
    p, m, align = params
    plan = ShardPlan.contiguous(p, m, align=align)
    elements = [0, p - 1, *(lo for lo, _ in plan.ranges), *(hi - 1 for _, hi in plan.ranges),
                data.draw(st.integers(0, p - 1))]

    # Execute
    found = [plan.shard_of(e) for e in elements]

    # Assert
    for e, s in zip(elements, found, strict=True):
        lo, hi = plan.ranges[s]
        assert lo <= e < hi


@pytest.mark.parametrize("element", [-1, 100])
def test_shard_of_outside_the_vector_is_refused(element: int) -> None:
    # Prepare
    plan = ShardPlan.contiguous(100, 3)

    # Execute / Assert
    with pytest.raises(PlanError, match=rf"element {element} is outside \[0, 100\)"):
        plan.shard_of(element)


def test_more_shards_than_elements_is_refused() -> None:
    # Execute / Assert
    with pytest.raises(PlanError, match=r"M = 11 shards is more than P = 10 elements; choose M <= 10"):
        ShardPlan.contiguous(10, 11)


def test_more_shards_than_aligned_units_is_refused() -> None:
    # Execute / Assert: 10 elements in chunks of 4 are 3 units
    with pytest.raises(PlanError, match=r"M = 4 shards is more than 3 aligned units of 4 elements; choose M <= 3"):
        ShardPlan.contiguous(10, 4, align=4)


@pytest.mark.parametrize("m", [0, -3])
def test_fewer_than_one_shard_is_refused(m: int) -> None:
    # Execute / Assert
    with pytest.raises(PlanError, match=rf"number of shards M must be at least 1, got {m}"):
        ShardPlan.contiguous(10, m)


@pytest.mark.parametrize("align", [0, -1])
def test_alignment_below_one_is_refused(align: int) -> None:
    # Execute / Assert
    with pytest.raises(PlanError, match=rf"alignment must be at least 1 element, got {align}"):
        ShardPlan.contiguous(10, 2, align=align)


def test_empty_vector_is_refused() -> None:
    # Execute / Assert
    with pytest.raises(PlanError, match=r"cannot shard an empty vector \(P = 0\)"):
        ShardPlan.contiguous(0, 1)


@pytest.mark.parametrize(
    ("boundaries", "message"),
    [((0, 5, 5, 10), "strictly increasing"), ((1, 10), "must run from 0 to 10"), ((0, 9), "must run from 0 to 10")],
)
def test_hand_built_plans_are_validated(boundaries: tuple[int, ...], message: str) -> None:
    # Execute / Assert
    with pytest.raises(PlanError, match=message):
        ShardPlan(10, boundaries)


# --- manifests ---------------------------------------------------------------------------------------------------
@settings(max_examples=50, deadline=None)
@given(_plan_params())
def test_manifest_round_trips_with_its_digest(params: tuple[int, int, int]) -> None:
    # Prepare
    p, m, align = params
    plan = ShardPlan.contiguous(p, m, align=align)

    # Execute
    manifest = plan.manifest()
    rebuilt = ShardPlan.from_manifest(manifest)

    # Assert
    assert rebuilt == plan
    assert rebuilt.manifest() == manifest
    assert len(manifest["digest"]) == 64


def test_tampered_manifest_is_rejected() -> None:
    # Prepare: move an inner boundary; the plan itself stays valid
    manifest = ShardPlan.contiguous(1000, 4).manifest()
    manifest["boundaries"][1] += 1

    # Execute / Assert
    with pytest.raises(PlanError, match="digest does not match its boundaries"):
        ShardPlan.from_manifest(manifest)


def test_manifest_with_a_changed_kind_is_rejected() -> None:
    # Prepare
    manifest = ShardPlan.contiguous(1000, 4).manifest()
    manifest["kind"] = "tensor-aligned"

    # Execute / Assert
    with pytest.raises(PlanError, match="digest does not match"):
        ShardPlan.from_manifest(manifest)


def test_malformed_manifest_is_rejected() -> None:
    # Prepare
    manifest = ShardPlan.contiguous(1000, 4).manifest()
    del manifest["boundaries"]

    # Execute / Assert
    with pytest.raises(PlanError, match="malformed shard plan manifest"):
        ShardPlan.from_manifest(manifest)


# --- tensor-aligned ----------------------------------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 500), min_size=1, max_size=30), st.data())
def test_tensor_aligned_cuts_only_at_tensor_boundaries(sizes: list[int], data: st.DataObject) -> None:
    # Prepare
    assume(sum(sizes) > 0)
    layout = ModelLayout(TensorSpec(f"t{i}", (n,), "float32") for i, n in enumerate(sizes))
    tensor_stops = {s.stop for s in layout.slots}
    cuts = tensor_stops - {0, layout.numel}
    m = data.draw(st.integers(1, len(cuts) + 1))

    # Execute
    plan = ShardPlan.tensor_aligned(layout, m)

    # Assert
    assert plan.m == m
    assert plan.kind == "tensor-aligned"
    assert plan.boundaries[0] == 0
    assert plan.boundaries[-1] == layout.numel
    assert set(plan.boundaries[1:-1]) <= cuts
    assert all(lo < hi for lo, hi in plan.ranges)


def test_tensor_aligned_balances_equal_tensors() -> None:
    # Prepare
    layout = synthetic(1000, tensor_elems=100)

    # Execute
    plan = ShardPlan.tensor_aligned(layout, 5)

    # Assert
    assert plan.boundaries == (0, 200, 400, 600, 800, 1000)


def test_tensor_aligned_snaps_cuts_down_to_the_alignment() -> None:
    # Prepare: tensor boundaries at 30, 70; aligned to 16 they become 16, 64
    layout = ModelLayout([TensorSpec("a", (30,), "float32"), TensorSpec("b", (40,), "float32"),
                          TensorSpec("c", (30,), "float32")])

    # Execute
    plan = ShardPlan.tensor_aligned(layout, 3, align=16)

    # Assert
    assert plan.boundaries == (0, 16, 64, 100)


def test_tensor_aligned_refuses_more_shards_than_cuts() -> None:
    # Prepare: three tensors offer two cuts
    layout = synthetic(300, tensor_elems=100)

    # Execute / Assert
    with pytest.raises(PlanError, match=r"M = 4 tensor-aligned shards need 3 cuts but the layout offers 2"):
        ShardPlan.tensor_aligned(layout, 4)


def test_tensor_aligned_refuses_fewer_than_one_shard() -> None:
    # Execute / Assert
    with pytest.raises(PlanError, match="at least 1, got 0"):
        ShardPlan.tensor_aligned(synthetic(300, tensor_elems=100), 0)


# --- checksums ---------------------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.integers(1, 10**11))
def test_default_chunk_elems_is_a_power_of_two_giving_enough_but_not_too_many_chunks(numel: int) -> None:
    # Execute
    chunk = checksum.default_chunk_elems(numel)

    # Assert
    assert chunk >= 1
    assert chunk & (chunk - 1) == 0
    assert chunk <= max(checksum.MIN_CHUNK_ELEMS, numel)
    count = -(-numel // chunk)
    assert count <= checksum.TARGET_CHUNKS or chunk == checksum.MIN_CHUNK_ELEMS
    # at least 64 whole chunks unless the chunk is already a single element
    assert numel // chunk >= checksum.MIN_CHUNKS or chunk == 1


_MIN = checksum.MIN_CHUNK_ELEMS


@pytest.mark.parametrize(
    ("numel", "expected"),
    [(1, 1), (63, 1), (64, 1), (128, 2), (64 * _MIN - 1, _MIN // 2), (64 * _MIN, _MIN), (4096 * _MIN, _MIN),
     (4096 * _MIN + 1, 2 * _MIN)],
)
def test_default_chunk_elems_examples(numel: int, expected: int) -> None:
    # Execute / Assert
    assert checksum.default_chunk_elems(numel) == expected


def test_chunk_grid_bounds_covering_and_alignment() -> None:
    # Prepare
    grid = checksum.ChunkGrid(10, 4)

    # Execute / Assert
    assert grid.count == 3
    assert [grid.bounds(i) for i in range(grid.count)] == [(0, 4), (4, 8), (8, 10)]
    assert grid.covering(3, 5) == range(0, 2)
    assert grid.covering(5, 5) == range(0)
    assert grid.extent(5, 9) == (4, 10)
    assert grid.is_aligned(4, 10)
    assert grid.is_aligned(0, 8)
    assert not grid.is_aligned(1, 8)
    assert not grid.is_aligned(4, 9)
    assert not grid.is_aligned(4, 4)


def test_chunk_grid_refuses_chunks_below_one_element() -> None:
    # Execute / Assert
    with pytest.raises(GradshardError, match="chunk size must be at least 1 element, got 0"):
        checksum.ChunkGrid(10, 0)


def test_chunk_stream_must_start_on_a_chunk_boundary() -> None:
    # Execute / Assert
    with pytest.raises(GradshardError, match="must start on a chunk boundary, got element 3"):
        checksum.ChunkStream(checksum.ChunkGrid(10, 4), 3)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 2000), st.integers(1, 300), st.data())
def test_chunk_stream_any_split_gives_the_whole_chunk_digests(numel: int, chunk: int, data: st.DataObject) -> None:
    # Prepare
    rng = np.random.default_rng(numel * 1000 + chunk)
    vec = rng.standard_normal(numel).astype(np.float32)
    grid = checksum.ChunkGrid(numel, chunk)
    first = data.draw(st.integers(0, grid.count - 1), label="first chunk")
    start = first * chunk
    cuts = sorted(data.draw(st.lists(st.integers(start, numel), max_size=12), label="split points"))
    expected = [(i, checksum.checksum(vec[a:b])) for i, (a, b) in
                ((i, grid.bounds(i)) for i in range(first, grid.count))]

    # Execute
    stream = checksum.ChunkStream(grid, start)
    got = []
    for a, b in itertools.pairwise([start, *cuts, numel]):
        got.extend(stream.feed(vec[a:b]))

    # Assert
    assert got == expected


def test_checksum_of_an_array_equals_the_checksum_of_its_bytes() -> None:
    # Prepare
    vec = np.arange(100, dtype=np.float32)

    # Execute / Assert
    assert checksum.checksum(vec) == checksum.checksum(vec.tobytes())
    assert len(checksum.checksum(vec)) == checksum.HEX_WIDTH


def test_pack_concatenates_fixed_width_checksums() -> None:
    hexes = [checksum.checksum(bytes([i])) for i in range(5)]

    packed = checksum.pack(hexes)

    assert len(packed) == 5 * checksum.HEX_WIDTH
    assert [packed[i : i + checksum.HEX_WIDTH] for i in range(0, len(packed), checksum.HEX_WIDTH)] == hexes


def test_auto_shards_are_one_per_worker_and_aggregate_the_same_bytes_as_any_explicit_m() -> None:
    # Prepare: one small round, aggregated once with M = 4 for reference
    from gradshard.aggregation.driver import AggregateConfig, aggregate_round
    from gradshard.demo.synthetic import make_round
    from gradshard.format.keys import aggregate_key
    from gradshard.runtime import InlineExecutor
    from gradshard.store import MemoryStore

    store = MemoryStore()
    make_round(store, 0, synthetic(10_000, tensor_elems=3_000), 5, chunk_elems=256)
    reference = aggregate_round(store, 0, InlineExecutor(), AggregateConfig(shards=4))
    expected = store.get(aggregate_key(0))
    executor = InlineExecutor()
    executor.workers = 3  # as if it ran three invocations at once

    # Execute: the default config
    store.delete(aggregate_key(0))
    result = aggregate_round(store, 0, executor, AggregateConfig())

    # Assert: M follows the executor, the bytes do not
    assert AggregateConfig().shards == "auto"
    assert reference.plan.params["m"] == 4 and result.plan.params["m"] == 3 and len(result.reports) == 3
    assert store.get(aggregate_key(0)) == expected
    assert AggregateConfig(shards=5).for_executor(executor).m == 5
    executor.workers = 1000  # more workers than the 40 chunks of 256 elements: one shard per chunk
    store.delete(aggregate_key(0))
    assert aggregate_round(store, 0, executor, AggregateConfig()).plan.params["m"] == 40
    assert store.get(aggregate_key(0)) == expected
    with pytest.raises(PlanError, match="for_executor"):
        _ = AggregateConfig().m
