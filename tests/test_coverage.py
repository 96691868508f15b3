"""Tests of coverage maps against dense masks built by numpy slicing (an independent reference)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradshard.core.coverage import CoverageMap
from gradshard.core.layout import ModelLayout, TensorSpec
from gradshard.errors import GradshardError, LayoutError

Extents = dict[str, list[int]]


@st.composite
def _layout_and_extents(draw: st.DrawFn) -> tuple[ModelLayout, Extents]:
    """1–5 tensors of 1–4 dims, sizes 1–7; each tensor absent, fully covered or covered by random extents."""
    shapes = draw(st.lists(st.lists(st.integers(1, 7), min_size=1, max_size=4), min_size=1, max_size=5))
    layout = ModelLayout(TensorSpec(f"t{i}", tuple(s), "float32") for i, s in enumerate(shapes))
    extents: Extents = {}
    for spec in layout:
        kind = draw(st.sampled_from(["absent", "full", "random"]))
        if kind == "full":
            extents[spec.name] = list(spec.shape)
        elif kind == "random":
            extents[spec.name] = [draw(st.integers(0, s)) for s in spec.shape]
    return layout, extents


def _dense_reference(layout: ModelLayout, extents: Extents) -> npt.NDArray[np.bool_]:
    parts = []
    for spec in layout:
        ref = np.zeros(spec.shape, dtype=bool)
        if spec.name in extents:
            ref[tuple(slice(0, e) for e in extents[spec.name])] = True
        parts.append(ref.reshape(-1))
    return np.concatenate(parts)


def _runs_to_mask(lo: npt.NDArray[np.int64], hi: npt.NDArray[np.int64], start: int, stop: int,
                  ) -> npt.NDArray[np.bool_]:
    dense = np.zeros(stop - start, dtype=bool)
    for a, b in zip(lo.tolist(), hi.tolist(), strict=True):
        dense[a - start : b - start] = True
    return dense


@settings(max_examples=100, deadline=None)
@given(_layout_and_extents(), st.data())
def test_queries_agree_with_a_dense_slicing_reference(case: tuple[ModelLayout, Extents], data: st.DataObject,
                                                      ) -> None:
    # Prepare
    layout, extents = case
    ref = _dense_reference(layout, extents)
    numel = layout.numel
    queries = [(0, numel)] + [
        tuple(sorted(data.draw(st.tuples(st.integers(0, numel), st.integers(0, numel))))) for _ in range(4)
    ]

    # Execute
    cov = CoverageMap(layout, extents)

    # Assert
    assert cov.covered_elems == int(ref.sum())
    assert cov.full == bool(ref.all())
    for start, stop in queries:
        out = np.ones(numel + 3, dtype=bool)  # longer than the query, dirty
        mask = cov.mask(start, stop, out)
        np.testing.assert_array_equal(mask, ref[start:stop])
        lo, hi = cov.runs(start, stop)
        assert lo.dtype == np.int64 and hi.dtype == np.int64
        assert np.all(lo < hi)
        assert np.all(hi[:-1] < lo[1:])  # sorted, disjoint and merged where adjacent
        assert np.all(lo >= start) and np.all(hi <= stop)
        np.testing.assert_array_equal(_runs_to_mask(lo, hi, start, stop), ref[start:stop])
        assert cov.count(start, stop) == int(ref[start:stop].sum())
        assert cov.any_covered(start, stop) == bool(ref[start:stop].any())


def test_many_runs_take_the_difference_array_path_and_match_the_reference() -> None:
    # Prepare: 200 rows with a partial last dimension: one run per row, more than the slicing path handles
    layout = ModelLayout([TensorSpec("emb", (200, 5), "float32"), TensorSpec("w", (7, 9, 3), "float32")])
    extents = {"emb": [150, 2], "w": [7, 4, 3]}
    ref = _dense_reference(layout, extents)
    cov = CoverageMap(layout, extents)
    out = np.empty(layout.numel, dtype=bool)

    # Execute / Assert
    for start, stop in [(0, layout.numel), (3, 997), (748, 1100), (999, 1001)]:
        np.testing.assert_array_equal(cov.mask(start, stop, out), ref[start:stop])
        assert len(cov.runs(0, layout.numel)[0]) > 40


def test_scalar_tensor_and_adjacent_whole_tensors_merge_into_one_run() -> None:
    layout = ModelLayout([TensorSpec("s", (), "float32"), TensorSpec("b", (4,), "float32"),
                          TensorSpec("w", (3, 2), "float32")])
    cov = CoverageMap(layout, {"s": [], "b": [4], "w": [2, 2]})

    lo, hi = cov.runs(0, layout.numel)

    assert lo.tolist() == [0] and hi.tolist() == [9]
    assert cov.covered_elems == 9 and not cov.full
    assert CoverageMap(layout, {"s": [], "b": [4], "w": [3, 2]}).full


def test_empty_coverage_covers_nothing() -> None:
    layout = ModelLayout([TensorSpec("a", (3, 4), "float32")])
    cov = CoverageMap(layout, {"a": [0, 4]})

    assert cov.covered_elems == 0
    assert not cov.any_covered(0, 12)
    assert cov.count(0, 12) == 0
    assert not cov.mask(0, 12, np.ones(12, dtype=bool)).any()
    assert len(cov.runs(0, 12)[0]) == 0


@pytest.mark.parametrize(
    ("extents", "needle"),
    [
        ({"conv.weight": [32, 16, 3]}, "conv.weight"),  # wrong number of dims
        ({"conv.weight": [32, 16, 3, 4]}, "conv.weight"),  # larger than the shape
        ({"conv.weight": [-1, 16, 3, 3]}, "conv.weight"),
        ({"conv.weight": [1.5, 16, 3, 3]}, "conv.weight"),  # not integers
        ({"conv.weight": "32"}, "conv.weight"),
        ({"fc.bias": [10]}, "fc.bias"),  # not in the layout
    ],
)
def test_bad_extents_are_rejected_naming_the_tensor(extents: dict[str, object], needle: str) -> None:
    layout = ModelLayout([TensorSpec("conv.weight", (64, 16, 3, 3), "float32")])

    with pytest.raises(LayoutError, match=needle) as info:
        CoverageMap(layout, extents)  # type: ignore[arg-type]

    assert isinstance(info.value, GradshardError)


def test_an_empty_query_inside_a_covered_run_covers_nothing() -> None:
    layout = ModelLayout([TensorSpec("a", (4,), "float32"), TensorSpec("b", (2, 3), "float32")])
    cov = CoverageMap(layout, {"a": [4], "b": [1, 3]})

    for at in (0, 1, 4, 6, 10):
        lo, hi = cov.runs(at, at)
        assert len(lo) == len(hi) == 0
        assert not cov.any_covered(at, at)
        assert cov.count(at, at) == 0
        assert len(cov.mask(at, at, np.ones(3, dtype=bool))) == 0


def test_queries_outside_the_vector_and_short_buffers_are_rejected() -> None:
    layout = ModelLayout([TensorSpec("a", (3, 4), "float32")])
    cov = CoverageMap(layout, {"a": [2, 4]})

    with pytest.raises(LayoutError, match="not inside"):
        cov.runs(5, 13)
    with pytest.raises(LayoutError, match="not inside"):
        cov.count(6, 5)
    with pytest.raises(LayoutError, match="at least 12 booleans"):
        cov.mask(0, 12, np.empty(11, dtype=bool))


def test_a_window_query_in_a_huge_tensor_costs_only_the_window() -> None:
    # Prepare: 2^26 elements in 2^25 one-element runs; a dense mask or the full run list would need >= 64 MiB
    layout = ModelLayout([TensorSpec("big", (1 << 25, 2), "float32")])
    cov = CoverageMap(layout, {"big": [1 << 25, 1]})
    start, n = (1 << 25) + 7, 1 << 16
    out = np.empty(n, dtype=bool)
    expected = (np.arange(start, start + n) % 2) == 0

    # Execute
    tracemalloc.start()
    mask = cov.mask(start, start + n, out)
    count = cov.count(start, start + n)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    # Assert: the runs of the window (32768 of them, 16 bytes each) and small temporaries, nothing tensor-sized
    np.testing.assert_array_equal(mask, expected)
    assert count == int(expected.sum())
    assert peak < 40 * n
