"""Central DP for one round: clip every client's update to L2 norm C, add N(0, σ²) per element, account the release.

The round runs as two plans (aggregation contract v2): phase 1, ``client_norms`` over the shards (exact norms, the
same for every M, :mod:`gradshard.privacy.clipping`); the driver turns them into clip factors ``min(1, C/‖Δᵢ‖)``
and checks and records the release in the ledger; phase 2 is the ordinary sharded mean with those factors and
noise ``σ = z·C / n`` added element by element (:mod:`gradshard.privacy.noise`), where n is the fixed expected
cohort. So the noised aggregate is the same bytes for every M and partition.

Only uniform weighting is allowed: with example weights a client's influence is its share of the examples, which
it reports itself, so the sensitivity is unbounded (Flower refuses it too). Integer and boolean buffers are never
in the aggregated layout, so they are never clipped or noised.
"""

from __future__ import annotations

import logging
import math
import secrets
from typing import TYPE_CHECKING

import numpy as np

from gradshard.aggregation.contracts import NoiseSpec, RoundRef
from gradshard.errors import PlanError, PrivacyError, RoundError
from gradshard.format.keys import manifest_key
from gradshard.format.round import RoundManifest, check_enough, write_manifest
from gradshard.privacy.accountant import Release
from gradshard.privacy.clipping import NormArgs, NormResult, clip_factors, combine_norms
from gradshard.privacy.config import CentralDPRound
from gradshard.privacy.ledger import LedgerEntry, PrivacyLedger, check_budget, key_id
from gradshard.privacy.noise import load_secret, round_key
from gradshard.runtime.executor import Executor, ProgressCallback
from gradshard.runtime.registry import parse_result
from gradshard.store import Store
from gradshard.topology.base import Invocation, Plan
from gradshard.topology.common import FUNCTION_OVERHEAD_BYTES
from gradshard.topology.sharded import Partition, shard_plan_for

if TYPE_CHECKING:
    from gradshard.runtime.report import InvocationReport

log = logging.getLogger(__name__)
_PROCESS_SECRET = secrets.token_bytes(32)  # used when no key file is configured: fresh noise per process


def check_config(dp: CentralDPRound, *, weighting: str, reducer: str, topology: str) -> None:
    """Refuse what central DP cannot be: example or server weighting, another reducer, a tree topology."""
    if weighting != "uniform":
        raise PlanError(f"central DP needs weighting 'uniform', not {weighting!r}: with weights a client reports "
                        "itself (examples) its influence is unbounded, so no noise level bounds the sensitivity")
    if reducer != "mean":
        raise PlanError(f"central DP clips and averages: use reducer 'mean', not {reducer!r}")
    if topology not in ("sharded", "flat"):
        raise PlanError(f"central DP runs on topology 'sharded' or 'flat' (its noise is added where each element "
                        f"is finished), not {topology!r}")
    if dp.max_epsilon is not None and dp.noise_multiplier == 0:
        raise PrivacyError("noise_multiplier 0 clips without noise (ε = ∞), which max_epsilon forbids")


def release_of(dp: CentralDPRound) -> Release | None:
    """The accountant's view of one round (None without noise: nothing to account, ε = ∞)."""
    if dp.noise_multiplier == 0:
        return None
    if dp.sampler == "poisson":
        return Release(noise_multiplier=dp.noise_multiplier, sampler="poisson", sample_rate=dp.rate())
    if dp.sampler == "fixed":
        assert dp.population is not None and dp.expected_clients is not None
        return Release(noise_multiplier=dp.noise_multiplier, sampler="fixed", population=dp.population,
                       sampled=dp.expected_clients)
    return Release(noise_multiplier=dp.noise_multiplier, sampler="none")


def norms_plan(manifest: RoundManifest, manifest_sha256: str, shards: int, partition: Partition) -> Plan:
    """Phase 1: one ``client_norms`` invocation per shard of the round's partition."""
    spec = manifest.spec
    itemsize = np.dtype(spec.model_layout().flat_dtype).itemsize
    memory = spec.chunk_elems * (itemsize + 8) + FUNCTION_OVERHEAD_BYTES
    ref = RoundRef(manifest_key=manifest_key(manifest.round), manifest_sha256=manifest_sha256)
    invocations = tuple(Invocation(f"norms-{s:04d}", "client_norms", NormArgs(round=ref, start=a, stop=b), memory)
                        for s, (a, b) in enumerate(shard_plan_for(manifest, shards, partition).ranges))
    return Plan("central-dp-norms", invocations, {"m": shards})


def _norms(store: Store, manifest: RoundManifest, executor: Executor, shards: int, partition: Partition,
           on_done: ProgressCallback | None, policy: str) -> tuple[dict[str, float], list[InvocationReport]]:
    sha = write_manifest(store, manifest)
    plan = norms_plan(manifest, sha, shards, partition)
    reports = executor.run(plan, store, on_done)
    failed = [r for r in reports if not r.ok]
    if failed or len(reports) != len(plan.invocations):
        why = "; ".join(f"{r.invocation}: {r.error_type}: {r.error}" for r in failed)
        raise RoundError(f"round {manifest.round}: the central-DP norm phase failed: {why or 'not every shard ran'}")
    results = [parse_result("client_norms", r.result, NormResult) for r in reports]
    chunks = -(-manifest.spec.model_layout().numel // manifest.spec.chunk_elems)
    norms, bad = combine_norms(results, chunks)
    if bad and policy == "fail":
        raise RoundError(f"round {manifest.round} failed on bad updates: {bad}")
    for client, reason in bad.items():
        log.warning("rejecting client %s: %s", client, reason)
        manifest.reject(client, reason)
    return norms, reports


def prepare_round(store: Store, manifest: RoundManifest, dp: CentralDPRound, executor: Executor, *,
                  shards: int, partition: Partition, on_done: ProgressCallback | None = None, policy: str = "skip"
                  ) -> tuple[NoiseSpec | None, list[InvocationReport]]:
    """Run phase 1, set every client's clip factor in ``manifest``, record the release; returns phase 2's noise."""
    secret = load_secret(dp.key_file) if dp.key_file else _PROCESS_SECRET
    key = round_key(secret, manifest.round)
    release = release_of(dp)
    ledger = PrivacyLedger(store)
    entry = None if release is None else LedgerEntry(round=manifest.round, key_id=key_id(key), release=release)
    if entry is not None:  # refuse an over-budget round before reading any update
        check_budget(ledger.would_spend(entry, dp.delta), dp.delta, dp.max_epsilon, manifest.round)
    norms, reports = _norms(store, manifest, executor, shards, partition, on_done, policy)
    check_enough(manifest)
    missing = [c.client for c in manifest.clients if c.client not in norms]
    if missing:
        raise PrivacyError(f"round {manifest.round}: the norm phase returned no norm for clients {missing[:5]}")
    factors = clip_factors(norms, dp.clip)
    manifest.clients = [c.model_copy(update={"scale": factors[c.client], "norm": norms[c.client]})
                        for c in manifest.clients]
    denominator = dp.expected_clients or len(manifest.clients)
    manifest.denominator = denominator
    spent = math.inf if entry is None else ledger.record(entry, dp.delta, dp.max_epsilon)
    sigma = dp.noise_multiplier * dp.clip / denominator
    clipped = sum(f < 1.0 for f in factors.values())
    manifest.privacy = {"clip": dp.clip, "noise_multiplier": dp.noise_multiplier, "sigma": sigma,
                        "denominator": denominator, "clipped": clipped, "epsilon": spent, "delta": dp.delta,
                        "sampler": dp.sampler}
    log.info("round %d: central DP: %d of %d updates clipped to %g; noise σ = %.4g; ε = %.4g at δ = %g",
             manifest.round, clipped, len(factors), dp.clip, sigma, spent, dp.delta)
    return (NoiseSpec(sigma=sigma, key=key) if sigma > 0 else None), reports
