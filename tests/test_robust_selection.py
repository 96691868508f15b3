"""Krum, Multi-Krum and Bulyan: exact pairwise distances under sharding, selections against independent references,
and the case where the ``‖x‖² + ‖y‖² − 2x·y`` formula (Flower's MultiKrum) picks the wrong client."""

from __future__ import annotations

import json
import math
from itertools import combinations
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradshard.aggregation.distances import chunk_pair_partials
from gradshard.aggregation.driver import AggregateConfig, aggregate_round
from gradshard.core import selection
from gradshard.core.layout import ModelLayout, TensorSpec
from gradshard.core.reducers import make_reducer, parse_reducer
from gradshard.errors import GradshardError, PlanError, RoundError
from gradshard.format.keys import aggregate_key, root_update_key, selection_key, trust_key, update_key
from gradshard.format.round import RoundSpec, open_round
from gradshard.format.update import UpdateMeta, read_flat
from gradshard.format.writer import write_update
from gradshard.runtime import InlineExecutor
from gradshard.store import MemoryStore

CHUNK = 64


def _round(vectors: list[npt.NDArray[np.float32]], examples: list[int] | None = None) -> tuple[MemoryStore,
                                                                                               ModelLayout]:
    numel = len(vectors[0])
    layout = ModelLayout([TensorSpec("w", (numel - 7,), "float32"), TensorSpec("b", (7,), "float32")])
    store = MemoryStore()
    open_round(store, RoundSpec.create(0, layout, chunk_elems=CHUNK))
    for i, v in enumerate(vectors):
        client = f"c{i:02d}"
        meta = UpdateMeta(client=client, round=0, examples=(examples or [10] * len(vectors))[i],
                          layout_digest=layout.digest(), chunk_elems=CHUNK)
        write_update(store, update_key(0, client), layout, v, meta)
    return store, layout


def _aggregate(store: MemoryStore, layout: ModelLayout, reducer: str, shards: int) -> tuple[bytes, dict[str, Any],
                                                                                             Any]:
    for key in (aggregate_key(0), selection_key(0)):
        if store.exists(key):
            store.delete(key)
    result = aggregate_round(store, 0, InlineExecutor(), AggregateConfig(shards=shards, reducer=reducer))
    return store.get(aggregate_key(0)), json.loads(store.get(selection_key(0))), result


def _exact_distances(vectors: list[npt.NDArray[np.float32]]) -> npt.NDArray[np.float64]:
    """The reference: each pair's Σ (xᵢ − xⱼ)² with exact float64 products, summed with math.fsum."""
    n = len(vectors)
    d = np.zeros((n, n))
    for i, j in combinations(range(n), 2):
        diff = vectors[i].astype(np.float64) - vectors[j].astype(np.float64)
        d[i, j] = d[j, i] = math.fsum((diff * diff).tolist())
    return d


def _reference_krum_scores(d: list[list[float]], f: int) -> list[float]:
    n = len(d)
    return [sum(sorted(d[i][j] for j in range(n) if j != i)[: max(1, n - f - 2)]) for i in range(n)]


# --- the distance matrix --------------------------------------------------------------------------------------------
def test_the_distance_matrix_is_the_same_bytes_for_every_m_and_exact_to_the_last_bits() -> None:
    # Prepare: 9 clients, 1,000 elements (16 chunks, the last one short)
    rng = np.random.default_rng(0)
    vectors = [rng.standard_normal(1000).astype(np.float32) * (1 + i) for i in range(9)]
    store, layout = _round(vectors)
    exact = _exact_distances(vectors)

    # Execute: the sharded phase with M = 1, 2, 4, 8
    matrices = {m: np.array(_aggregate(store, layout, "krum:2", m)[1]["distances"]) for m in (1, 2, 4, 8)}

    # Assert: identical bytes; symmetric, zero diagonal, no negative entry; within 1e-13 of the exact sums
    for m in (2, 4, 8):
        assert matrices[m].tobytes() == matrices[1].tobytes()
    d = matrices[1]
    assert np.array_equal(d, d.T) and not np.diag(d).any() and (d[~np.eye(9, dtype=bool)] > 0).all()
    np.testing.assert_allclose(d, exact, rtol=1e-13)


def test_chunk_partials_are_the_direct_differences_of_every_pair() -> None:
    rng = np.random.default_rng(1)
    rows = np.zeros((5, 16))
    rows[:, :13] = rng.standard_normal((5, 13))
    out = np.empty(10)

    chunk_pair_partials(rows, np.empty((4, 16)), out)

    expected = [float(((rows[i] - rows[j]) ** 2).sum()) for i, j in combinations(range(5), 2)]
    np.testing.assert_allclose(out, expected, rtol=1e-15)


# --- the selection rules ----------------------------------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(points=st.lists(st.lists(st.integers(-50, 50), min_size=3, max_size=3), min_size=5, max_size=11),
       f=st.integers(0, 4))
def test_krum_and_multi_krum_select_what_a_brute_force_reference_selects(points: list[list[int]], f: int) -> None:
    n = len(points)
    if n < 2 * f + 3:
        with pytest.raises(PlanError, match="2f \\+ 3"):
            selection.krum(np.zeros((n, n)), f)
        return
    d = [[float(sum((a - b) ** 2 for a, b in zip(p, q, strict=True))) for q in points] for p in points]
    scores = _reference_krum_scores(d, f)
    ranked = sorted(range(n), key=lambda i: (scores[i], i))

    assert selection.krum(np.array(d), f) == ranked[:1]
    assert selection.krum_scores(np.array(d), f) == pytest.approx(scores)
    for k in (1, n // 2 + 1, n):
        assert selection.multi_krum(np.array(d), f, k) == sorted(ranked[:k])


def test_bulyan_selects_theta_clients_by_iterated_krum() -> None:
    # Prepare: 9 clients on a line at 0..5 (honest) and 3 far away; f = 1, θ = 7
    points = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 100.0, 200.0, 300.0]
    d = np.array([[(a - b) ** 2 for b in points] for a in points])

    # Execute / Assert: θ = n − 2f = 7 chosen, never the far ones before the honest ones
    chosen = selection.bulyan(d, 1)
    assert chosen == [0, 1, 2, 3, 4, 5, 6]
    with pytest.raises(PlanError, match="4f \\+ 3"):
        selection.bulyan(d, 2)


def test_the_closest_to_median_kernel_averages_the_beta_values_nearest_the_median() -> None:
    # Prepare: θ = 7 clients, f = 1, β = 5, one element per case
    cases = [[0, 1, 2, 3, 4, 5, 100], [-100, 1, 2, 3, 4, 5, 6], [1, 1, 1, 1, 1, 1, 1], [0, 10, 11, 12, 13, 14, 50]]
    reducer = make_reducer(parse_reducer("bulyan:1"), weights=[1] * 7, capacity=len(cases), in_dtype="float32",
                           accumulate="float64")

    # Execute
    reducer.start(len(cases))
    for i in range(7):
        reducer.buffer(i)[:] = [case[i] for case in cases]
        reducer.add(i)
    out = reducer.finish().copy()

    # Assert: the reference picks, for each element, the 5 values with the smallest |v − median|
    for e, case in enumerate(cases):
        median = float(np.median(case))
        nearest = sorted(sorted(case), key=lambda v: abs(v - median))[:5]
        assert out[e] == pytest.approx(sum(nearest) / 5, abs=1e-12)


def test_reducer_texts_are_parsed_and_refused_with_the_fix() -> None:
    assert parse_reducer("krum:2").f == 2 and parse_reducer("multi-krum:1,4").k == 4
    assert parse_reducer(parse_reducer("bulyan:3").text) == parse_reducer("bulyan:3")
    for text, message in [("krum", "needs the number of Byzantine clients"), ("krum:x", "whole number"),
                          ("multi-krum:1", "2 whole number"), ("multi-krum:1,0", "k >= 1"),
                          ("median:1", "takes no parameter"), ("krum:-1", "whole number")]:
        with pytest.raises(GradshardError, match=message):
            parse_reducer(text)


# --- rounds -----------------------------------------------------------------------------------------------------------
def _attacked(seed: int = 0, n_honest: int = 7, n_bad: int = 2, numel: int = 3000) -> list[npt.NDArray[np.float32]]:
    rng = np.random.default_rng(seed)
    honest = [rng.normal(0.1, 0.01, numel).astype(np.float32) for _ in range(n_honest)]
    bad = [(-10.0 * honest[i]).astype(np.float32) for i in range(n_bad)]  # sign-flipped and scaled
    return honest + bad


@pytest.mark.parametrize("reducer", ["krum:2", "multi-krum:2,5", "bulyan:2"])
def test_selecting_rounds_drop_the_attackers_and_aggregate_the_same_bytes_for_every_m(reducer: str) -> None:
    # Prepare: honest clients near 0.1 (7, or 9 for Bulyan, which needs n ≥ 4f + 3), 2 sign-flipped ×10 (the last)
    vectors = _attacked(n_honest=9 if reducer.startswith("bulyan") else 7)
    bad = {f"c{len(vectors) - 2:02d}", f"c{len(vectors) - 1:02d}"}
    examples = [10 + i for i in range(len(vectors))]
    store, layout = _round(vectors, examples)

    # Execute
    runs = {m: _aggregate(store, layout, reducer, m) for m in (1, 3, 8)}

    # Assert: the same aggregate bytes; the attackers are never selected and leave the round with their reason
    outputs = {m: run[0] for m, run in runs.items()}
    assert len(set(outputs.values())) == 1
    record, result = runs[1][1], runs[1][2]
    assert not bad & set(record["selected"])
    assert set(result.manifest.rejected) == {c for c in record["clients"] if c not in record["selected"]}
    assert all(result.manifest.rejected[c].startswith(f"not selected by {reducer}") for c in bad)
    got = read_flat(store, aggregate_key(0), layout)
    chosen = [int(c[1:]) for c in record["selected"]]
    if reducer == "krum:2":
        assert got.tobytes() == vectors[chosen[0]].tobytes()
    elif reducer == "multi-krum:2,5":
        weights = np.array([examples[i] for i in chosen], dtype=np.float64)
        expected = sum(w / weights.sum() * vectors[i].astype(np.float64) for w, i in zip(weights, chosen,
                                                                                          strict=True))
        np.testing.assert_allclose(got, expected, rtol=1e-5)
    else:  # θ = 11 − 2·2 = 7 selected; per element the mean of the β = θ − 2f = 3 values nearest the median
        assert len(chosen) == 7
        stack = np.stack([vectors[i] for i in chosen]).astype(np.float64)
        nearest = np.argsort(np.abs(stack - np.median(stack, axis=0)), axis=0, kind="stable")[:3]
        expected = np.take_along_axis(stack, nearest, axis=0).mean(axis=0)
        np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_a_non_finite_update_is_rejected_by_the_distance_phase_and_the_rest_compared() -> None:
    vectors = _attacked()
    vectors[3] = vectors[3].copy()
    vectors[3][1234] = np.nan
    store, layout = _round(vectors)

    _, record, result = _aggregate(store, layout, "krum:2", 4)

    assert "non-finite" in result.manifest.rejected["c03"]
    assert "c03" not in record["clients"] and len(record["distances"]) == 8


def test_where_the_gram_formula_picks_an_attacker_the_exact_distances_do_not() -> None:
    # Prepare: updates far from the origin (a large shared offset, as raw weights are), 5 honest clients a hair
    # apart and 2 attackers a little further: ‖x‖² is ~1e11 in float32, so x·y cancels away the differences
    flwr_krum = pytest.importorskip("flwr.serverapp.strategy.multikrum")
    from flwr.app import ArrayRecord

    rng = np.random.default_rng(3)
    offset = rng.uniform(900, 1100, 100_000).astype(np.float32)
    honest = [offset + rng.normal(0, 1e-3, offset.size).astype(np.float32) for _ in range(5)]
    attackers = [offset + rng.normal(0, 2e-2, offset.size).astype(np.float32) for _ in range(2)]
    vectors = honest + attackers
    store, layout = _round(vectors)

    # Execute: Flower's matrix and its Krum choice; ours through a sharded round
    theirs = flwr_krum.compute_distances([ArrayRecord([v]) for v in vectors])
    their_scores = _reference_krum_scores(theirs.tolist(), 2)
    _, record, _ = _aggregate(store, layout, "krum:2", 4)

    # Assert: the formula gives negative squared distances and picks an attacker; the exact distances pick an
    # honest client and agree with the reference
    assert (theirs[~np.eye(7, dtype=bool)] < 0).any()
    assert int(np.argmin(their_scores)) >= 5
    assert int(record["selected"][0][1:]) < 5
    np.testing.assert_allclose(np.array(record["distances"]), _exact_distances(vectors), rtol=1e-12)


# --- FLTrust ----------------------------------------------------------------------------------------------------------
def _with_root(vectors: list[npt.NDArray[np.float32]], root: npt.NDArray[np.float32], r: int = 0
               ) -> tuple[MemoryStore, ModelLayout]:
    store, layout = _round(vectors)
    meta = UpdateMeta(client="server", round=r, examples=100, layout_digest=layout.digest(), chunk_elems=CHUNK)
    write_update(store, root_update_key(0), layout, root, meta)
    return store, layout


def _fltrust_reference(vectors: list[npt.NDArray[np.float32]], root: npt.NDArray[np.float32]
                       ) -> npt.NDArray[np.float64]:
    g0 = root.astype(np.float64)
    total, weight = np.zeros_like(g0), 0.0
    for v in vectors:
        g = v.astype(np.float64)
        trust = max(0.0, float(g @ g0) / (np.linalg.norm(g) * np.linalg.norm(g0)))
        total += trust * np.linalg.norm(g0) / np.linalg.norm(g) * g
        weight += trust
    return total / weight


def test_fltrust_gives_a_sign_flipped_client_no_trust_renormalises_a_scaled_one_and_is_the_same_for_every_m() -> None:
    # Prepare: the server's update g0 and 5 clients near it; c03 sign-flipped, c04 scaled ×100
    rng = np.random.default_rng(5)
    root = rng.normal(0.05, 0.02, 1000).astype(np.float32)
    vectors = [(root + rng.normal(0, 0.01, 1000)).astype(np.float32) for _ in range(5)]
    vectors[3] = (-vectors[3]).astype(np.float32)
    vectors[4] = (vectors[4] * np.float32(100)).astype(np.float32)
    store, layout = _with_root(vectors, root)

    # Execute
    outputs = {}
    for m in (1, 2, 4):
        for key in (aggregate_key(0), trust_key(0)):
            if store.exists(key):
                store.delete(key)
        result = aggregate_round(store, 0, InlineExecutor(), AggregateConfig(shards=m, reducer="fltrust"))
        outputs[m] = store.get(aggregate_key(0))
    record = json.loads(store.get(trust_key(0)))

    # Assert: c03 has trust 0 and left the round; c04 counts like an update of the root's length; same bytes for all M
    assert len(set(outputs.values())) == 1
    assert record["trust"][3] == 0 and record["cosines"][3] < -0.9
    assert result.manifest.rejected["c03"].startswith("FLTrust trust 0")
    assert record["trust"][4] > 0.9 and "c04" not in result.manifest.rejected
    np.testing.assert_allclose(read_flat(store, aggregate_key(0), layout), _fltrust_reference(vectors, root),
                               rtol=1e-5, atol=1e-8)
    unscaled = [*vectors[:4], (vectors[4] / np.float32(100)).astype(np.float32)]
    np.testing.assert_allclose(_fltrust_reference(unscaled, root), _fltrust_reference(vectors, root), rtol=1e-6)


def test_fltrust_without_a_usable_root_update_fails_the_round_naming_it() -> None:
    vectors = _attacked(numel=500)
    store, _ = _round(vectors)
    with pytest.raises(RoundError, match=r"root update rounds/000000/root\.safetensors"):
        aggregate_round(store, 0, InlineExecutor(), AggregateConfig(reducer="fltrust"))

    store, _ = _with_root(vectors, vectors[0], r=3)  # written for another round
    with pytest.raises(RoundError, match="not usable: update is for round 3"):
        aggregate_round(store, 0, InlineExecutor(), AggregateConfig(reducer="fltrust"))
