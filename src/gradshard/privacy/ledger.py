"""The privacy ledger: every central-DP release of a run, kept in the store, counted exactly once.

One object per release, ``privacy/central/<round>-<noise key id>.json``, written before the round's noise is
drawn. The key id is a hash of the round's noise key, so rerunning a round after a crash with the same key (a key
file) finds its entry and counts nothing new — the rerun releases the same bytes — while a rerun with another key
(a fresh per-process key) is another release and is counted as one. A release that would take ε past
``max_epsilon`` is refused (:class:`PrivacyBudgetError`) before anything is written or drawn.
"""

from __future__ import annotations

import hashlib
import logging
import re

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gradshard.errors import PrivacyBudgetError, PrivacyError
from gradshard.privacy.accountant import Release, epsilon
from gradshard.store import Store

log = logging.getLogger(__name__)
LEDGER_PREFIX = "privacy/central/"
MAX_ENTRY_BYTES = 4096
_NAME = re.compile(r"^(\d{6,})-([0-9a-f]{16})\.json$")


class LedgerEntry(BaseModel):
    """One release: its round, the accountant's description of it and which noise key drew it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    round: int = Field(ge=0)
    key_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    release: Release

    @property
    def key(self) -> str:
        return f"{LEDGER_PREFIX}{self.round:06d}-{self.key_id}.json"


def key_id(round_key: str) -> str:
    """A public id of a round's noise key (it reveals nothing of the key)."""
    return hashlib.sha256(b"gradshard-noise-key-id\x00" + bytes.fromhex(round_key)).hexdigest()[:16]


class PrivacyLedger:
    """The releases recorded in ``store`` under :data:`LEDGER_PREFIX`."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def entries(self) -> list[LedgerEntry]:
        """Every recorded release, by round; an entry that is not one (wrong name, size or content) is an error:
        the ledger must not silently lose a release."""
        out = []
        for key in self.store.list(LEDGER_PREFIX):
            name = key[len(LEDGER_PREFIX) :]
            if _NAME.match(name) is None:
                raise PrivacyError(f"the privacy ledger holds {key!r}, which is not a ledger entry; remove it")
            if self.store.size(key) > MAX_ENTRY_BYTES:
                raise PrivacyError(f"ledger entry {key!r} is larger than {MAX_ENTRY_BYTES} bytes")
            try:
                entry = LedgerEntry.model_validate_json(self.store.get(key))
            except ValidationError as exc:
                raise PrivacyError(f"ledger entry {key!r} is not valid: {exc.errors()[0]['msg']}") from None
            if entry.key != key:
                raise PrivacyError(f"ledger entry {key!r} describes round {entry.round}, key {entry.key_id}")
            out.append(entry)
        return sorted(out, key=lambda e: (e.round, e.key_id))

    def epsilon(self, delta: float) -> float:
        return epsilon([e.release for e in self.entries()], delta)

    def would_spend(self, entry: LedgerEntry, delta: float) -> float:
        """ε of the ledger with ``entry`` added (not written); an entry already recorded counts once."""
        entries = [e for e in self.entries() if e.key != entry.key]
        return epsilon([e.release for e in [*entries, entry]], delta)

    def record(self, entry: LedgerEntry, delta: float, max_epsilon: float | None) -> float:
        """Record ``entry`` unless it is there already; returns ε after it. Refuses past ``max_epsilon``."""
        spent = self.would_spend(entry, delta)
        if self.store.exists(entry.key):
            known = LedgerEntry.model_validate_json(self.store.get(entry.key))
            if known != entry:
                raise PrivacyError(f"round {entry.round} was already released with other parameters "
                                   f"({known.release}); it cannot be released again with {entry.release}")
            log.info("round %d: release already in the ledger (a rerun with the same noise key)", entry.round)
            return spent
        check_budget(spent, delta, max_epsilon, entry.round)
        self.store.put(entry.key, entry.model_dump_json().encode())
        return spent


def check_budget(spent: float, delta: float, max_epsilon: float | None, r: int) -> None:
    if max_epsilon is not None and spent > max_epsilon:
        raise PrivacyBudgetError(f"round {r} would take the privacy loss to ε = {spent:.4g} at δ = {delta:g}, past "
                                 f"max_epsilon = {max_epsilon:g}; refused before any noise was drawn")
