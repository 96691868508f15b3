"""Secure aggregation (gradshard.security.secagg): masks any shard regenerates exactly, Shamir shares, and rounds
whose unmasked sum equals the plain quantized sum for every M, with clients dropped after masking."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradshard.aggregation.driver import AggregateConfig, aggregate_round
from gradshard.aggregation.secure import reveal_key
from gradshard.core.layout import ModelLayout, TensorSpec
from gradshard.core.masks import mask_slice
from gradshard.demo.secagg import simulate_secure_round
from gradshard.errors import RoundError, SecurityError
from gradshard.format.keys import aggregate_key, update_key
from gradshard.format.update import UpdateMeta, read_flat
from gradshard.format.writer import write_update
from gradshard.runtime import InlineExecutor
from gradshard.security.secagg import SecAggClient, combine, split
from gradshard.store import MemoryStore

BITS = 16


@settings(max_examples=50, deadline=None)
@given(start=st.integers(0, 3000), length=st.integers(0, 700), round_=st.integers(0, 2**40))
def test_a_shards_mask_slice_is_the_slice_of_the_whole_stream(start: int, length: int, round_: int) -> None:
    key = bytes(range(32))
    whole = mask_slice(key, 0, start + length, round_)
    assert np.array_equal(mask_slice(key, start, start + length, round_), whole[start:])


def test_keys_that_differ_in_one_bit_give_unrelated_masks() -> None:
    key = bytearray(range(32))
    other = bytearray(key)
    other[31] ^= 0x01  # the last bit: a generator folding the key to 32 bits would miss it
    a, b = mask_slice(bytes(key), 0, 1000), mask_slice(bytes(other), 0, 1000)
    assert np.count_nonzero(a == b) < 5
    assert not np.array_equal(mask_slice(bytes(key), 0, 1000, 1), a)  # and each round has its own stream
    with pytest.raises(SecurityError, match="32 bytes"):
        mask_slice(b"short", 0, 1)


def test_shamir_shares_recover_the_secret_from_any_threshold_and_not_fewer() -> None:
    secret = bytes(range(1, 33))
    shares = split(secret, [1, 2, 3, 4, 5], 3)
    for subset in ([1, 2, 3], [5, 3, 1], [2, 4, 5]):
        assert combine({x: shares[x] for x in subset}, 3) == secret
    with pytest.raises(SecurityError, match="3 needed"):
        combine({1: shares[1], 2: shares[2]}, 3)
    try:  # two shares of a degree-2 polynomial: another value (almost surely outside 32 bytes, then refused)
        assert combine({1: shares[1], 2: shares[2]}, 2) != secret
    except SecurityError as exc:
        assert "do not reconstruct a 32-byte secret" in str(exc)


def _round(n: int, dropped: tuple[str, ...], threshold: int = 3, seed: int = 0
           ) -> tuple[MemoryStore, ModelLayout, npt.NDArray[np.uint32], int]:
    layout = ModelLayout([TensorSpec("w", (2990,), "float32"), TensorSpec("b", (10,), "float32")])
    rng = np.random.default_rng(seed)
    updates = {f"c{i}": rng.normal(0, 0.5, layout.numel).astype(np.float32) for i in range(n)}
    store = MemoryStore()
    total = simulate_secure_round(store, 0, layout, updates, bits=BITS, clip=4.0, threshold=threshold,
                                  dropped=dropped, chunk_elems=128)
    return store, layout, total, n - len(dropped)


@pytest.mark.parametrize("dropped", [(), ("c2",), ("c0", "c4")], ids=["none dropped", "one dropped", "two dropped"])
def test_the_unmasked_aggregate_is_the_plain_quantized_mean_for_every_m(dropped: tuple[str, ...]) -> None:
    # Prepare: 6 clients, threshold 3; some drop after masking (their pairwise masks stay in the others' uploads)
    store, layout, total, survivors = _round(6, dropped)
    expected = (total.view(np.int32).astype(np.float64) / (2**BITS * survivors)).astype(np.float32)

    # Execute
    outputs = set()
    for m in (1, 4, 8):
        if store.exists(aggregate_key(0)):
            store.delete(aggregate_key(0))
        result = aggregate_round(store, 0, InlineExecutor(), AggregateConfig(shards=m, reducer=f"secagg:{BITS}",
                                                                             weighting="uniform"))
        outputs.add(store.get(aggregate_key(0)))

    # Assert: the same bytes for every M, equal to the survivors' plain quantized sum, read back
    assert len(outputs) == 1
    assert read_flat(store, aggregate_key(0), layout).tobytes() == expected.tobytes()
    assert sorted(c.client for c in result.manifest.clients) == sorted(f"c{i}" for i in range(6) if f"c{i}"
                                                                       not in dropped)


def test_a_masked_upload_alone_reveals_nothing_and_unmasking_needs_the_threshold() -> None:
    store, layout, _, _ = _round(5, ("c1",), threshold=4)
    # one client's masked words look nothing like its quantized update
    masked = np.frombuffer(store.get(update_key(0, "c0"))[-4 * layout.numel :], dtype="<u4")
    assert np.count_nonzero(np.abs(masked.view(np.int32).astype(np.int64)) < 2**20) < layout.numel // 100
    # with only 3 reveals of a threshold of 4 the round cannot unmask, and says why
    store.delete(reveal_key(0, "c2"))
    with pytest.raises(RoundError, match="3 survivors revealed shares, 4 are needed"):
        aggregate_round(store, 0, InlineExecutor(), AggregateConfig(reducer=f"secagg:{BITS}", weighting="uniform"))


def test_a_client_reveals_one_secret_of_a_peer_never_both() -> None:
    clients = ["a", "b", "c"]
    agents = {c: SecAggClient(c, 0, clients, 2) for c in clients}
    directory = {c: agent.advertise() for c, agent in agents.items()}
    inbox = {peer: agents[peer].share(directory)["a"] for peer in ("b", "c")}
    agents["a"].share(directory)

    agents["a"].reveal(inbox, directory, ["a", "b"])  # c dropped: its key share; b survived: its seed share

    with pytest.raises(SecurityError, match="both secrets of client 'c'"):
        agents["a"].reveal(inbox, directory, ["a", "b", "c"])  # now asking for c's seed too


def test_plain_and_masked_updates_do_not_mix() -> None:
    store, layout, _, _ = _round(4, ())
    meta = UpdateMeta(client="c9", round=0, examples=1, layout_digest=layout.digest(), chunk_elems=128)
    write_update(store, update_key(0, "c9"), layout, np.zeros(layout.numel, np.float32), meta)

    secure = aggregate_round(store, 0, InlineExecutor(), AggregateConfig(reducer=f"secagg:{BITS}",
                                                                          weighting="uniform"))
    assert "a plain update in a secure-aggregation round" in secure.manifest.rejected["c9"]
    store.delete(aggregate_key(0))
    plain = aggregate_round(store, 0, InlineExecutor(), AggregateConfig())
    assert set(plain.manifest.rejected) == {"c0", "c1", "c2", "c3"}
    assert "masked update (secure aggregation)" in plain.manifest.rejected["c0"]


@pytest.mark.parametrize("dropped", [(), ("c1",), ("c2", "c5")], ids=["none dropped", "one dropped", "two dropped"])
def test_trees_unmask_to_the_same_bytes_as_the_sharded_plan(dropped: tuple[str, ...]) -> None:
    # Prepare: the sharded aggregate of a secure round, for reference
    store, layout, total, survivors = _round(7, dropped)
    cfg = {"reducer": f"secagg:{BITS}", "weighting": "uniform"}
    aggregate_round(store, 0, InlineExecutor(), AggregateConfig(shards=3, **cfg))
    sharded = store.get(aggregate_key(0))

    # Execute: λ-FL (leaves of ⌈√N⌉ clients, partials summed modulo 2^32) and LIFL (three levels, shared memory)
    outputs = {}
    for topology in ("lambda-fl", "lifl"):
        store.delete(aggregate_key(0))
        aggregate_round(store, 0, InlineExecutor(), AggregateConfig(topology=topology, **cfg))
        outputs[topology] = store.get(aggregate_key(0))

    # Assert: integer sums are associative, so every tree gives the sharded plan's bytes
    assert outputs == {"lambda-fl": sharded, "lifl": sharded}
    expected = (total.view(np.int32).astype(np.float64) / (2**BITS * survivors)).astype(np.float32)
    assert read_flat(store, aggregate_key(0), layout).tobytes() == expected.tobytes()


@pytest.mark.parametrize("garbage", ['{"c0": {"what": "seed", "x": "1", "share": "zz"}}', '[1, 2]', '{"c0": 5}',
                                     '{"c0": {"what": "seed", "x": "1", "share": "' + "f" * 200 + '"}}'])
def test_a_malformed_reveal_fails_the_round_with_a_reason_not_a_traceback(garbage: str) -> None:
    store, *_ = _round(4, (), threshold=4)
    store.put(reveal_key(0, "c3"), garbage.encode())

    with pytest.raises(RoundError, match="cannot unmask"):
        aggregate_round(store, 0, InlineExecutor(), AggregateConfig(reducer=f"secagg:{BITS}", weighting="uniform"))


@pytest.mark.parametrize("dropped", [(), ("c3",)], ids=["none dropped", "one dropped"])
def test_weighted_clients_unmask_to_their_weighted_mean_in_every_topology(dropped: tuple[str, ...]) -> None:
    # Prepare: 5 clients of very different weights (each masks weight · update); one may drop after masking
    layout = ModelLayout([TensorSpec("w", (2990,), "float32"), TensorSpec("b", (10,), "float32")])
    rng = np.random.default_rng(3)
    updates = {f"c{i}": rng.normal(0, 0.5, layout.numel).astype(np.float32) for i in range(5)}
    weights = {"c0": 1.0, "c1": 0.25, "c2": 0.5, "c3": 0.125, "c4": 0.75}
    store = MemoryStore()
    total = simulate_secure_round(store, 0, layout, updates, bits=BITS, clip=4.0, threshold=3, dropped=dropped,
                                  chunk_elems=128, weights=weights)
    survivors = [c for c in updates if c not in dropped]

    # Execute: sharded (M = 1 and 4), λ-FL and LIFL
    outputs = set()
    for config in (AggregateConfig(shards=1), AggregateConfig(shards=4), AggregateConfig(topology="lambda-fl"),
                   AggregateConfig(topology="lifl")):
        if store.exists(aggregate_key(0)):
            store.delete(aggregate_key(0))
        aggregate_round(store, 0, InlineExecutor(), config.model_copy(update={"reducer": f"secagg:{BITS}"}))
        outputs.add(store.get(aggregate_key(0)))

    # Assert: one result, the quantized sum ÷ 2^bits ÷ Σ of the survivors' weights, and within n·2^-bits ÷ Σ wᵢ (each
    # client's rounding is under one step) of the float64 weighted mean computed from the updates themselves
    assert len(outputs) == 1
    aggregate = read_flat(store, aggregate_key(0), layout)
    denominator = math.fsum(weights[c] for c in survivors)
    expected = (total.view(np.int32).astype(np.float64) / (2**BITS * denominator)).astype(np.float32)
    assert aggregate.tobytes() == expected.tobytes()
    reference = sum(weights[c] * updates[c].astype(np.float64) for c in survivors) / denominator
    assert np.abs(aggregate - reference).max() <= len(survivors) * 2.0**-BITS / denominator + 1e-7
    assert np.abs(aggregate - np.mean([updates[c] for c in survivors], axis=0)).max() > 0.01  # not the plain mean


def test_a_directory_refuses_weights_outside_zero_to_one() -> None:
    from gradshard.aggregation.secure import write_directory
    from gradshard.security.secagg import Advertised

    adverts = [Advertised("a", "00" * 32, "00" * 32), Advertised("b", "00" * 32, "00" * 32)]
    for bad in ({"a": 1.0, "b": 0.0}, {"a": 1.5, "b": 1.0}, {"a": 1.0}, {"a": 1.0, "b": float("nan")}):
        with pytest.raises(SecurityError, match=r"weights: one float in \(0, 1\]"):
            write_directory(MemoryStore(), 0, adverts, 2, bad)


@pytest.mark.parametrize("weights", [{"a": 2.0, "b": 1.0}, {"a": 1.0}, {"a": 1.0, "b": "x"}, [1, 2]])
def test_a_key_directory_with_altered_weights_is_refused_naming_it(weights: object) -> None:
    import json

    from gradshard.aggregation.secure import directory_key, read_directory

    store = MemoryStore()
    keys = {"mask_key": "00" * 32, "share_key": "00" * 32}
    store.put(directory_key(0), json.dumps({"threshold": 2, "clients": {"a": keys, "b": keys},
                                            "weights": weights}).encode())
    with pytest.raises(RoundError, match=r"rounds/000000/secagg/directory\.json"):
        read_directory(store, 0)
