"""Scoped invocation tokens: a short-lived Ed25519-signed JWT per attempt of every function invocation.

The driver's :class:`TokenIssuer` mints one token per attempt; the function's :class:`TokenVerifier` refuses it
unless every check passes, each with its own error (a :class:`~gradshard.errors.TokenError`):

===================  ==================================================================================
check                refused with
===================  ==================================================================================
present              :class:`TokenMissingError` (a worker with a verifier never runs an unsigned call)
well-formed          :class:`TokenMalformedError` (over 8 KiB, not a JWS, alg other than EdDSA, a claim
                     missing or of the wrong type, a lifetime over ``max_lifetime_s``)
signature            :class:`TokenSignatureError` (signed by another key)
issuer               :class:`TokenIssuerError` (``iss`` not exactly the configured issuer)
audience             :class:`TokenAudienceError` (``aud`` not exactly the function being run)
time                 :class:`TokenExpiredError` (``exp`` passed), :class:`TokenNotYetValidError` (``nbf``/``iat``
                     in the future), both within ``leeway_s``
scope                :class:`TokenScopeError` (``scope`` not *equal* to the scope the function's registration
                     derives from the arguments: canonical JSON compared byte for byte, never a containment,
                     substring or prefix match)
arguments, store     :class:`TokenArgsError`, :class:`TokenStoreError` (sha256 of the canonical JSON of the
                     arguments, of the store spec, differ)
single use           :class:`TokenReplayError` (the ``jti`` was consumed before: an exclusive create of
                     ``security/jti/<exp hour>/<jti>`` in the replay store found it)
===================  ==================================================================================

Only EdDSA is accepted on decode (the algorithm list is pinned and the key is an Ed25519 key object, so neither
``none`` nor an HS256 token keyed with the public key can pass). See docs/invocation-tokens.md.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from gradshard.errors import StoreError, TokenError
from gradshard.store.base import Store

if TYPE_CHECKING:  # PyJWT and cryptography load when a token is minted or checked, not with every function
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ALGORITHM = "EdDSA"
DEFAULT_ISSUER = "gradshard-driver"
MAX_TOKEN_BYTES = 8192
JTI_PREFIX = "security/jti/"
PUBLIC_KEY_ENV = "GRADSHARD_TOKEN_PUBLIC_KEY"  # base64 of the raw 32-byte Ed25519 public key (the function side)
ISSUER_ENV = "GRADSHARD_TOKEN_ISSUER"
PRIVATE_KEY_ENV = "GRADSHARD_TOKEN_PRIVATE_KEY"  # base64 of the raw 32-byte Ed25519 seed (the driver side)
_CLAIMS = ("iss", "aud", "scope", "args", "store", "iat", "nbf", "exp", "jti")


class TokenMissingError(TokenError):
    """The invocation carries no token, and the function requires one."""


class TokenMalformedError(TokenError):
    """The token is too large, not a JWS, uses another algorithm, or lacks a claim of the right type."""


class TokenSignatureError(TokenError):
    """The token's signature does not verify with the function's public key."""


class TokenIssuerError(TokenError):
    """The token's ``iss`` is not the issuer the function trusts."""


class TokenAudienceError(TokenError):
    """The token's ``aud`` is not the function being run."""


class TokenExpiredError(TokenError):
    """The token's ``exp`` has passed."""


class TokenNotYetValidError(TokenError):
    """The token's ``nbf`` or ``iat`` lies in the future."""


class TokenScopeError(TokenError):
    """The token's scope is not exactly the scope of the invocation's arguments."""


class TokenArgsError(TokenError):
    """The token was minted for other arguments."""


class TokenStoreError(TokenError):
    """The token was minted for another store."""


class TokenReplayError(TokenError):
    """The token's ``jti`` was used before."""


# The report's error types of every refusal: deterministic for the same token (a retry mints a fresh one).
REFUSALS = frozenset(cls.__name__ for cls in (
    TokenError, TokenMissingError, TokenMalformedError, TokenSignatureError, TokenIssuerError, TokenAudienceError,
    TokenExpiredError, TokenNotYetValidError, TokenScopeError, TokenArgsError, TokenStoreError, TokenReplayError))


def canonical_json(value: Any) -> bytes:
    """The one serialisation both ends hash: sorted keys, no spaces, ASCII."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def digest_of(value: Any) -> str:
    """sha256 (hex) of the canonical JSON of ``value``; ``""`` for None (an in-process store has no spec)."""
    return "" if value is None else hashlib.sha256(canonical_json(value)).hexdigest()


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _raw(text: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise TokenError(f"{what} must be base64 of 32 raw Ed25519 key bytes")
    return raw


def public_key_from_b64(text: str) -> Ed25519PublicKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    return Ed25519PublicKey.from_public_bytes(_raw(text, PUBLIC_KEY_ENV))


def configured(environ: Mapping[str, str] | None = None) -> bool:
    """Whether an environment configures a function to verify tokens."""
    return bool((os.environ if environ is None else environ).get(PUBLIC_KEY_ENV))


def jti_key(jti: str, exp: float) -> str:
    """Where a consumed ``jti`` is recorded: bucketed by the hour its token expires (UTC), so whole hours can be
    collected once every token of them has expired."""
    return f"{JTI_PREFIX}{datetime.fromtimestamp(exp, UTC):%Y%m%d%H}/{jti}"


class TokenIssuer:
    """Mints tokens (the driver side): one per attempt, valid for ``ttl_s`` seconds from minting."""

    def __init__(self, private_key: Ed25519PrivateKey, *, issuer: str = DEFAULT_ISSUER, ttl_s: float = 300.0) -> None:
        if not issuer:
            raise TokenError("a token issuer needs a non-empty name")
        if ttl_s <= 0:
            raise TokenError(f"a token's ttl must be positive, got {ttl_s:g} s")
        self._key = private_key
        self.issuer = issuer
        self.ttl_s = ttl_s

    @classmethod
    def generate(cls, *, issuer: str = DEFAULT_ISSUER, ttl_s: float = 300.0) -> TokenIssuer:
        """An issuer with a fresh key (for executors that hand the public key to their own workers)."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return cls(Ed25519PrivateKey.generate(), issuer=issuer, ttl_s=ttl_s)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, ttl_s: float = 300.0) -> TokenIssuer:
        """The key in ``GRADSHARD_TOKEN_PRIVATE_KEY`` (needed when functions are deployed with the matching public
        key, e.g. on Lambda) and the issuer in ``GRADSHARD_TOKEN_ISSUER``; a fresh key if none is set."""
        env = os.environ if environ is None else environ
        issuer = env.get(ISSUER_ENV) or DEFAULT_ISSUER
        seed = env.get(PRIVATE_KEY_ENV)
        if not seed:
            return cls.generate(issuer=issuer, ttl_s=ttl_s)
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return cls(Ed25519PrivateKey.from_private_bytes(_raw(seed, PRIVATE_KEY_ENV)), issuer=issuer, ttl_s=ttl_s)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    def public_key_b64(self) -> str:
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        return _b64(self.public_key.public_bytes(Encoding.Raw, PublicFormat.Raw))

    def worker_env(self) -> dict[str, str]:
        """The environment that configures a function's verifier for this issuer (no secret in it)."""
        return {PUBLIC_KEY_ENV: self.public_key_b64(), ISSUER_ENV: self.issuer}

    def verifier(self, jti_store: Store, *, leeway_s: float = 5.0) -> TokenVerifier:
        return TokenVerifier(self.public_key, issuer=self.issuer, jti_store=jti_store, leeway_s=leeway_s)

    def mint(self, function: str, *, scope: Mapping[str, Any], args: Mapping[str, Any],
             store_spec: Mapping[str, Any] | None = None, now: float | None = None) -> str:
        """A token for one attempt of ``function(args)`` against the store ``store_spec``; ``now`` for tests."""
        import jwt

        iat = int(time.time() if now is None else now)
        claims = {"iss": self.issuer, "aud": function, "scope": dict(scope), "args": digest_of(dict(args)),
                  "store": digest_of(None if store_spec is None else dict(store_spec)), "iat": iat, "nbf": iat,
                  "exp": iat + int(self.ttl_s), "jti": str(uuid.uuid4())}
        return jwt.encode(claims, self._key, algorithm=ALGORITHM)


@dataclass(frozen=True)
class VerifiedToken:
    """The claims of a token whose signature, issuer, audience and times passed."""

    audience: str
    scope: dict[str, Any]
    args: str
    store: str
    exp: int
    jti: str


class TokenVerifier:
    """Verifies tokens (the function side) and consumes each one's ``jti`` in ``jti_store``."""

    def __init__(self, public_key: Ed25519PublicKey, *, issuer: str = DEFAULT_ISSUER, jti_store: Store,
                 leeway_s: float = 5.0, max_lifetime_s: float = 3600.0) -> None:
        if not 0 <= leeway_s <= 60:
            raise TokenError(f"the clock leeway must be 0-60 s, got {leeway_s:g}")
        self._key = public_key
        self.issuer = issuer
        self.jti_store = jti_store
        self.leeway_s = leeway_s
        self.max_lifetime_s = max_lifetime_s

    @classmethod
    def from_env(cls, jti_store: Store, environ: Mapping[str, str] | None = None) -> TokenVerifier | None:
        """The verifier a function's environment configures (``GRADSHARD_TOKEN_PUBLIC_KEY``, optionally
        ``GRADSHARD_TOKEN_ISSUER``), or None where it configures none."""
        env = os.environ if environ is None else environ
        key = env.get(PUBLIC_KEY_ENV)
        if not key:
            return None
        return cls(public_key_from_b64(key), issuer=env.get(ISSUER_ENV) or DEFAULT_ISSUER, jti_store=jti_store)

    def decode(self, token: str | None, function: str) -> VerifiedToken:
        """Check presence, size, signature (EdDSA only), issuer, audience, times and claim types."""
        import jwt

        if token is None or token == "":
            raise TokenMissingError(f"invocation of {function!r} carries no token; this function requires one "
                                    f"({PUBLIC_KEY_ENV} is set in its environment)")
        if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES:
            raise TokenMalformedError(f"the token of {function!r} is not a string of at most {MAX_TOKEN_BYTES} bytes")
        try:
            claims = jwt.decode(token, self._key, algorithms=[ALGORITHM], audience=function, issuer=self.issuer,
                                leeway=self.leeway_s, options={"require": list(_CLAIMS), "strict_aud": True})
        except jwt.InvalidSignatureError:
            raise TokenSignatureError(f"the token of {function!r} is not signed by the issuer's key") from None
        except jwt.ExpiredSignatureError:
            raise TokenExpiredError(f"the token of {function!r} has expired") from None
        except (jwt.ImmatureSignatureError, jwt.InvalidIssuedAtError) as exc:
            raise TokenNotYetValidError(f"the token of {function!r} is not valid yet ({exc})") from None
        except jwt.InvalidAudienceError:
            raise TokenAudienceError(f"the token is for another function, not {function!r}") from None
        except jwt.InvalidIssuerError:
            raise TokenIssuerError(f"the token of {function!r} is not issued by {self.issuer!r}") from None
        except jwt.PyJWTError as exc:  # not a JWS, another algorithm, a missing claim
            raise TokenMalformedError(f"the token of {function!r} is malformed: {exc}") from None
        return self._typed(claims, function)

    def _typed(self, claims: dict[str, Any], function: str) -> VerifiedToken:
        scope, args, store, exp, iat, jti = (claims[k] for k in ("scope", "args", "store", "exp", "iat", "jti"))
        if (claims["aud"] != function or claims["iss"] != self.issuer  # PyJWT checked both; exact, once more
                or not isinstance(scope, dict) or not isinstance(args, str) or not isinstance(store, str)
                or not isinstance(exp, int) or not isinstance(iat, int) or not isinstance(jti, str)):
            raise TokenMalformedError(f"the token of {function!r} has a claim of the wrong type")
        try:
            valid_jti = str(uuid.UUID(jti)) == jti
        except ValueError:
            valid_jti = False
        if not valid_jti:
            raise TokenMalformedError(f"the token of {function!r} has a jti that is not a UUID")
        if exp - iat > self.max_lifetime_s:
            raise TokenMalformedError(f"the token of {function!r} lives {exp - iat} s, over the "
                                      f"{self.max_lifetime_s:g} s a verifier accepts")
        return VerifiedToken(function, scope, args, store, exp, jti)

    def authorize(self, token: VerifiedToken, *, scope: Mapping[str, Any], args: Mapping[str, Any],
                  store_spec: Mapping[str, Any] | None = None) -> None:
        """Check the scope (exact), the argument and store digests, then consume the ``jti`` (once only)."""
        function = token.audience
        want = canonical_json(dict(scope))
        if canonical_json(token.scope) != want:
            raise TokenScopeError(f"the token of {function!r} is scoped to {canonical_json(token.scope).decode()}, "
                                  f"not to this invocation's {want.decode()}")
        if token.args != digest_of(dict(args)):
            raise TokenArgsError(f"the token of {function!r} was minted for other arguments")
        if token.store != digest_of(None if store_spec is None else dict(store_spec)):
            raise TokenStoreError(f"the token of {function!r} was minted for another store")
        record = canonical_json({"aud": function, "exp": token.exp})
        try:
            fresh = self.jti_store.put_new(jti_key(token.jti, token.exp), record)
        except StoreError as exc:
            raise StoreError(f"cannot record the token id of {function!r} in the replay store: {exc}") from exc
        if not fresh:
            raise TokenReplayError(f"the token of {function!r} (jti {token.jti}) was used before")

    def verify(self, token: str | None, function: str, *, scope: Mapping[str, Any], args: Mapping[str, Any],
               store_spec: Mapping[str, Any] | None = None) -> VerifiedToken:
        """:meth:`decode` then :meth:`authorize`."""
        verified = self.decode(token, function)
        self.authorize(verified, scope=scope, args=args, store_spec=store_spec)
        return verified


def collect_spent_token_ids(store: Store, *, grace_s: float = 300.0, now: float | None = None,
                            dry_run: bool = False) -> list[str]:
    """Delete the recorded ``jti`` of every token that expired at least ``grace_s`` ago (whole hours of
    ``security/jti/<yyyymmddhh>/``): such a token fails the expiry check, so its record is no longer needed."""
    clock = time.time() if now is None else now
    spent = []
    for key in store.list(JTI_PREFIX):
        hour = key[len(JTI_PREFIX):].split("/", 1)[0]
        try:
            start = datetime.strptime(hour, "%Y%m%d%H").replace(tzinfo=UTC).timestamp()
        except ValueError:
            continue
        if start + 3600 + grace_s <= clock:
            spent.append(key)
    if not dry_run:
        for key in spent:
            store.delete(key)
    return spent


def warm_up() -> None:
    """Sign and verify one token, so a runtime's zygote pays the lazy initialisation of the Ed25519 code paths
    once, not every forked function."""
    issuer = TokenIssuer.generate()
    token = issuer.mint("warm-up", scope={}, args={})
    from gradshard.store.memory import MemoryStore

    TokenVerifier(issuer.public_key, jti_store=MemoryStore()).decode(token, "warm-up")
