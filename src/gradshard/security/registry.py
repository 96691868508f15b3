"""The registry of client public keys, kept in the object store.

Layout (one object per fact, so concurrent writers never overwrite each other's)::

    security/keys/<client>/<fingerprint>.json   KeyRecord: {client, fingerprint, public_key (base64), registered_at}
    security/revoked/<fingerprint>.json         Revocation: {fingerprint, client, reason, revoked_at}

Revocation is by key, not by name: a client whose key leaked registers a new key and goes on, while the revoked
key stays revoked forever — a record of it written again later (by anyone) changes nothing, because every lookup
checks ``security/revoked/`` first. (NVFlare's revocation is a deny-list of names: it bans a client, not a key.)

Every stored object is hostile until checked: its size is bounded before it is read, it is parsed strictly by
pydantic, and the fingerprint is recomputed from the stored public key and compared with both the record and the
object's key. The registry's trust rests on who may write the store's ``security/`` prefix.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import logging

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gradshard.errors import KeyRejectedError, ObjectNotFoundError, SecurityError, UpdateError
from gradshard.format.keys import check_client_id
from gradshard.security.keys import PublicKey, check_fingerprint, fingerprint, parse_public_key, public_b64
from gradshard.store import Store

log = logging.getLogger(__name__)

KEYS_PREFIX = "security/keys/"
REVOKED_PREFIX = "security/revoked/"
MAX_RECORD_BYTES = 4096
MAX_REASON_CHARS = 500


def key_record_key(client: str, fp: str) -> str:
    return f"{KEYS_PREFIX}{check_client_id(client)}/{check_fingerprint(fp)}.json"


def revocation_key(fp: str) -> str:
    return f"{REVOKED_PREFIX}{check_fingerprint(fp)}.json"


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class KeyRecord(BaseModel):
    """One registered public key of one client."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    client: str = Field(min_length=1, max_length=128)
    fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    public_key: str = Field(min_length=44, max_length=44, description="base64 of the raw 32-byte Ed25519 key")
    registered_at: str = Field(max_length=40)

    def key(self) -> PublicKey:
        return parse_public_key(self.public_key, f"the registered key {self.fingerprint[:12]}")


class Revocation(BaseModel):
    """A revoked key: once written, it stays revoked."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    client: str = Field(max_length=128, description="the client it was registered for ('' if none)")
    reason: str = Field(min_length=1, max_length=MAX_REASON_CHARS)
    revoked_at: str = Field(max_length=40)

    @property
    def date(self) -> str:
        return self.revoked_at[:10]


def _read_record(store: Store, key: str) -> bytes:
    """An object of the registry, refused before reading when over :data:`MAX_RECORD_BYTES`."""
    size = store.size(key)
    if size > MAX_RECORD_BYTES:
        raise SecurityError(f"registry object {key} is {size:,} bytes, over the {MAX_RECORD_BYTES:,} a record may "
                            "have: it was not written by gradshard; delete it")
    raw = store.get(key)
    if len(raw) > MAX_RECORD_BYTES:
        raise SecurityError(f"registry object {key} grew over {MAX_RECORD_BYTES:,} bytes while it was read")
    return raw


def _validate(model: type[KeyRecord] | type[Revocation], key: str, raw: bytes) -> KeyRecord | Revocation:
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(object)'}: {e['msg']}" for e in exc.errors()[:3])
        raise SecurityError(f"registry object {key} is not a valid {model.__name__}: {problems}") from None


def load_key_record(store: Store, key: str) -> KeyRecord:
    """Read and check one key record: its fingerprint is recomputed from its public key and must match both the
    record and the object's key, and the client must match the object's key."""
    record = _validate(KeyRecord, key, _read_record(store, key))
    assert isinstance(record, KeyRecord)
    try:
        raw = base64.b64decode(record.public_key, validate=True)
    except (binascii.Error, ValueError):
        raise SecurityError(f"registry object {key}: public_key is not base64") from None
    computed = fingerprint(raw)
    named = key.removeprefix(KEYS_PREFIX).removesuffix(".json")
    if computed != record.fingerprint or named != f"{record.client}/{record.fingerprint}":
        raise SecurityError(f"registry object {key}: fingerprint mismatch (the stored public key hashes to "
                            f"{computed[:12]}, the record says {record.fingerprint[:12]} for client "
                            f"{record.client!r}): the record was altered; delete it and register the key again")
    return record


def load_revocation(store: Store, key: str) -> Revocation:
    revocation = _validate(Revocation, key, _read_record(store, key))
    assert isinstance(revocation, Revocation)
    if key != revocation_key(revocation.fingerprint):
        raise SecurityError(f"registry object {key} revokes {revocation.fingerprint[:12]}, not the key it is filed "
                            "under")
    return revocation


class KeyRegistry:
    """Client public keys and revocations in ``store`` (see the module docstring for the layout)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # --- writing ---------------------------------------------------------------------------------------------------
    def register(self, client: str, public_key: PublicKey) -> KeyRecord:
        """Register ``public_key`` for ``client``; idempotent. Refused for a revoked key (it stays revoked) and for
        a key registered to another client (one key, one identity)."""
        try:
            check_client_id(client)
        except UpdateError as exc:
            raise SecurityError(f"cannot register a key for {client[:80]!r}: {exc.reason}") from None
        fp = fingerprint(public_key)
        revoked = self.revocation(fp)
        if revoked is not None:
            raise KeyRejectedError(f"key {fp[:12]} was revoked on {revoked.date} ({revoked.reason}); a revoked key "
                                   "stays revoked: generate a new one (gradshard keys new)")
        owner = self._owner(fp)
        if owner is not None and owner != client:
            raise KeyRejectedError(f"key {fp[:12]} is already registered for client {owner!r}; a key names one "
                                   "client: generate a new one")
        key = key_record_key(client, fp)
        if owner == client:
            return load_key_record(self.store, key)
        record = KeyRecord(client=client, fingerprint=fp, public_key=public_b64(public_key), registered_at=_now())
        self.store.put(key, record.model_dump_json().encode())
        return record

    def revoke(self, fp: str, reason: str) -> Revocation:
        """Revoke the key ``fp`` for good. The first revocation stands (a second returns it unchanged); a key nobody
        registered may be revoked in advance (a key known to have leaked)."""
        check_fingerprint(fp)
        reason = reason.strip()
        if not reason or len(reason) > MAX_REASON_CHARS:
            raise SecurityError(f"a revocation needs a reason of 1-{MAX_REASON_CHARS} characters")
        existing = self.revocation(fp)
        if existing is not None:
            return existing
        revocation = Revocation(fingerprint=fp, client=self._owner(fp) or "", reason=reason, revoked_at=_now())
        self.store.put(revocation_key(fp), revocation.model_dump_json().encode())
        return revocation

    # --- reading ---------------------------------------------------------------------------------------------------
    def revocation(self, fp: str) -> Revocation | None:
        """The revocation of ``fp``, or None. A revocation object that cannot be read raises (fail closed)."""
        key = revocation_key(fp)
        try:
            return load_revocation(self.store, key)
        except ObjectNotFoundError:
            return None

    def _owner(self, fp: str) -> str | None:
        """The client ``fp`` is filed under (a listing: used on registration and on failed lookups only)."""
        for key in self.store.list(KEYS_PREFIX):
            if key.endswith(f"/{fp}.json"):
                return key.removeprefix(KEYS_PREFIX).split("/", 1)[0]
        return None

    def records(self) -> tuple[list[KeyRecord], dict[str, str]]:
        """Every valid key record, and for every object that is not one, why (``key -> problem``)."""
        records, problems = [], {}
        for key in self.store.list(KEYS_PREFIX):
            try:
                records.append(load_key_record(self.store, key))
            except (SecurityError, ObjectNotFoundError) as exc:
                problems[key] = str(exc)
        return records, problems

    def revocations(self) -> tuple[list[Revocation], dict[str, str]]:
        """Every valid revocation, and for every object that is not one, why."""
        revocations, problems = [], {}
        for key in self.store.list(REVOKED_PREFIX):
            try:
                revocations.append(load_revocation(self.store, key))
            except (SecurityError, ObjectNotFoundError) as exc:
                problems[key] = str(exc)
        return revocations, problems

    def lookup(self, client: str, fp: str) -> PublicKey:
        """The public key ``fp`` if it is registered for ``client`` and not revoked; else :class:`KeyRejectedError`
        whose reason says which: ``key <fp12> revoked on <date>: <reason>``, ``signed by unregistered key
        <fp12>``, ``key <fp12> is registered for client <other>``, or an unreadable record."""
        short = fp[:12]
        try:
            check_fingerprint(fp)
            revoked = self.revocation(fp)
        except SecurityError as exc:
            raise KeyRejectedError(f"key {short}: {exc}") from None
        if revoked is not None:
            raise KeyRejectedError(f"key {short} revoked on {revoked.date}: {revoked.reason}")
        try:
            return load_key_record(self.store, key_record_key(client, fp)).key()
        except ObjectNotFoundError:
            pass
        except SecurityError as exc:
            raise KeyRejectedError(f"key {short}: {exc}") from None
        owner = self._owner(fp)
        if owner is not None:
            raise KeyRejectedError(f"signed by key {short}, which is registered for client {owner!r}, not {client!r}")
        raise KeyRejectedError(f"signed by unregistered key {short}")
