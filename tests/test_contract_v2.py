"""Aggregation contract v2 end to end: per-client weights and coverage in the manifest, pluggable reducers in the
shard functions — every reducer byte-identical for every M and partition, equal to a dense numpy reference."""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradshard import AggregateConfig, aggregate_round
from gradshard.aggregation.contracts import ReduceResult
from gradshard.core.layout import ModelLayout, TensorSpec
from gradshard.errors import GradshardError, PlanError
from gradshard.format.keys import aggregate_key, update_key
from gradshard.format.round import RoundSpec, load_manifest, open_round
from gradshard.format.update import UpdateMeta, open_update, read_flat
from gradshard.format.writer import write_update
from gradshard.runtime import InlineExecutor, LocalExecutor
from gradshard.runtime.registry import parse_result
from gradshard.store import MemoryStore, Store
from gradshard.units import MIB

F32 = npt.NDArray[np.float32]
CHUNK = 4
# A small CNN's tensors (conv, conv, linear), as a width-scaled supernet would cut them.
CNN = ModelLayout([TensorSpec("conv1.weight", (8, 1, 3, 3), "float32"), TensorSpec("conv1.bias", (8,), "float32"),
                   TensorSpec("conv2.weight", (16, 8, 3, 3), "float32"), TensorSpec("conv2.bias", (16,), "float32"),
                   TensorSpec("fc.weight", (10, 64), "float32"), TensorSpec("fc.bias", (10,), "float32")])
BASE_KEY = "models/base.safetensors"
Coverage = dict[str, tuple[int, ...]] | None


def dense_mask(layout: ModelLayout, coverage: Coverage) -> npt.NDArray[np.bool_]:
    """The covered elements as a full-size mask, built by slicing each tensor (the reference, independent of the
    run-based coverage maps the functions use)."""
    if coverage is None:
        return np.ones(layout.numel, dtype=np.bool_)
    parts = []
    for spec in layout:
        block = np.zeros(spec.shape, dtype=np.bool_)
        if spec.name in coverage:
            block[tuple(slice(0, e) for e in coverage[spec.name])] = True
        parts.append(block.ravel())
    return np.concatenate(parts)


def random_coverage(rng: np.random.Generator, layout: ModelLayout) -> Coverage:
    """Leading slices of random extents; some tensors untrained, some clients full."""
    if rng.random() < 0.2:
        return None
    coverage = {}
    for spec in layout:
        kind = rng.random()
        if kind < 0.2:
            continue  # not trained
        coverage[spec.name] = tuple(spec.shape) if kind < 0.4 else tuple(int(rng.integers(1, d + 1))
                                                                           for d in spec.shape)
    return coverage


def coverage_round(seed: int, n: int = 6) -> tuple[MemoryStore, dict[str, F32], dict[str, Coverage], F32,
                                                   dict[str, int]]:
    """A round of ``n`` clients with overlapping leading-slice coverages; uncovered elements hold NaN (so any use
    of them would show) and the base model is in the store."""
    rng = np.random.default_rng(seed)
    store = MemoryStore()
    base = rng.standard_normal(CNN.numel).astype(np.float32)
    write_update(store, BASE_KEY, CNN, base, UpdateMeta(client="server", round=0, examples=1, kind="model",
                                                        layout_digest=CNN.digest(), chunk_elems=CHUNK))
    with open_update(store, BASE_KEY, "base", CNN) as upd:
        base_sha = upd.sha256
    open_round(store, RoundSpec.create(0, CNN, chunk_elems=CHUNK, base_model=base_sha, base_key=BASE_KEY))
    vecs, coverages, examples = {}, {}, {}
    for i in range(n):
        client = f"c{i:02d}"
        coverage = random_coverage(rng, CNN)
        values = (rng.standard_normal(CNN.numel) * 10.0 ** rng.uniform(-2, 2, CNN.numel)).astype(np.float32)
        values[~dense_mask(CNN, coverage)] = np.nan
        vecs[client], coverages[client], examples[client] = values, coverage, int(rng.integers(1, 500))
        write_update(store, update_key(0, client), CNN, values, UpdateMeta(
            client=client, round=0, examples=examples[client], layout_digest=CNN.digest(), chunk_elems=CHUNK,
            base_model=base_sha, coverage=coverage))
    return store, vecs, coverages, base, examples


def coverage_mean_reference(vecs: dict[str, F32], coverages: dict[str, Coverage], examples: dict[str, int],
                            base: F32) -> F32:
    """θ_j = Σ w_i x_ij / Σ w_i over covering clients (float32, clients in sorted order), base where none covers."""
    order = sorted(vecs)
    total = math.fsum(examples[c] for c in order)
    num = np.zeros(len(base), dtype=np.float32)
    den = np.zeros(len(base), dtype=np.float32)
    for c in order:
        w = np.float32(examples[c] / total)
        mask = dense_mask(CNN, coverages[c])
        num[mask] += vecs[c][mask] * w
        den[mask] += w
    out = base.copy()
    covered = den > 0
    out[covered] = num[covered] / den[covered]
    return out


def aggregate(store: Store, executor: Any = None, **config: Any) -> tuple[bytes, Any]:
    result = aggregate_round(store, 0, executor or InlineExecutor(), AggregateConfig(**config))
    return store.get(aggregate_key(0)), result


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_coverage_mean_equals_the_dense_reference_for_every_m_and_partition(seed: int) -> None:
    # Prepare
    store, vecs, coverages, base, examples = coverage_round(seed)
    expected = coverage_mean_reference(vecs, coverages, examples, base)

    # Execute: windows of 7 elements cross chunks and tensors
    outputs = {}
    for m in (1, 2, 3, 8):
        outputs[f"M={m}"], _ = aggregate(store, reducer="coverage-mean", shards=m, window_bytes=28)
    for m in (2, 3):
        outputs[f"tensor-aligned M={m}"], _ = aggregate(store, reducer="coverage-mean", shards=m,
                                                        partition="tensor-aligned", window_bytes=28)
    outputs["flat"], _ = aggregate(store, reducer="coverage-mean", topology="flat")
    outputs["M=3, 2 parallel reads"], _ = aggregate(store, reducer="coverage-mean", shards=3, window_bytes=20,
                                                    parallel_reads=2)

    # Assert: one set of bytes, equal to the reference, bitwise the base model wherever nobody covered
    assert len(set(outputs.values())) == 1, {k: hash(v) for k, v in outputs.items()}
    got = read_flat(store, aggregate_key(0), CNN)
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))
    nobody = ~np.any([dense_mask(CNN, coverages[c]) for c in vecs], axis=0)
    np.testing.assert_array_equal(got[nobody].view(np.uint32), base[nobody].view(np.uint32))
    assert np.isfinite(got).all()


def test_uncovered_elements_stay_zero_without_a_base_model() -> None:
    # Prepare: deltas (no base_key): elements nobody trained are an update of 0
    store = MemoryStore()
    layout = ModelLayout([TensorSpec("w", (4, 6), "float32")])
    open_round(store, RoundSpec.create(0, layout, chunk_elems=4))
    for client, extent in (("a", (2, 6)), ("b", (1, 3))):
        write_update(store, update_key(0, client), layout, np.ones(24, dtype=np.float32),
                     UpdateMeta(client=client, round=0, examples=1, layout_digest=layout.digest(), chunk_elems=4,
                                coverage={"w": extent}))

    # Execute
    aggregate(store, reducer="coverage-mean", shards=2)

    # Assert
    got = read_flat(store, aggregate_key(0), layout).reshape(4, 6)
    np.testing.assert_array_equal(got[:2], 1.0)
    np.testing.assert_array_equal(got[2:], 0.0)


def test_each_client_is_read_only_over_the_chunks_that_hold_its_covered_elements() -> None:
    # Prepare
    store, _, coverages, _, _ = coverage_round(seed=5, n=5)
    numel = CNN.numel

    # Execute
    _, result = aggregate(store, reducer="coverage-mean", shards=3, window_bytes=28)

    # Assert: per client, the bytes of every chunk with a covered element (from the dense mask), and nothing else
    read: dict[str, int] = {}
    for report in result.reports:
        for client, n in parse_result(report.function, report.result, ReduceResult).bytes_read_per_client.items():
            read[client] = read.get(client, 0) + n
    for client, coverage in coverages.items():
        mask = dense_mask(CNN, coverage)
        expected = sum(4 * (min(a + CHUNK, numel) - a) for a in range(0, numel, CHUNK) if mask[a : a + CHUNK].any())
        assert read[client] == expected, client
    assert any(read[c] < 4 * numel for c in coverages if coverages[c] is not None)


def stacked_round(n: int, seed: int, numel: int = 600) -> tuple[MemoryStore, ModelLayout, F32]:
    rng = np.random.default_rng(seed)
    store = MemoryStore()
    layout = ModelLayout([TensorSpec("a", (numel - 100,), "float32"), TensorSpec("b", (10, 10), "float32")])
    open_round(store, RoundSpec.create(0, layout, chunk_elems=CHUNK))
    stack = np.empty((n, numel), dtype=np.float32)
    for i in range(n):
        stack[i] = rng.standard_normal(numel) * 10.0 ** rng.uniform(-3, 3, numel)
        stack[i, rng.random(numel) < 0.1] = 0.5  # ties
        write_update(store, update_key(0, f"c{i:02d}"), layout, stack[i], UpdateMeta(
            client=f"c{i:02d}", round=0, examples=i + 1, layout_digest=layout.digest(), chunk_elems=CHUNK))
    return store, layout, stack


@pytest.mark.parametrize("n", [5, 6])
def test_median_is_np_median_byte_for_byte_for_every_m(n: int) -> None:
    # Prepare
    store, layout, stack = stacked_round(n, seed=n)
    expected = np.median(stack, axis=0)

    # Execute
    outputs = {m: aggregate(store, reducer="median", shards=m, window_bytes=44, parallel_reads=3)[0]
               for m in (1, 2, 3, 8, 64)}
    outputs[0] = aggregate(store, reducer="median", topology="flat")[0]

    # Assert
    assert len(set(outputs.values())) == 1
    np.testing.assert_array_equal(read_flat(store, aggregate_key(0), layout).view(np.uint32),
                                  expected.view(np.uint32))


def sorted_trim_reference(stack: F32, beta: float) -> F32:
    """Sort each coordinate, drop ⌊βN⌋ at each end, sum the rest in sorted order from +0.0, divide (float32)."""
    n = len(stack)
    k = math.floor(beta * n)
    ordered = np.sort(stack, axis=0)
    total = np.zeros(stack.shape[1], dtype=np.float32)
    for row in ordered[k : n - k]:
        total = total + row
    return total / np.float32(n - 2 * k)


@pytest.mark.parametrize(("n", "beta"), [(5, 0.2), (6, 0.1), (7, 0.34), (4, 0.0)])
def test_trimmed_mean_is_the_sorted_trim_reference_byte_for_byte_for_every_m(n: int, beta: float) -> None:
    # Prepare
    store, layout, stack = stacked_round(n, seed=10 + n)
    expected = sorted_trim_reference(stack, beta)

    # Execute
    outputs = {m: aggregate(store, reducer=f"trimmed-mean:{beta}", shards=m, window_bytes=36)[0]
               for m in (1, 2, 3, 8, 64)}
    outputs[0] = aggregate(store, reducer=f"trimmed-mean:{beta}", topology="flat")[0]

    # Assert
    assert len(set(outputs.values())) == 1
    got = read_flat(store, aggregate_key(0), layout)
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))
    k = math.floor(beta * n)
    np.testing.assert_allclose(got, np.mean(np.sort(stack, axis=0)[k : n - k], axis=0), rtol=1e-5, atol=1e-30)


def test_a_nan_in_a_client_names_that_client_under_median() -> None:
    # Prepare
    store, layout, stack = stacked_round(5, seed=3)
    stack[2, 17] = np.nan
    write_update(store, update_key(0, "c02"), layout, stack[2], UpdateMeta(
        client="c02", round=0, examples=3, layout_digest=layout.digest(), chunk_elems=CHUNK))

    # Execute
    _, result = aggregate(store, reducer="median", shards=4)

    # Assert: rejected by name, and the median of the four others published
    assert "c02" in result.manifest.rejected and "non-finite" in result.manifest.rejected["c02"]
    others = np.delete(stack, 2, axis=0)
    np.testing.assert_array_equal(read_flat(store, aggregate_key(0), layout), np.median(others, axis=0))


@pytest.mark.integration
@pytest.mark.parametrize("reducer", ["median", "trimmed-mean:0.2"])
def test_an_order_statistics_function_holds_n_windows_not_the_model(tmp_path: Any, reducer: str) -> None:
    """Measured: a function's peak grows by at most (N + 2) windows of 4 bytes over the same function with tiny
    windows (its fixed part: interpreter, manifest, N open readers), and not with the model or shard size."""
    from gradshard.store import LocalStore

    # Prepare: N = 8 clients of 4 Mi elements (16 MiB each); each of 2 functions reduces 2 Mi elements
    n, numel = 8, 4 << 20
    store = LocalStore(tmp_path, fsync=False)
    layout = ModelLayout([TensorSpec("w", (numel,), "float32")])
    spec = RoundSpec.create(0, layout)
    open_round(store, spec)
    rng = np.random.default_rng(0)
    for i in range(n):
        write_update(store, update_key(0, f"c{i}"), layout, rng.standard_normal(numel, dtype=np.float32),
                     UpdateMeta(client=f"c{i}", round=0, examples=1, layout_digest=layout.digest(),
                                chunk_elems=spec.chunk_elems))

    def peak(window_bytes: int) -> int:
        with LocalExecutor(workers=1) as executor:
            result = aggregate_round(store, 0, executor, AggregateConfig(reducer=reducer, shards=2,
                                                                         window_bytes=window_bytes))
        assert all(r.predicted_bytes is not None and r.predicted_bytes >= n * window_bytes for r in result.reports)
        return max(r.peak_rss_bytes or 0 for r in result.reports)

    # Execute
    fixed = peak(4 << 10)
    large = peak(2 * MIB)

    # Assert
    assert large - fixed <= (n + 2) * 2 * MIB, (large, fixed)
    assert large - fixed >= n * 2 * MIB * 0.9  # the N windows are really held (the bound is not vacuous)


def test_partial_clients_are_refused_by_reducers_that_would_misread_them() -> None:
    store, *_ = coverage_round(seed=0)
    for reducer in ("mean", "median"):
        with pytest.raises(PlanError, match="use reducer 'coverage-mean'"):
            aggregate(store, reducer=reducer, policy="fail")
        # under policy 'skip' the partial clients are rejected, never the round for one client
        _, result = aggregate(store, reducer=reducer)
        assert result.manifest.rejected
        assert all("aggregate with reducer 'coverage-mean'" in r for r in result.manifest.rejected.values())
        assert result.manifest.clients and not any(c.partial for c in result.manifest.clients)


def test_robust_reducers_refuse_tree_topologies() -> None:
    store, _, _ = stacked_round(4, seed=1)
    with pytest.raises(PlanError, match="only reducers mean and secagg do"):
        aggregate(store, reducer="median", topology="lambda-fl")


def test_server_set_weights_are_the_manifest_weights_and_a_client_without_one_is_rejected() -> None:
    # Prepare
    store, layout, stack = stacked_round(3, seed=2)
    weights = {"c00": 0.5, "c01": 2.5}

    # Execute
    _, result = aggregate(store, weighting="server", weights=weights, shards=3)

    # Assert: c02 had no weight; the mean is (0.5 x0 + 2.5 x1) / 3 computed as FedAvg does
    manifest = load_manifest(store, "rounds/000000/manifest.json")
    assert [(c.client, c.weight) for c in manifest.clients] == [("c00", 0.5), ("c01", 2.5)]
    assert "no usable weight" in result.manifest.rejected["c02"]
    w0, w1 = np.float32(0.5 / 3.0), np.float32(2.5 / 3.0)
    expected = stack[0] * w0
    expected += stack[1] * w1
    np.testing.assert_array_equal(read_flat(store, aggregate_key(0), layout), expected)


def test_weights_and_weighting_must_go_together() -> None:
    with pytest.raises(ValueError, match="weighting 'server'"):
        AggregateConfig(weights={"a": 1.0})
    with pytest.raises(ValueError, match="unknown reducer 'max'"):
        AggregateConfig(reducer="max")


def test_a_coverage_that_does_not_fit_the_layout_rejects_that_client() -> None:
    # Prepare
    store, layout, stack = stacked_round(3, seed=4)
    write_update(store, update_key(0, "c01"), layout, stack[1], UpdateMeta(
        client="c01", round=0, examples=2, layout_digest=layout.digest(), chunk_elems=CHUNK,
        coverage={"b": (11, 10)}))

    # Execute
    _, result = aggregate(store, reducer="coverage-mean")

    # Assert
    assert "bad coverage" in result.manifest.rejected["c01"] and "'b'" in result.manifest.rejected["c01"]
    with pytest.raises(GradshardError):
        aggregate(store, reducer="coverage-mean", policy="fail")


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 7), m=st.integers(1, 12), window=st.integers(1, 40), seed=st.integers(0, 2**16),
       reducer=st.sampled_from(["mean", "coverage-mean", "median", "trimmed-mean:0.25"]))
def test_every_reducer_gives_the_flat_bytes_for_any_m_and_window(n: int, m: int, window: int, seed: int,
                                                                   reducer: str) -> None:
    # Prepare
    rng = np.random.default_rng(seed)
    layout = ModelLayout([TensorSpec("a", (7, 9), "float32"), TensorSpec("b", (34,), "float32")])
    store = MemoryStore()
    open_round(store, RoundSpec.create(0, layout, chunk_elems=CHUNK))
    for i in range(n):
        coverage = None if reducer != "coverage-mean" or i == 0 else {"a": (int(rng.integers(0, 8)), 9)}
        write_update(store, update_key(0, f"c{i}"), layout, rng.standard_normal(layout.numel).astype(np.float32),
                     UpdateMeta(client=f"c{i}", round=0, examples=int(rng.integers(1, 9)),
                                layout_digest=layout.digest(), chunk_elems=CHUNK, coverage=coverage))

    # Execute
    flat, _ = aggregate(store, reducer=reducer, topology="flat")
    sharded, _ = aggregate(store, reducer=reducer, shards=m, window_bytes=4 * window)

    # Assert
    assert sharded == flat


def test_a_header_replaced_after_validation_is_refused_by_the_function_naming_the_client() -> None:
    """Functions trust a header only by the sha256 the validation recorded: a re-signed, valid header with another
    example count, swapped in after validation, is refused (it would change the weights behind the driver's back)."""
    from gradshard.aggregation.driver import prepare_round
    from gradshard.aggregation.functions import open_clients

    # Prepare: validate, then replace c01 by a valid update of the same values claiming 10x the examples
    store, layout, stack = stacked_round(3, seed=7)
    manifest = prepare_round(store, 0)
    write_update(store, update_key(0, "c01"), layout, stack[1], UpdateMeta(
        client="c01", round=0, examples=20, layout_digest=layout.digest(), chunk_elems=CHUNK))

    # Execute / Assert
    with pytest.raises(GradshardError, match="'c01' rejected: object changed since the round was validated"):
        open_clients(store, manifest, layout)


def test_functions_reopen_validated_updates_from_the_manifests_byte_runs_and_refuse_a_resized_object() -> None:
    """The manifest records each full-size update's size and byte runs (one run for a gradshard-written file), so
    functions skip reparsing its tensor entries; bytes appended after validation (same header) are refused by
    size, naming the client."""
    from gradshard.aggregation.driver import prepare_round
    from gradshard.aggregation.functions import open_clients

    # Prepare
    store, layout, stack = stacked_round(3, seed=8)
    manifest = prepare_round(store, 0)
    entry = manifest.clients[1]
    header_len = 8 + struct.unpack("<Q", store.get_range(entry.key, 0, 8))[0]

    # Assert: one run from the data start, and the functions' readers read the values written
    assert entry.runs == ((0, layout.numel, header_len),)
    readers = open_clients(store, manifest, layout)
    try:
        out = np.empty(layout.numel, dtype=np.float32)
        readers[1].read_verified(0, layout.numel, out)
        assert out.tobytes() == stack[1].tobytes()
    finally:
        for reader in readers:
            reader.close()

    # Execute / Assert: the same header with 4 more bytes behind the data
    store.put(entry.key, store.get(entry.key) + b"\0\0\0\0")
    with pytest.raises(GradshardError, match="'c01' rejected: object changed since the round was validated"):
        open_clients(store, manifest, layout)
