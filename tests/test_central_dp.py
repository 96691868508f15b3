"""Central DP (issue 13): exact clipping and counter-based noise that shard exactly, refused configurations, and the
ledger that counts every release once."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from scipy import stats

from gradshard import AggregateConfig, InlineExecutor, MemoryStore, ModelLayout, TensorSpec, aggregate_round
from gradshard.core.checksum import ChunkGrid
from gradshard.errors import PrivacyBudgetError, RoundError
from gradshard.format.keys import aggregate_key, reports_key, update_key
from gradshard.format.round import RoundSpec, open_round
from gradshard.format.update import UpdateMeta, read_flat
from gradshard.format.writer import write_update
from gradshard.privacy.accountant import Release, epsilon
from gradshard.privacy.config import CentralDPRound
from gradshard.privacy.ledger import PrivacyLedger
from gradshard.privacy.noise import load_secret, noise, round_key
from gradshard.runtime.local import LocalExecutor
from gradshard.security.tokens import TokenIssuer
from gradshard.store import LocalStore, Store

# five tensors, boundaries off the chunk grid, so contiguous and tensor-aligned plans cut differently
LAYOUT = ModelLayout([TensorSpec("a", (37, 29), "float32"), TensorSpec("b", (211,), "float32"),
                      TensorSpec("c", (16, 8, 9), "float32"), TensorSpec("d", (3,), "float32"),
                      TensorSpec("e", (101, 13), "float32")])
CHUNK = 128


def open_dp_round(store: Store, r: int, updates: dict[str, np.ndarray], layout: ModelLayout = LAYOUT,
                  chunk: int = CHUNK) -> None:
    open_round(store, RoundSpec.create(r, layout, chunk_elems=chunk))
    for client, values in updates.items():
        write_update(store, update_key(r, client), layout, values.astype(np.float32), UpdateMeta(
            client=client, round=r, examples=7, layout_digest=layout.digest(), chunk_elems=chunk))


def random_updates(n: int, seed: int = 0, layout: ModelLayout = LAYOUT) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    # norms from ~0.3 to ~30 against a clip of 2: some clipped, some not
    return {f"c{i:02d}": (rng.standard_normal(layout.numel) * 10.0 ** rng.uniform(-2, 0)).astype(np.float32)
            for i in range(n)}


def dp(key_file: Path, **kw: object) -> CentralDPRound:
    settings: dict[str, object] = {"clip": 2.0, "noise_multiplier": 1.0, "key_file": str(key_file)}
    settings.update(kw)
    return CentralDPRound.model_validate(settings)


def sha_of(store: Store, r: int) -> str:
    return hashlib.sha256(store.get(aggregate_key(r))).hexdigest()


def test_noised_aggregate_is_the_same_bytes_for_every_shard_count_and_plan(tmp_path: Path) -> None:
    # Prepare: one round of 6 clients, one noise key
    store = MemoryStore()
    open_dp_round(store, 0, random_updates(6))
    central = dp(tmp_path / "dp.key")

    # Execute: M in {1, 2, 3, 8, 16} contiguous, tensor-aligned M = 4, and the flat reference
    shas, norms = {}, {}
    for name, config in ([(f"M={m}", AggregateConfig(shards=m, weighting="uniform", central_dp=central))
                          for m in (1, 2, 3, 8, 16)]
                         + [("tensor-aligned", AggregateConfig(shards=4, partition="tensor-aligned",
                                                               weighting="uniform", central_dp=central)),
                            ("flat", AggregateConfig(topology="flat", weighting="uniform", central_dp=central))]):
        result = aggregate_round(store, 0, InlineExecutor(), config)
        shas[name] = sha_of(store, 0)
        norms[name] = [c.norm for c in result.manifest.clients]

    # Assert: one sha256 and one set of norms for all plans; the release was counted once
    assert len(set(shas.values())) == 1, shas
    assert all(n == norms["M=1"] for n in norms.values())
    assert len(PrivacyLedger(store).entries()) == 1


def test_the_aggregate_is_the_clipped_uniform_mean_plus_the_keyed_noise(tmp_path: Path) -> None:
    # Prepare
    updates = random_updates(5, seed=3)
    store = MemoryStore()
    open_dp_round(store, 0, updates)
    central = dp(tmp_path / "dp.key", expected_clients=5)

    # Execute
    result = aggregate_round(store, 0, InlineExecutor(),
                             AggregateConfig(shards=3, weighting="uniform", accumulate="float64",
                                             central_dp=central))

    # Assert: norms as numpy computes them (float64), the clipped mean + σ·noise within float32 rounding
    out = read_flat(store, aggregate_key(0), LAYOUT).astype(np.float64)
    entries = {c.client: c for c in result.manifest.clients}
    expected = np.zeros(LAYOUT.numel)
    clipped = 0
    for client, x in updates.items():
        norm = float(np.linalg.norm(x.astype(np.float64)))
        assert entries[client].norm == pytest.approx(norm, rel=1e-12)
        factor = min(1.0, 2.0 / norm)
        clipped += factor < 1
        expected += factor * x.astype(np.float64) / 5
    assert 0 < clipped < 5  # the data exercises both branches
    sigma = 1.0 * 2.0 / 5
    key = round_key(load_secret(tmp_path / "dp.key"), 0)
    expected += sigma * noise(key, ChunkGrid(LAYOUT.numel, CHUNK), 0, LAYOUT.numel)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)
    assert result.manifest.privacy is not None and result.manifest.privacy["sigma"] == sigma


def test_an_update_of_norm_ten_c_is_scaled_by_exactly_a_tenth(tmp_path: Path) -> None:
    # Prepare: ‖Δ‖ = sqrt(100 · 1²) = 10 = 10·C with C = 1; no noise (clipping only)
    layout = ModelLayout([TensorSpec("w", (10, 10), "float32")])
    store = MemoryStore()
    open_dp_round(store, 0, {"big": np.ones(100)}, layout, chunk=16)

    # Execute
    result = aggregate_round(store, 0, InlineExecutor(), AggregateConfig(
        shards=3, weighting="uniform", central_dp=CentralDPRound(clip=1.0, noise_multiplier=0.0)))

    # Assert: 1.0 · 0.1 rounded to float32, in every element; the norm exactly 10
    assert result.manifest.clients[0].norm == 10.0
    assert result.manifest.clients[0].scale == 0.1
    np.testing.assert_array_equal(read_flat(store, aggregate_key(0), layout), np.full(100, np.float32(0.1)))


def test_noise_on_a_million_zero_elements_has_the_target_distribution(tmp_path: Path) -> None:
    # Prepare: one client of P = 2^20 zeros; σ = z·C / n = 1.5 · 2 / 1 = 3
    layout = ModelLayout([TensorSpec("w", (1 << 20,), "float32")])
    store = MemoryStore()
    open_dp_round(store, 0, {"zero": np.zeros(1 << 20)}, layout, chunk=1 << 14)

    # Execute
    aggregate_round(store, 0, InlineExecutor(), AggregateConfig(
        shards=4, weighting="uniform", accumulate="float64",
        central_dp=dp(tmp_path / "k", clip=2.0, noise_multiplier=1.5, expected_clients=1)))

    # Assert: mean within 4σ/√P of 0, std within 1 % of σ, Kolmogorov-Smirnov against N(0, σ²)
    out = read_flat(store, aggregate_key(0), layout).astype(np.float64)
    p, sigma = out.size, 3.0
    assert abs(out.mean()) < 4 * sigma / math.sqrt(p)
    assert abs(out.std() / sigma - 1) < 0.01
    assert stats.kstest(out, "norm", args=(0, sigma)).pvalue > 0.01


def test_noise_of_any_range_is_the_slice_of_the_whole_vector() -> None:
    grid = ChunkGrid(10_000, 300)
    key = round_key(b"s" * 32, 7)
    whole = noise(key, grid, 0, 10_000)
    rng = np.random.default_rng(1)
    for _ in range(50):
        a, b = sorted(rng.integers(0, 10_001, size=2))
        if a < b:
            np.testing.assert_array_equal(noise(key, grid, a, b), whole[a:b])
    assert not np.array_equal(whole, noise(round_key(b"s" * 32, 8), grid, 0, 10_000))  # rounds differ
    assert not np.array_equal(whole, noise(round_key(b"t" * 32, 7), grid, 0, 10_000))  # keys differ


def test_example_weighting_and_other_reducers_are_refused() -> None:
    central = CentralDPRound(clip=1.0, noise_multiplier=1.0)
    with pytest.raises(ValidationError, match="needs weighting 'uniform'"):
        AggregateConfig(central_dp=central)  # weighting 'examples' is the default
    with pytest.raises(ValidationError, match="reducer 'mean'"):
        AggregateConfig(weighting="uniform", reducer="median", central_dp=central)
    with pytest.raises(ValidationError, match="topology 'sharded' or 'flat'"):
        AggregateConfig(weighting="uniform", topology="lambda-fl", central_dp=central)


def test_the_noise_key_never_reaches_the_reports(tmp_path: Path) -> None:
    store = MemoryStore()
    open_dp_round(store, 0, random_updates(3))
    aggregate_round(store, 0, InlineExecutor(), AggregateConfig(shards=2, weighting="uniform",
                                                                 central_dp=dp(tmp_path / "k")))
    key = round_key(load_secret(tmp_path / "k"), 0)
    for stored in store.list(""):
        assert key not in store.get(stored).decode("latin-1"), stored
    assert "<redacted>" in store.get(reports_key(0)).decode()


def test_each_release_is_counted_once_and_epsilon_is_the_accountants(tmp_path: Path) -> None:
    # Prepare: 3 rounds, Poisson sampling of 5 expected clients out of 100
    store = MemoryStore()
    central = dp(tmp_path / "k", sampler="poisson", population=100, expected_clients=5)
    config = AggregateConfig(shards=2, weighting="uniform", central_dp=central)
    for r in range(3):
        open_dp_round(store, r, random_updates(5, seed=r))

    # Execute: rounds 0, 1, 2, then round 1 again (a resumed run) with the same key file
    results = [aggregate_round(store, r, InlineExecutor(), config) for r in (0, 1, 2)]
    again = aggregate_round(store, 1, InlineExecutor(), config)

    # Assert: three releases; ε after each round equals the accountant's for that many releases
    ledger = PrivacyLedger(store)
    assert [e.round for e in ledger.entries()] == [0, 1, 2]
    for t, result in enumerate(results, start=1):
        assert result.manifest.privacy is not None
        assert result.manifest.privacy["epsilon"] == pytest.approx(
            epsilon([Release(noise_multiplier=1.0, sample_rate=0.05, steps=t)], 1e-5), rel=1e-9)
    assert again.manifest.privacy is not None and again.manifest.privacy["epsilon"] == pytest.approx(
        ledger.epsilon(1e-5))


def test_poisson_accounting_of_the_flower_setting_gives_epsilon_under_six() -> None:
    # z = 1, 50 of 1000 clients per round, 200 rounds, δ = 1e-5 (Flower's accountant, no sampling: ≈ 166)
    poisson = epsilon([Release(noise_multiplier=1.0, sampler="poisson", sample_rate=0.05, steps=200)], 1e-5)
    fixed = epsilon([Release(noise_multiplier=1.0, sampler="fixed", population=1000, sampled=50, steps=200)], 1e-5)
    unsampled = epsilon([Release(noise_multiplier=1.0, sampler="none", steps=200)], 1e-5)
    assert poisson < 6
    assert poisson < fixed < unsampled
    assert unsampled == pytest.approx(166, rel=0.01)


def test_a_release_past_max_epsilon_is_refused_before_any_noise(tmp_path: Path) -> None:
    # Prepare: a budget that one release fits and two do not
    one = epsilon([Release(noise_multiplier=1.0, sampler="none")], 1e-5)
    two = epsilon([Release(noise_multiplier=1.0, sampler="none", steps=2)], 1e-5)
    store = MemoryStore()
    config = AggregateConfig(shards=2, weighting="uniform",
                             central_dp=dp(tmp_path / "k", max_epsilon=(one + two) / 2))
    for r in range(2):
        open_dp_round(store, r, random_updates(3, seed=r))

    # Execute
    aggregate_round(store, 0, InlineExecutor(), config)
    with pytest.raises(PrivacyBudgetError, match="past max_epsilon"):
        aggregate_round(store, 1, InlineExecutor(), config)

    # Assert: round 1 was neither released nor recorded, and its updates were not even read
    assert not store.exists(aggregate_key(1))
    assert [e.round for e in PrivacyLedger(store).entries()] == [0]


def test_worker_processes_with_scoped_tokens_give_the_bytes_of_the_inline_run(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    open_dp_round(store, 0, random_updates(4, seed=9))
    config = AggregateConfig(shards=3, weighting="uniform", central_dp=dp(tmp_path / "k"))
    aggregate_round(store, 0, InlineExecutor(), config)
    inline = sha_of(store, 0)
    with LocalExecutor(workers=2, tokens=TokenIssuer.generate()) as executor:  # both phases carry tokens
        result = aggregate_round(store, 0, executor, config)
    assert sha_of(store, 0) == inline
    assert json.loads(store.get(reports_key(0)))["summary"]["invocations"] == 3
    assert sorted(r.function for r in result.all_reports) == ["client_norms"] * 3 + ["shard_reduce"] * 3


def test_the_cli_refuses_an_over_budget_release_with_exit_code_five(tmp_path: Path) -> None:
    # Prepare: a local store with two rounds
    from click.testing import CliRunner

    from gradshard.cli.main import main

    store = LocalStore(tmp_path / "store")
    for r in range(2):
        open_dp_round(store, r, random_updates(3, seed=r))
    dp_flags = ["--weighting", "uniform", "--dp-clip", "2", "--dp-noise-multiplier", "1", "--dp-key-file",
                str(tmp_path / "k"), "--executor", "inline"]
    one = epsilon([Release(noise_multiplier=1.0, sampler="none")], 1e-5)
    budget = str((one + epsilon([Release(noise_multiplier=1.0, sampler="none", steps=2)], 1e-5)) / 2)

    # Execute
    runner = CliRunner()
    first = runner.invoke(main, ["aggregate", "--store", str(store.root), "--round", "0", *dp_flags,
                                 "--dp-max-epsilon", budget])
    second = runner.invoke(main, ["aggregate", "--store", str(store.root), "--round", "1", *dp_flags,
                                  "--dp-max-epsilon", budget])
    examples = runner.invoke(main, ["aggregate", "--store", str(store.root), "--round", "1", "--dp-clip", "2",
                                    "--dp-noise-multiplier", "1"])
    alone = runner.invoke(main, ["aggregate", "--store", str(store.root), "--round", "1", "--dp-clip", "2"])

    # Assert
    assert first.exit_code == 0, first.output
    assert "central DP: " in first.output and f"ε = {one:.4g}" in first.output
    assert second.exit_code == 5 and "past max_epsilon" in second.output
    assert not store.exists(aggregate_key(1))
    assert examples.exit_code == 2 and "needs weighting 'uniform'" in examples.output
    assert alone.exit_code == 2 and "--dp-clip needs --dp-noise-multiplier" in alone.output


def test_a_tampered_client_is_rejected_in_the_norm_phase_before_any_noise(tmp_path: Path) -> None:
    # Prepare: 4 clients, one with a flipped bit in its payload
    updates = random_updates(4, seed=5)
    store = MemoryStore()
    open_dp_round(store, 0, updates)
    blob = bytearray(store.get(update_key(0, "c02")))
    blob[-4 * 300] ^= 0x08
    store.put(update_key(0, "c02"), bytes(blob))
    reference = MemoryStore()
    open_dp_round(reference, 0, {c: x for c, x in updates.items() if c != "c02"})
    config = AggregateConfig(shards=3, weighting="uniform", central_dp=dp(tmp_path / "k", expected_clients=4))

    # Execute
    result = aggregate_round(store, 0, InlineExecutor(), config)
    aggregate_round(reference, 0, InlineExecutor(), config)

    # Assert: rejected by name with its reason, one phase-2 run, the bytes of the round without it; 'fail' raises
    assert "checksum mismatch" in result.manifest.rejected["c02"]
    assert result.runs == 1
    assert sha_of(store, 0) == sha_of(reference, 0)
    with pytest.raises(RoundError, match="bad updates"):
        aggregate_round(store, 0, InlineExecutor(), config.model_copy(update={"policy": "fail"}))


def test_compact_updates_get_the_norms_and_bytes_of_full_size_ones(tmp_path: Path) -> None:
    from gradshard.format.compact import write_compact_update

    updates = random_updates(3, seed=11)
    full, compact = MemoryStore(), MemoryStore()
    open_dp_round(full, 0, updates)
    open_round(compact, RoundSpec.create(0, LAYOUT, chunk_elems=CHUNK))
    everything = {t.name: list(t.shape) for t in LAYOUT}
    for client, values in updates.items():
        write_compact_update(compact, update_key(0, client), LAYOUT, everything, values, UpdateMeta(
            client=client, round=0, examples=7, layout_digest=LAYOUT.digest(), chunk_elems=CHUNK))
    config = AggregateConfig(shards=3, weighting="uniform", central_dp=dp(tmp_path / "k"))

    results = [aggregate_round(s, 0, InlineExecutor(), config) for s in (full, compact)]

    assert all(c.compact for c in results[1].manifest.clients)
    assert [c.norm for c in results[0].manifest.clients] == [c.norm for c in results[1].manifest.clients]
    assert sha_of(full, 0) == sha_of(compact, 0)
