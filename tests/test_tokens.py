"""Scoped invocation tokens: a shard function refuses every bad token, through real worker processes and inline.

The round's shard invocations are recorded from a real aggregation; each test then sends one of them to a function
with a token that fails exactly one check, and asserts the refusal named in the report. A token that passes every
check lets the function run (it then fails on the completed upload, which proves it got past the token).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from gradshard.aggregation.contracts import ShardReduceArgs
from gradshard.aggregation.driver import AggregateConfig, aggregate_round
from gradshard.cli.main import main
from gradshard.core.zoo import synthetic
from gradshard.demo.synthetic import make_round
from gradshard.format.keys import aggregate_key
from gradshard.runtime import Executor, InlineExecutor, InvocationReport, LocalExecutor, registry
from gradshard.security import tokens as tk
from gradshard.security.tokens import TokenIssuer, TokenVerifier
from gradshard.store import LocalStore, MemoryStore, Store
from gradshard.topology.base import Invocation, Plan

pytestmark = pytest.mark.integration
R = 1
LAYOUT = synthetic(120_000, tensor_elems=20_000)
CONFIG = AggregateConfig(shards=3)


class Recording(InlineExecutor):
    """An inline executor that keeps every invocation it ran."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.seen: list[Invocation] = []

    def attempt(self, invocation: Invocation, store: Store, token: str | None = None) -> InvocationReport:
        self.seen.append(invocation)
        return super().attempt(invocation, store, token)


@dataclasses.dataclass
class Shard:
    store: LocalStore
    invocation: Invocation

    @property
    def args(self) -> ShardReduceArgs:
        assert isinstance(self.invocation.args, ShardReduceArgs)
        return self.invocation.args


@pytest.fixture(scope="module")
def shard(tmp_path_factory: pytest.TempPathFactory) -> Shard:
    """A round aggregated once (no tokens), and its first shard invocation."""
    store = LocalStore(tmp_path_factory.mktemp("round"), fsync=False)
    make_round(store, R, LAYOUT, 3, seed=4)
    recorder = Recording()
    aggregate_round(store, R, recorder, CONFIG)
    return Shard(store, next(inv for inv in recorder.seen if inv.function == "shard_reduce"))


@pytest.fixture(scope="module")
def issuer() -> TokenIssuer:
    return TokenIssuer.generate(ttl_s=300)


@pytest.fixture(scope="module", params=["local", "inline"])
def executor(request: pytest.FixtureRequest, issuer: TokenIssuer) -> Iterator[Executor]:
    """An executor whose function side verifies ``issuer``'s tokens: worker processes configured through their
    environment, or in-process."""
    made: Executor = (LocalExecutor(workers=1, retries=0, tokens=issuer) if request.param == "local"
                      else InlineExecutor(tokens=issuer))
    yield made
    made.close()


def token_for(issuer: TokenIssuer, inv: Invocation, store: Store, *, function: str | None = None,
              scope: dict[str, Any] | None = None, args: dict[str, Any] | None = None, now: float | None = None) -> str:
    """A token for ``inv`` with one claim optionally replaced."""
    return issuer.mint(function or inv.function,
                       scope=registry.scope_of(inv.function, inv.args) if scope is None else scope,
                       args=inv.payload() if args is None else args, store_spec=store.spec(), now=now)


def refused(executor: Executor, shard: Shard, token: str | None, inv: Invocation | None = None) -> InvocationReport:
    report = executor.attempt(inv or shard.invocation, shard.store, token)
    assert not report.ok
    return report


def assert_refused(report: InvocationReport, error_type: str, words: str) -> None:
    assert report.error_type == error_type, report.error
    assert words in (report.error or "")
    assert not report.retryable


# --- the shard function's scope -----------------------------------------------------------------------------
def test_shard_reduce_scope_is_its_round_and_element_range(shard: Shard) -> None:
    # Execute
    scope = registry.scope_of("shard_reduce", shard.invocation.args)

    # Assert
    assert scope == {"round": R, "range": [shard.args.start, shard.args.stop]}


# --- a valid token is accepted; every broken one is refused by name -----------------------------------------
def test_a_valid_token_gets_the_function_past_every_check(executor: Executor, shard: Shard,
                                                          issuer: TokenIssuer) -> None:
    # Execute: the round is complete, so the function itself fails on its (completed) upload
    report = executor.attempt(shard.invocation, shard.store, token_for(issuer, shard.invocation, shard.store))

    # Assert
    assert report.error_type not in tk.REFUSALS
    assert "upload" in (report.error or "")


def test_missing_token_is_refused(executor: Executor, shard: Shard) -> None:
    assert_refused(refused(executor, shard, None), "TokenMissingError", "carries no token")


def test_expired_token_is_refused(executor: Executor, shard: Shard, issuer: TokenIssuer) -> None:
    # Prepare: minted an hour ago with a 5-minute ttl
    token = token_for(issuer, shard.invocation, shard.store, now=time.time() - 3600)

    # Execute / Assert
    assert_refused(refused(executor, shard, token), "TokenExpiredError", "expired")


def test_token_from_the_future_is_refused(executor: Executor, shard: Shard, issuer: TokenIssuer) -> None:
    token = token_for(issuer, shard.invocation, shard.store, now=time.time() + 3600)

    assert_refused(refused(executor, shard, token), "TokenNotYetValidError", "not valid yet")


def test_token_signed_by_another_key_is_refused(executor: Executor, shard: Shard) -> None:
    # Prepare: same issuer name, another key
    forger = TokenIssuer(Ed25519PrivateKey.generate())
    token = token_for(forger, shard.invocation, shard.store)

    # Execute / Assert
    assert_refused(refused(executor, shard, token), "TokenSignatureError", "not signed by the issuer's key")


def test_token_of_another_issuer_is_refused(executor: Executor, shard: Shard, issuer: TokenIssuer) -> None:
    other = TokenIssuer(issuer._key, issuer="gradshard-driver-2")  # the right key, another issuer name

    assert_refused(refused(executor, shard, token_for(other, shard.invocation, shard.store)),
                   "TokenIssuerError", "not issued by")


def test_token_for_flat_reduce_is_refused_by_shard_reduce(executor: Executor, shard: Shard,
                                                          issuer: TokenIssuer) -> None:
    token = token_for(issuer, shard.invocation, shard.store, function="flat_reduce")

    assert_refused(refused(executor, shard, token), "TokenAudienceError", "another function")


def test_token_scoped_to_another_range_is_refused(executor: Executor, shard: Shard, issuer: TokenIssuer) -> None:
    # Prepare: a token for elements [0, 10) presented with this invocation's [start, stop)
    token = token_for(issuer, shard.invocation, shard.store, scope={"round": R, "range": [0, 10]})

    # Execute / Assert
    assert_refused(refused(executor, shard, token), "TokenScopeError", '"range":[0,10]')


@pytest.mark.parametrize("wider", [
    "longer stop",  # canonical JSON of the right scope is a prefix of this one's
    "extra claim",  # a superset of the right scope
    "several ranges",  # contains the right range among others
    "string",  # the right scope's JSON as a substring of a string scope
])
def test_scope_that_contains_the_right_one_is_refused(executor: Executor, shard: Shard, issuer: TokenIssuer,
                                                      wider: str) -> None:
    # Prepare
    start, stop = shard.args.start, shard.args.stop
    right = {"round": R, "range": [start, stop]}
    scope: dict[str, Any] = {
        "longer stop": {"round": R, "range": [start, int(f"{stop}0")]},
        "extra claim": {**right, "clients": "all"},
        "several ranges": {"round": R, "range": [[start, stop], [stop, 2 * stop]]},
        "string": {"range": f"any {tk.canonical_json(right).decode()} any", "round": R},
    }[wider]
    token = token_for(issuer, shard.invocation, shard.store, scope=scope)
    if wider == "longer stop":
        assert tk.canonical_json(scope).startswith(tk.canonical_json(right).split(b"]")[0])

    # Execute / Assert
    assert_refused(refused(executor, shard, token), "TokenScopeError", "is scoped to")


def test_token_for_other_arguments_of_the_same_scope_is_refused(executor: Executor, shard: Shard,
                                                                issuer: TokenIssuer) -> None:
    # Prepare: same round and range, another window size
    args = shard.args
    other = dataclasses.replace(shard.invocation, args=args.model_copy(
        update={"settings": args.settings.model_copy(update={"window_bytes": args.settings.window_bytes + 8})}))
    token = token_for(issuer, shard.invocation, shard.store)
    assert registry.scope_of("shard_reduce", other.args) == registry.scope_of("shard_reduce", args)

    # Execute / Assert
    assert_refused(refused(executor, shard, token, other), "TokenArgsError", "other arguments")


def test_token_for_another_store_is_refused(executor: Executor, shard: Shard, issuer: TokenIssuer,
                                            tmp_path: Path) -> None:
    other = LocalStore(tmp_path / "elsewhere", fsync=False)
    token = issuer.mint("shard_reduce", scope=registry.scope_of("shard_reduce", shard.invocation.args),
                        args=shard.invocation.payload(), store_spec=other.spec())

    assert_refused(refused(executor, shard, token), "TokenStoreError", "another store")


@pytest.mark.parametrize("kind", ["none", "HS256 keyed with the public key", "oversized", "garbage"])
def test_malformed_tokens_and_other_algorithms_are_refused(executor: Executor, shard: Shard, issuer: TokenIssuer,
                                                           kind: str) -> None:
    # Prepare: the claims of a valid token under another algorithm
    claims = jwt.decode(token_for(issuer, shard.invocation, shard.store), options={"verify_signature": False})
    token = {
        "none": lambda: jwt.encode(claims, None, algorithm="none"),
        "HS256 keyed with the public key": lambda: jwt.encode(claims, issuer.public_key_b64().encode() + b"=" * 8,
                                                              algorithm="HS256"),
        "oversized": lambda: "a" * (tk.MAX_TOKEN_BYTES + 1),
        "garbage": lambda: "not.a.token",
    }[kind]()

    # Execute / Assert
    assert_refused(refused(executor, shard, token), "TokenMalformedError", "")


def test_replayed_token_is_refused_the_second_time(executor: Executor, shard: Shard, issuer: TokenIssuer) -> None:
    # Prepare
    token = token_for(issuer, shard.invocation, shard.store)

    # Execute
    first = executor.attempt(shard.invocation, shard.store, token)
    second = executor.attempt(shard.invocation, shard.store, token)

    # Assert: the first got past the token (then met the completed upload); the second is a replay
    assert first.error_type not in tk.REFUSALS
    assert_refused(second, "TokenReplayError", "was used before")


# --- per-attempt tokens, retries, whole rounds ----------------------------------------------------------------
class FixedToken(InlineExecutor):
    """Sends the same token with every attempt (what an executor must never do)."""

    fixed: str | None = None

    def mint(self, invocation: Invocation, store: Store) -> str | None:
        self.fixed = self.fixed or super().mint(invocation, store)
        return self.fixed


def test_a_refusal_is_reported_at_once_and_not_retried(tmp_path: Path) -> None:
    # Prepare
    store = LocalStore(tmp_path, fsync=False)
    executor = FixedToken(retries=2, tokens=TokenIssuer.generate())
    plan = Plan("adhoc", (Invocation("only", "noop", {}, 0),))
    (ok,) = executor.run(plan, store)

    # Execute
    (again,) = executor.run(plan, store)

    # Assert
    assert ok.ok
    assert again.error_type == "TokenReplayError"
    assert again.attempts == 1


def test_retries_after_real_worker_crashes_each_carry_a_fresh_token(tmp_path: Path) -> None:
    # Prepare: a function that verifies its token (recording the jti) and then kills its worker process
    store = LocalStore(tmp_path, fsync=False)
    plan = Plan("adhoc", (Invocation("only", "crash", {}, 0),))

    # Execute
    with LocalExecutor(workers=1, retries=2, tokens=TokenIssuer.generate()) as executor:
        (report,) = executor.run(plan, store)

    # Assert: three crashes, none refused as a replay, three distinct token ids consumed
    assert report.error_type == "WorkerCrash"
    assert report.attempts == 3
    assert len(store.list(tk.JTI_PREFIX)) == 3


class CrashFirst(LocalExecutor):
    """The first attempt of each invocation consumes its token, then "crashes" (as a worker killed after it
    verified); later attempts run for real."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.crashed: set[str] = set()

    def attempt(self, invocation: Invocation, store: Store, token: str | None = None) -> InvocationReport:
        if invocation.id in self.crashed:
            return super().attempt(invocation, store, token)
        self.crashed.add(invocation.id)
        assert self.tokens is not None
        self.tokens.verifier(store).verify(token, invocation.function, args=invocation.payload(),
                                           scope=registry.scope_of(invocation.function, invocation.args),
                                           store_spec=store.spec())
        return InvocationReport(invocation=invocation.id, function=invocation.function, ok=False,
                                error_type="WorkerCrash", error="killed after verifying its token")


def sharded_round(path: Path, executor: Executor) -> tuple[bytes, list[InvocationReport]]:
    store = LocalStore(path, fsync=False)
    make_round(store, R, LAYOUT, 3, seed=4)
    result = aggregate_round(store, R, executor, CONFIG)
    return store.get(aggregate_key(R)), result.reports


def test_a_retry_after_a_crash_gets_a_fresh_token_and_succeeds(tmp_path: Path) -> None:
    # Prepare
    with LocalExecutor(workers=2, retries=0) as plain:
        expected, _ = sharded_round(tmp_path / "plain", plain)

    # Execute
    with CrashFirst(workers=2, retries=1, tokens=TokenIssuer.generate()) as executor:
        got, reports = sharded_round(tmp_path / "tokens", executor)

    # Assert
    assert got == expected
    assert [r.attempts for r in reports] == [2] * CONFIG.shards


@pytest.mark.parametrize("kind", ["local", "inline"])
def test_a_sharded_round_with_tokens_gives_the_same_aggregate_bytes(tmp_path: Path, kind: str) -> None:
    # Prepare
    def make(tokens: TokenIssuer | None) -> Executor:
        return LocalExecutor(workers=2, retries=0, tokens=tokens) if kind == "local" else InlineExecutor(tokens=tokens)

    # Execute
    with make(None) as plain:
        expected, _ = sharded_round(tmp_path / "plain", plain)
    with make(TokenIssuer.generate()) as secured:
        got, reports = sharded_round(tmp_path / "tokens", secured)

    # Assert: identical bytes; one consumed token id per invocation
    assert got == expected
    assert all(r.ok and r.attempts == 1 for r in reports)
    assert len(LocalStore(tmp_path / "tokens").list(tk.JTI_PREFIX)) == len(reports)


def test_workers_do_not_inherit_token_settings_of_the_driver_environment(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the driver's own environment names a key, the executor has no tokens
    monkeypatch.setenv(tk.PUBLIC_KEY_ENV, TokenIssuer.generate().public_key_b64())
    plan = Plan("adhoc", (Invocation("only", "noop", {}, 0),))

    # Execute
    with LocalExecutor(workers=1, retries=0) as executor:
        (report,) = executor.run(plan, LocalStore(tmp_path, fsync=False))

    # Assert
    assert report.ok, report.error


# --- the verifier on its own ------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(signed=st.tuples(st.integers(0, 10**9), st.integers(1, 10**9)),
       wanted=st.tuples(st.integers(0, 10**9), st.integers(1, 10**9)))
def test_a_scope_passes_only_when_equal(signed: tuple[int, int], wanted: tuple[int, int]) -> None:
    # Prepare
    issuer = TokenIssuer.generate()
    verifier = issuer.verifier(MemoryStore())
    token = issuer.mint("shard_reduce", scope={"round": 1, "range": list(signed)}, args={})

    # Execute
    try:
        verifier.verify(token, "shard_reduce", scope={"round": 1, "range": list(wanted)}, args={})
        passed = True
    except tk.TokenScopeError:
        passed = False

    # Assert
    assert passed == (signed == wanted)


def test_a_verifier_comes_from_the_environment_and_spent_ids_are_collected() -> None:
    # Prepare
    issuer = TokenIssuer.generate(issuer="driver-a", ttl_s=60)
    store = MemoryStore()
    verifier = TokenVerifier.from_env(store, issuer.worker_env())
    assert verifier is not None and TokenVerifier.from_env(store, {}) is None
    token = issuer.mint("noop", scope={}, args={})
    verifier.verify(token, "noop", scope={}, args={})

    # Execute
    kept = tk.collect_spent_token_ids(store)
    spent = tk.collect_spent_token_ids(store, now=time.time() + 2 * 3600 + 600)

    # Assert: kept while its token could still pass, collected once it expired
    assert kept == []
    assert len(spent) == 1 and spent[0].startswith(tk.JTI_PREFIX)
    assert store.list(tk.JTI_PREFIX) == []


def test_an_issuer_reads_its_key_from_the_environment() -> None:
    # Prepare
    key = Ed25519PrivateKey.generate()
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
    seed = tk._b64(key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()))

    # Execute
    issuer = TokenIssuer.from_env({tk.PRIVATE_KEY_ENV: seed, tk.ISSUER_ENV: "ci"})

    # Assert
    assert issuer.issuer == "ci"
    assert issuer.public_key_b64() == TokenIssuer(key).public_key_b64()


# --- the CLI ----------------------------------------------------------------------------------------------------
def test_gc_collects_the_ids_of_expired_tokens_only(tmp_path: Path) -> None:
    # Prepare: one id of a token that expired in 2020, one of a token that is still valid
    store = LocalStore(tmp_path, fsync=False)
    old = tk.jti_key("00000000-0000-4000-8000-000000000000", 1_577_836_800)
    issuer = TokenIssuer.generate()
    issuer.verifier(store).verify(issuer.mint("noop", scope={}, args={}, store_spec=store.spec()), "noop",
                                  scope={}, args={}, store_spec=store.spec())
    store.put(old, b"{}")
    live = [key for key in store.list(tk.JTI_PREFIX) if key != old]

    # Execute
    result = CliRunner().invoke(main, ["gc", "--store", str(tmp_path)])

    # Assert
    assert result.exit_code == 0, result.output
    assert "collected 1 spent token id(s)" in result.output
    assert store.list(tk.JTI_PREFIX) == live


@pytest.mark.parametrize("flag", ["--scoped-tokens", "--no-scoped-tokens"])
def test_aggregate_command_runs_with_and_without_tokens(tmp_path: Path, flag: str) -> None:
    # Prepare
    store = LocalStore(tmp_path, fsync=False)
    make_round(store, R, LAYOUT, 3, seed=4)

    # Execute
    result = CliRunner().invoke(main, ["aggregate", "--store", str(tmp_path), "--round", str(R), "--shards", "2",
                                       "--executor", "inline", flag])

    # Assert
    assert result.exit_code == 0, result.output
    assert len(store.list(tk.JTI_PREFIX)) == (2 if flag == "--scoped-tokens" else 0)


# --- the Lambda contract ----------------------------------------------------------------------------------------
def test_the_lambda_event_carries_the_token_and_a_configured_handler_verifies_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the handler's environment is a deployed function's, configured with the issuer's key
    from gradshard.runtime.aws_lambda import handler, invoke_event

    issuer = TokenIssuer.generate()
    for name, value in issuer.worker_env().items():
        monkeypatch.setenv(name, value)
    store = LocalStore(tmp_path, fsync=False)
    inv = Invocation("only", "noop", {}, 0)
    token = token_for(issuer, inv, store)

    # Execute
    plain = invoke_event(inv, store.spec())
    ok = handler(invoke_event(inv, store.spec(), token))
    replayed = handler(invoke_event(inv, store.spec(), token))
    missing = handler(plain)

    # Assert
    assert "token" not in plain
    assert ok["ok"], ok
    assert replayed["error_type"] == "TokenReplayError"
    assert missing["error_type"] == "TokenMissingError"
