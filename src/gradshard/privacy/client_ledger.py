"""The client privacy ledger of a training run: per client, the DP-SGD release of every round it took part in.

``privacy/clients/<client>.json`` holds one client's releases keyed by round number (so recording a round again —
a resumed driver, a retried accounting step — replaces the entry instead of adding one: no round is counted
twice), the budget exclusions and its composed ε so far. Each write is one atomic ``put`` of the whole object.

A client's releases compose with :func:`gradshard.privacy.accountant.epsilon` (RDP, Poisson sampling of its
examples); the driver reports each round's ε and the composition of all its rounds so far — FedLess reports only
the former, so its ε is the cost of one round, not of the run.

A release travels with the update it produced (its metadata, :func:`release_extra`), so the driver accounts the
updates that are in the store — also after a restart, when the client functions' reports of the round are gone.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field

from gradshard.errors import GradshardError, PrivacyError
from gradshard.format.keys import check_client_id
from gradshard.privacy.accountant import Release
from gradshard.privacy.dpsgd import release_epsilon
from gradshard.store import Store

LEDGER_PREFIX = "privacy/clients/"

#: The update metadata keys that carry a client DP-SGD release (``gradshard.x.<key>`` in the update's header).
RELEASE_EXTRA = ("dp_noise_multiplier", "dp_sample_rate", "dp_steps", "dp_delta")


def ledger_key(client: str) -> str:
    return f"{LEDGER_PREFIX}{check_client_id(client)}.json"


def release_extra(release: Release, delta: float) -> dict[str, str]:
    """A release as update metadata (``repr`` of the floats, which reads back exactly)."""
    return dict(zip(RELEASE_EXTRA, (repr(release.noise_multiplier), repr(release.sample_rate), str(release.steps),
                                    repr(delta)), strict=True))


MAX_LEDGER_BYTES = 16 << 20  # ~100 bytes a round: far more rounds than any run has


def release_from_extra(extra: Mapping[str, str]) -> tuple[Release, float] | None:
    """The (release, delta) an update's metadata carries; None for an update trained without client DP."""
    if RELEASE_EXTRA[0] not in extra:
        return None
    try:  # written by the client: a missing or malformed field is refused by name, never a crash
        z, q, steps, delta = (extra[k] for k in RELEASE_EXTRA)
        release = Release(noise_multiplier=float(z), sampler="poisson", sample_rate=float(q), steps=int(steps[:20]))
        value = float(delta)
    except (KeyError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        raise PrivacyError(f"the update's DP-SGD release {({k: extra.get(k, '')[:24] for k in RELEASE_EXTRA})} is "
                           f"malformed: {str(exc).splitlines()[0][:200]}") from None
    if not 0 < value < 1:
        raise PrivacyError(f"the update's DP-SGD delta must be in (0, 1), got {value!r}")
    return release, value


def merged(releases: tuple[Release, ...]) -> tuple[Release, ...]:
    """Releases of the same mechanism (noise multiplier and sampling) as one release of all their steps.

    Exactly the same ε: RDP composes by adding, and a self-composed event of s + t steps is the sum of s and t.
    A client's rounds are nearly always equal, so this keeps composing T rounds as cheap as composing one
    (dp-accounting computes every event's RDP curve again, ~0.1 s each)."""
    steps: dict[Release, int] = {}
    for r in releases:
        key = r.model_copy(update={"steps": 1})
        steps[key] = steps.get(key, 0) + r.steps
    return tuple(key.model_copy(update={"steps": total}) for key, total in steps.items())


@functools.lru_cache(maxsize=4096)
def _cached_epsilon(releases: tuple[Release, ...], delta: float) -> float:
    return release_epsilon(releases, delta)


def composed_epsilon(releases: tuple[Release, ...], delta: float) -> float:
    """ε at ``delta`` of ``releases`` composed (merged first, and memoised: clients with as many examples have the
    same releases)."""
    return _cached_epsilon(merged(releases), delta)


def predicted_release(noise_multiplier: float, examples: int, batch_size: int, epochs: int) -> Release:
    """The release a client with ``examples`` examples makes in one round (what Opacus's Poisson loader does:
    q = 1 / ⌈n / batch_size⌉ and ⌈n / batch_size⌉ steps an epoch)."""
    batches = max(1, math.ceil(examples / batch_size))
    return Release(noise_multiplier=noise_multiplier, sampler="poisson", sample_rate=1 / batches,
                   steps=epochs * batches)


class RoundEntry(BaseModel):
    """One round's release of a client and its ε alone."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    release: Release
    epsilon: float


class ClientLedger(BaseModel):
    """A client's releases by round (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    client: str
    delta: float = Field(gt=0, lt=1)
    rounds: dict[int, RoundEntry] = Field(default_factory=dict)
    excluded: dict[int, str] = Field(default_factory=dict, description="rounds the budget kept the client out of")
    epsilon: float = Field(default=0.0, description="all recorded rounds composed")

    def releases(self, through: int | None = None) -> list[Release]:
        """The releases of rounds ``<= through`` (all of them for None), in round order."""
        return [e.release for r, e in sorted(self.rounds.items()) if through is None or r <= through]

    def composed(self, through: int | None = None, extra: tuple[Release, ...] = ()) -> float:
        """ε at ``delta`` of the rounds ``<= through`` and ``extra`` composed."""
        return composed_epsilon((*self.releases(through), *extra), self.delta)


def load_ledger(store: Store, client: str, delta: float) -> ClientLedger:
    """The client's ledger, or an empty one."""
    key = ledger_key(client)
    if not store.exists(key):
        return ClientLedger(client=client, delta=delta)
    if store.size(key) > MAX_LEDGER_BYTES:
        raise PrivacyError(f"the privacy ledger {key!r} is larger than {MAX_LEDGER_BYTES} bytes: not one we wrote")
    try:
        return ClientLedger.model_validate_json(store.get(key))
    except ValueError as exc:
        raise PrivacyError(f"the privacy ledger {key!r} is not valid: {str(exc).splitlines()[0][:200]}") from None


def save_ledger(store: Store, ledger: ClientLedger) -> None:
    store.put(ledger_key(ledger.client), ledger.model_dump_json(indent=1).encode())


def record_release(store: Store, client: str, r: int, release: Release, delta: float) -> ClientLedger:
    """Record (or re-record: idempotent) the client's release of round ``r`` and recompose its ε."""
    ledger = load_ledger(store, client, delta)
    if ledger.delta != delta:
        raise GradshardError(f"client {client}: its privacy ledger ({ledger_key(client)}) accounts at delta = "
                             f"{ledger.delta}, not {delta}; use a new store")
    ledger.rounds[r] = RoundEntry(release=release, epsilon=composed_epsilon((release,), delta))
    ledger.epsilon = ledger.composed()
    save_ledger(store, ledger)
    return ledger


def record_exclusion(store: Store, client: str, r: int, why: str, delta: float) -> None:
    ledger = load_ledger(store, client, delta)
    ledger.excluded[r] = why
    save_ledger(store, ledger)


def all_ledgers(store: Store) -> list[ClientLedger]:
    """Every client's ledger (one small object per client that ever trained privately or was excluded)."""
    return [ClientLedger.model_validate_json(store.get(key)) for key in sorted(store.list(LEDGER_PREFIX))
            if key.endswith(".json")]


class ClientPrivacyRound(BaseModel):
    """A round's client DP accounting, as the round metrics report it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    delta: float
    round_epsilon: dict[str, float] = Field(description="each participating client: this round's ε alone")
    epsilon: dict[str, float] = Field(description="each participating client: its rounds so far composed")
    max_epsilon: float = Field(description="the largest composed ε of any client so far")
    excluded: dict[str, str] = Field(default_factory=dict, description="clients the budget kept out, and why")


def round_summary(store: Store, r: int, delta: float, participants: list[str]) -> ClientPrivacyRound:
    """Round ``r``'s accounting from the ledgers: the participants' round and composed ε (rounds ``<= r``), the
    max composed ε over every client, and the clients excluded from this round."""
    ledgers = {ledger.client: ledger for ledger in all_ledgers(store)}
    round_eps, composed = {}, {}
    for client in participants:
        ledger = ledgers.get(client)
        if ledger is not None and r in ledger.rounds:
            round_eps[client] = ledger.rounds[r].epsilon
            composed[client] = ledger.epsilon if max(ledger.rounds) == r else ledger.composed(through=r)
    excluded = {c: ledger.excluded[r] for c, ledger in ledgers.items() if r in ledger.excluded}
    most = max((ledger.composed(through=r) if ledger.rounds and max(ledger.rounds) > r else ledger.epsilon
                for ledger in ledgers.values()), default=0.0)
    return ClientPrivacyRound(delta=delta, round_epsilon=round_eps, epsilon=composed, max_epsilon=most,
                              excluded=excluded)
