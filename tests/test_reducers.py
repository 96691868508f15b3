"""Tests of the reducer kernels: byte-identical to independent numpy references, whatever the window split."""

from __future__ import annotations

import itertools
import tracemalloc
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gradshard.core.coverage import CoverageMap
from gradshard.core.layout import ModelLayout, TensorSpec
from gradshard.core.reduce import fedavg, fedavg_weights
from gradshard.core.reducers import (
    REDUCERS,
    NonFiniteInput,
    Reducer,
    ReducerSpec,
    make_reducer,
    parse_reducer,
    trim_count,
)
from gradshard.errors import GradshardError

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")  # kernels must not compute on garbage
Array = npt.NDArray[Any]
# (input dtype, accumulation dtype)
DTYPES = [("float32", "float32"), ("float64", "float64"), ("float32", "float64"), ("float64", "float32"),
          ("float16", "float32")]


# --- helpers -----------------------------------------------------------------------------------------------------
def assert_same_bytes(actual: Array, expected: Array) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    width = actual.dtype.itemsize
    differ = (actual.view(np.uint8).reshape(-1, width) != expected.view(np.uint8).reshape(-1, width)).any(axis=1)
    where = np.flatnonzero(differ)[:5]
    assert not differ.any(), f"bytes differ at {where.tolist()}: {actual[where].tolist()} != {expected[where].tolist()}"


def run_windows(spec: ReducerSpec | str, vectors: Array, bounds: list[int], *, examples: list[int],
                accumulate: str, covers: npt.NDArray[np.bool_] | None = None, previous: Array | None = None,
                parallel_reads: int = 1) -> Array:
    """Feed ``vectors`` (N, L) window by window (``bounds`` = cut points incl. 0 and L) as a shard function does:
    fill a batch of ``parallel_reads`` buffers, then add that batch in canonical order."""
    n_clients, length = vectors.shape
    capacity = max(b - a for a, b in itertools.pairwise(bounds))
    reducer = make_reducer(spec, weights=examples, capacity=capacity, in_dtype=vectors.dtype, accumulate=accumulate,
                           parallel_reads=parallel_reads)
    out = np.empty(length, dtype=accumulate)
    for a, b in itertools.pairwise(bounds):
        reducer.start(b - a)
        for lo in range(0, n_clients, parallel_reads):
            batch = range(lo, min(lo + parallel_reads, n_clients))
            for i in batch:
                reducer.buffer(i)[:] = vectors[i, a:b]
            for i in batch:
                mask = None if covers is None else covers[i, a:b]
                if mask is None or mask.all():
                    reducer.add(i)
                elif not mask.any():
                    reducer.skip(i)
                else:
                    reducer.add(i, mask.copy())

        def load(target: Array, a: int = a, b: int = b) -> None:
            assert previous is not None
            target[:] = previous[a:b]

        out[a:b] = reducer.finish(None if previous is None else load)
    return out


def _elements(dtype: str) -> st.SearchStrategy[float]:
    """Finite values with ties, signed zeros and (for float32/64) subnormals; bounded so no sum overflows."""
    widths: dict[str, Literal[16, 32, 64]] = {"float16": 16, "float32": 32, "float64": 64}
    width = widths[dtype]
    bound = 1000.0 if width == 16 else 1e6
    return st.one_of(st.floats(-bound, bound, width=width), st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 3.0]))


@st.composite
def _round(draw: st.DrawFn, dtype: str, min_clients: int = 1) -> tuple[Array, list[int], list[int]]:
    """(vectors (N, L), examples per client, window bounds [0, ..., L])."""
    n = draw(st.integers(min_clients, 9))
    length = draw(st.integers(1, 40))
    vectors = draw(hnp.arrays(np.dtype(dtype), (n, length), elements=_elements(dtype)))
    examples = draw(st.lists(st.integers(1, 1000), min_size=n, max_size=n))
    cuts = draw(st.lists(st.integers(1, max(1, length - 1)), max_size=6)) if length > 1 else []
    return vectors, examples, sorted({0, length, *cuts})


def _assert_window_independent(compute: Callable[[list[int]], Array], bounds: list[int], expected: Array) -> None:
    length = bounds[-1]
    assert_same_bytes(compute(bounds), expected)
    assert_same_bytes(compute([0, length]), expected)
    assert_same_bytes(compute(list(range(length + 1))), expected)  # one element per window


def allocated_bytes(obj: object) -> int:
    """Bytes of the distinct arrays an object (and the gradshard objects it holds) owns."""
    owners: dict[int, int] = {}

    def visit(o: object) -> None:
        for value in vars(o).values():
            if isinstance(value, np.ndarray):
                while isinstance(value.base, np.ndarray):
                    value = value.base
                owners[id(value)] = value.nbytes
            elif type(value).__module__.startswith("gradshard"):
                visit(value)

    visit(obj)
    return sum(owners.values())


# --- the spec ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["mean", "coverage-mean", "median", "trimmed-mean:0.1", "trimmed-mean:0.0",
                                  "trimmed-mean:0.49"])
def test_text_form_round_trips(text: str) -> None:
    spec = parse_reducer(text)

    assert spec.text == text
    assert parse_reducer(spec.text) == spec
    assert REDUCERS[spec.name].name == spec.name


def test_parsed_beta_is_the_number() -> None:
    assert parse_reducer(" trimmed-mean:0.25 ") == ReducerSpec(name="trimmed-mean", beta=0.25)
    assert parse_reducer("median") == ReducerSpec(name="median")


@pytest.mark.parametrize("text", ["meen", "", "trimmed-mean", "trimmed-mean:0.5", "trimmed-mean:-0.1",
                                  "trimmed-mean:abc", "trimmed-mean:nan", "median:3", "krum"])
def test_bad_text_is_rejected(text: str) -> None:
    with pytest.raises(GradshardError, match="reducer"):
        parse_reducer(text)


def test_unknown_reducer_error_lists_the_known_ones() -> None:
    with pytest.raises(GradshardError) as info:
        parse_reducer("geometric-median")

    for name in ("mean", "coverage-mean", "median", "trimmed-mean", "krum:<f>", "multi-krum:<f>,<k>", "bulyan:<f>"):
        assert name in str(info.value)


@pytest.mark.parametrize(("beta", "n", "k"), [(0.1, 10, 1), (0.3, 10, 3), (0.2, 9, 1), (0.0, 5, 0), (0.49, 9, 4),
                                              (0.25, 3, 0)])
def test_trim_count_is_floor_of_beta_times_n(beta: float, n: int, k: int) -> None:
    assert trim_count(beta, n) == k


def test_trim_that_leaves_nothing_is_rejected_naming_n_and_beta() -> None:
    spec = ReducerSpec.model_construct(name="trimmed-mean", beta=0.5)  # bypasses the range check on purpose

    with pytest.raises(GradshardError, match=r"N=4.*0\.5|0\.5.*N=4"):
        make_reducer(spec, weights=[1, 1, 1, 1], capacity=8, in_dtype="float32", accumulate="float32")
    with pytest.raises(GradshardError, match="N=4"):
        REDUCERS["trimmed-mean"].memory_bytes(spec, clients=4, window_elems=8, itemsize=4, accumulate="float32")


# --- mean: today's FedAvg bytes ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("in_dtype", "accumulate"), DTYPES)
@settings(max_examples=20, deadline=None)
@given(data=st.data(), parallel_reads=st.integers(1, 4))
def test_mean_is_fedavg_byte_for_byte_for_every_window_split(in_dtype: str, accumulate: str, data: st.DataObject,
                                                             parallel_reads: int) -> None:
    # Prepare
    vectors, examples, bounds = data.draw(_round(in_dtype))
    expected = fedavg(list(vectors), fedavg_weights(examples), accumulate)

    # Execute / Assert
    _assert_window_independent(
        lambda b: run_windows("mean", vectors, b, examples=examples, accumulate=accumulate,
                              parallel_reads=parallel_reads), bounds, expected)


def test_mean_rejects_partial_coverage_and_accepts_full_coverage() -> None:
    reducer = make_reducer("mean", weights=[1, 2], capacity=4, in_dtype="float32", accumulate="float32")
    reducer.start(4)
    reducer.buffer(0)[:] = 1.0
    reducer.add(0, np.ones(4, dtype=bool))
    reducer.buffer(1)[:] = 4.0

    with pytest.raises(GradshardError, match="coverage-mean"):
        reducer.add(1, np.array([True, False, True, True]))
    with pytest.raises(GradshardError, match="every client"):
        reducer.skip(1)


# --- coverage-mean -----------------------------------------------------------------------------------------------
def coverage_mean_reference(vectors: Array, covers: npt.NDArray[np.bool_], examples: list[int], accumulate: str,
                            previous: Array | None) -> Array:
    """Dense masked sums in client order, value sum / weight sum, previous value (or 0) where nobody covers."""
    acc = np.dtype(accumulate)
    total = float(sum(examples))
    num = np.zeros(vectors.shape[1], dtype=acc)
    den = np.zeros(vectors.shape[1], dtype=acc)
    for x, m, n in zip(vectors, covers, examples, strict=True):
        w = acc.type(n / total)
        num[m] = num[m] + (x[m] * w).astype(acc)
        den[m] = den[m] + w
    out = np.zeros(vectors.shape[1], dtype=acc) if previous is None else previous.copy()
    some = den > 0
    out[some] = num[some] / den[some]
    return out


@pytest.mark.parametrize(("in_dtype", "accumulate"), DTYPES)
@settings(max_examples=20, deadline=None)
@given(data=st.data(), parallel_reads=st.integers(1, 3), with_previous=st.booleans())
def test_coverage_mean_matches_the_dense_reference_for_every_window_split(
        in_dtype: str, accumulate: str, data: st.DataObject, parallel_reads: int, with_previous: bool) -> None:
    # Prepare
    vectors, examples, bounds = data.draw(_round(in_dtype))
    covers = data.draw(hnp.arrays(np.bool_, vectors.shape))
    if data.draw(st.booleans()):
        covers[0] = True  # a client that trained everything (add without a mask)
    previous = (data.draw(hnp.arrays(np.dtype(accumulate), vectors.shape[1], elements=_elements(accumulate)))
                if with_previous else None)
    expected = coverage_mean_reference(vectors, covers, examples, accumulate, previous)

    # Execute / Assert
    _assert_window_independent(
        lambda b: run_windows("coverage-mean", vectors, b, examples=examples, accumulate=accumulate, covers=covers,
                              previous=previous, parallel_reads=parallel_reads), bounds, expected)


def test_coverage_mean_with_full_coverage_averages_like_fedavg() -> None:
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((5, 100)).astype(np.float32)
    examples = [3, 1, 4, 1, 5]
    covers = np.ones(vectors.shape, dtype=bool)

    result = run_windows("coverage-mean", vectors, [0, 37, 100], examples=examples, accumulate="float64",
                         covers=covers)

    np.testing.assert_allclose(result, np.average(vectors.astype(np.float64), axis=0, weights=examples), rtol=1e-12)


def test_coverage_mean_loads_previous_values_only_when_something_is_uncovered() -> None:
    reducer = make_reducer("coverage-mean", weights=[1, 1], capacity=3, in_dtype="float32", accumulate="float32")
    calls: list[int] = []

    def load(target: Array) -> None:
        calls.append(len(target))
        target[:] = [7.0, 8.0, 9.0]

    reducer.start(3)
    reducer.buffer(0)[:] = [1.0, 2.0, 3.0]
    reducer.add(0)
    reducer.buffer(1)[:] = [3.0, 4.0, 5.0]
    reducer.add(1, np.array([True, True, False]))
    np.testing.assert_array_equal(reducer.finish(load), [2.0, 3.0, 3.0])
    assert calls == []

    reducer.start(3)
    reducer.buffer(0)[:] = [1.0, 2.0, 3.0]
    reducer.add(0, np.array([True, False, False]))
    reducer.skip(1)
    np.testing.assert_array_equal(reducer.finish(load), [1.0, 8.0, 9.0])
    assert calls == [3]


def test_coverage_mean_with_coverage_maps_keeps_untrained_elements() -> None:
    # Prepare: three width-scaled clients of a small model; the server's previous model is all -1
    layout = ModelLayout([TensorSpec("conv.weight", (8, 4, 3, 3), "float32"), TensorSpec("conv.bias", (8,), "float32"),
                          TensorSpec("fc.weight", (10, 8), "float32")])
    extents: list[dict[str, list[int]]] = [
        {"conv.bias": [8], "fc.weight": [10, 8]},
        {"conv.weight": [4, 2, 3, 3], "conv.bias": [4], "fc.weight": [10, 4]},
        {"conv.weight": [2, 1, 3, 1]},
    ]
    maps = [CoverageMap(layout, e) for e in extents]
    dense = np.zeros((3, layout.numel), dtype=bool)
    for row, e in zip(dense, extents, strict=True):
        tensors = layout.unflatten(row)
        for name, extent in e.items():
            tensors[name][tuple(slice(0, k) for k in extent)] = True
    rng = np.random.default_rng(11)
    vectors = rng.standard_normal((3, layout.numel)).astype(np.float32)
    examples = [50, 20, 5]
    previous = np.full(layout.numel, -1.0, dtype=np.float32)
    expected = coverage_mean_reference(vectors, dense, examples, "float32", previous)
    window = 50
    reducer = make_reducer("coverage-mean", weights=examples, capacity=window, in_dtype="float32",
                           accumulate="float32")
    mask_buf = np.empty(window, dtype=bool)
    out = np.empty(layout.numel, dtype=np.float32)

    # Execute
    for a in range(0, layout.numel, window):
        b = min(a + window, layout.numel)
        reducer.start(b - a)
        for i, cov in enumerate(maps):
            if not cov.any_covered(a, b):
                reducer.skip(i)
                continue
            reducer.buffer(i)[:] = vectors[i, a:b]
            reducer.add(i, cov.mask(a, b, mask_buf))

        def load(target: Array, a: int = a, b: int = b) -> None:
            target[:] = previous[a:b]

        out[a:b] = reducer.finish(load)

    # Assert
    assert_same_bytes(out, expected)
    assert (out == -1.0).sum() == (~dense.any(axis=0)).sum() > 0


def test_coverage_mean_rejects_weights_that_round_to_zero() -> None:
    with pytest.raises(GradshardError, match="float64"):
        make_reducer("coverage-mean", weights=[1, 1e60], capacity=4, in_dtype="float32", accumulate="float32")


# --- median ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("in_dtype", "accumulate"), DTYPES)
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_median_is_numpy_median_byte_for_byte_for_every_window_split(in_dtype: str, accumulate: str,
                                                                     data: st.DataObject) -> None:
    # Prepare: np.median of the values in the accumulation dtype (the same array when the dtypes agree)
    vectors, examples, bounds = data.draw(_round(in_dtype))
    expected = np.median(vectors.astype(accumulate), axis=0)

    # Execute / Assert
    _assert_window_independent(
        lambda b: run_windows("median", vectors, b, examples=examples, accumulate=accumulate), bounds, expected)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n", [1, 2, 5, 8, 101, 128])  # numpy partitions N >= ~100 only partly
def test_median_of_random_data_is_numpy_median_byte_for_byte(dtype: str, n: int) -> None:
    rng = np.random.default_rng(n)
    vectors = (rng.standard_normal((n, 5000)) * 10 ** rng.uniform(-30, 30, (n, 5000))).astype(dtype)

    result = run_windows("median", vectors, [0, 1234, 4096, 5000], examples=[1] * n, accumulate=dtype)

    assert_same_bytes(result, np.median(vectors, axis=0))


# --- trimmed mean ------------------------------------------------------------------------------------------------
def trimmed_reference(vectors: Array, beta: float, accumulate: str) -> Array:
    """Sort along axis 0, drop k rows at each end, sum the rest row by row from 0, divide by the count."""
    n = vectors.shape[0]
    k = int(np.floor(beta * n))
    rows = np.sort(vectors.astype(accumulate), axis=0)[k : n - k]
    total = np.zeros(vectors.shape[1], dtype=accumulate)
    for row in rows:
        total = total + row
    return total / len(rows)


@pytest.mark.parametrize(("in_dtype", "accumulate"), DTYPES)
@settings(max_examples=20, deadline=None)
@given(data=st.data(), beta=st.sampled_from([0.0, 0.1, 0.2, 0.25, 0.34, 0.49]))
def test_trimmed_mean_matches_the_sorted_trim_reference_for_every_window_split(
        in_dtype: str, accumulate: str, data: st.DataObject, beta: float) -> None:
    # Prepare
    vectors, examples, bounds = data.draw(_round(in_dtype))
    spec = ReducerSpec(name="trimmed-mean", beta=beta)
    expected = trimmed_reference(vectors, beta, accumulate)

    # Execute / Assert
    _assert_window_independent(
        lambda b: run_windows(spec, vectors, b, examples=examples, accumulate=accumulate), bounds, expected)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.25, 0.4])
@pytest.mark.parametrize("n", [1, 4, 9])
def test_trimmed_mean_is_close_to_numpy_mean_of_the_kept_values(beta: float, n: int) -> None:
    rng = np.random.default_rng(n)
    vectors = (rng.standard_normal((n, 3000)) + 5).astype(np.float32)
    k = int(beta * n)

    result = run_windows(f"trimmed-mean:{beta}", vectors, [0, 999, 3000], examples=[1] * n, accumulate="float32")

    np.testing.assert_allclose(result, np.mean(np.sort(vectors, axis=0)[k : n - k], axis=0), rtol=1e-6)


# --- non-finite input --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["median", "trimmed-mean:0.2"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("culprit", [0, 3, 5])
def test_order_statistics_reject_non_finite_input_naming_the_client(text: str, bad: float, culprit: int) -> None:
    reducer = make_reducer(text, weights=[1] * 6, capacity=10, in_dtype="float32", accumulate="float32")
    reducer.start(10)
    for i in range(culprit):
        reducer.buffer(i)[:] = i
        reducer.add(i)
    reducer.buffer(culprit)[:] = 1.0
    reducer.buffer(culprit)[7] = bad

    with pytest.raises(NonFiniteInput) as info:
        reducer.add(culprit)

    assert info.value.index == culprit
    assert isinstance(info.value, GradshardError)
    assert f"position {culprit}" in str(info.value)


def test_large_finite_values_whose_sum_overflows_are_accepted() -> None:
    reducer = make_reducer("median", weights=[1, 1, 1], capacity=4, in_dtype="float32", accumulate="float32")
    big = np.float32(3e38)
    reducer.start(4)
    for i in range(3):
        reducer.buffer(i)[:] = [big, big, -big, float(i)]
        reducer.add(i)

    np.testing.assert_array_equal(reducer.finish(), [big, big, -big, 1.0])


# --- memory ------------------------------------------------------------------------------------------------------
SPECS = ["mean", "coverage-mean", "median", "trimmed-mean:0.2"]


@pytest.mark.parametrize("text", SPECS)
@pytest.mark.parametrize(("in_dtype", "accumulate"), DTYPES)
@pytest.mark.parametrize(("clients", "parallel_reads"), [(1, 1), (2, 1), (7, 3), (4, 9)])
def test_memory_bytes_is_what_the_instance_allocates(text: str, in_dtype: str, accumulate: str, clients: int,
                                                     parallel_reads: int) -> None:
    # Prepare
    spec = parse_reducer(text)
    window = 1000
    vectors = np.arange(clients * window, dtype=in_dtype).reshape(clients, window) % 97
    covers = np.zeros(vectors.shape, dtype=bool)
    covers[:, ::3] = True

    # Execute: build, then run two windows (so a buffer allocated lazily would show)
    reducer = make_reducer(spec, weights=list(range(1, clients + 1)), capacity=window, in_dtype=in_dtype,
                           accumulate=accumulate, parallel_reads=parallel_reads)
    before = allocated_bytes(reducer)
    for n in (window, 17):
        reducer.start(n)
        for i in range(clients):
            reducer.buffer(i)[:] = vectors[i, :n]
            reducer.add(i, covers[i, :n] if REDUCERS[spec.name].uses_coverage else None)
        reducer.finish(lambda t: t.fill(0))
    predicted = REDUCERS[spec.name].memory_bytes(spec, clients=clients, window_elems=window,
                                                 itemsize=np.dtype(in_dtype).itemsize, accumulate=accumulate,
                                                 parallel_reads=parallel_reads)

    # Assert
    assert allocated_bytes(reducer) == before == predicted
    if REDUCERS[spec.name].holds_all_clients and accumulate == "float32":
        assert predicted <= (clients + 2) * window * np.dtype(in_dtype).itemsize


@pytest.mark.parametrize("text", SPECS)
@pytest.mark.parametrize(("in_dtype", "accumulate"), [("float32", "float32"), ("float16", "float32"),
                                                      ("float64", "float32")])
def test_a_window_allocates_nothing_of_the_window_size(text: str, in_dtype: str, accumulate: str) -> None:
    # Prepare
    clients, window = 4, 1 << 17
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((clients, window)).astype(in_dtype)
    covers = rng.random((clients, window)) < 0.5
    reducer = make_reducer(text, weights=[1, 2, 3, 4], capacity=window, in_dtype=in_dtype, accumulate=accumulate)

    # Execute
    tracemalloc.start()
    reducer.start(window)
    for i in range(clients):
        reducer.buffer(i)[:] = vectors[i]
        reducer.add(i, covers[i] if reducer.uses_coverage else None)
    reducer.finish(lambda t: t.fill(1))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    # Assert: numpy's cast buffers and per-lane sort buffers, far below one window of float32
    assert peak < window  # bytes, a quarter of a float32 window


# --- protocol ----------------------------------------------------------------------------------------------------
def test_protocol_violations_are_errors() -> None:
    reducer = make_reducer("median", weights=[1, 1, 1], capacity=8, in_dtype="float32", accumulate="float32")

    with pytest.raises(GradshardError, match="start"):
        reducer.add(0)
    with pytest.raises(GradshardError, match="does not fit"):
        reducer.start(9)
    reducer.start(8)
    with pytest.raises(GradshardError, match="out of order"):
        reducer.add(1)
    reducer.buffer(0)[:] = 1
    reducer.add(0)
    with pytest.raises(GradshardError, match="1 of 3"):
        reducer.finish()
    with pytest.raises(GradshardError, match="no buffer"):
        reducer.buffer(3)
    with pytest.raises(GradshardError, match="8 booleans"):
        reducer.add(1, np.ones(7, dtype=bool))


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"weights": []}, "at least one"),
        ({"weights": [1, 0]}, "> 0"),
        ({"weights": [1, float("nan")]}, "> 0"),
        ({"capacity": 0}, "capacity"),
        ({"in_dtype": "int32"}, "input dtype"),
        ({"accumulate": "float16"}, "accumulation dtype"),
        ({"parallel_reads": 0}, "parallel_reads"),
    ],
)
def test_bad_constructor_arguments_are_rejected(kwargs: dict[str, Any], needle: str) -> None:
    args: dict[str, Any] = {"weights": [1, 2], "capacity": 4, "in_dtype": "float32", "accumulate": "float32"}
    args.update(kwargs)

    with pytest.raises(GradshardError, match=needle):
        make_reducer("mean", **args)


def test_a_spec_for_another_reducer_is_rejected() -> None:
    cls: type[Reducer] = REDUCERS["median"]

    with pytest.raises(GradshardError, match="implements 'median'"):
        cls(parse_reducer("mean"), weights=[1], capacity=4, in_dtype="float32", accumulate="float32")
