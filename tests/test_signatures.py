"""Issue 13: client identity and signed updates — every forged, altered, replayed, unsigned, unregistered or revoked
update is rejected by name with its reason, and the round completes with the honest clients, bit for bit."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given, settings
from hypothesis import strategies as st

from gradshard import AggregateConfig, InlineExecutor, MemoryStore, ModelLayout, TensorSpec, aggregate_round
from gradshard.aggregation.contracts import ShardReduceArgs
from gradshard.core.reduce import fedavg, fedavg_weights
from gradshard.errors import KeyRejectedError, RoundError, SecurityError, SignatureError, UpdateError
from gradshard.format.keys import aggregate_key, update_key
from gradshard.format.round import RoundSpec, open_round, prepare_round
from gradshard.format.update import HEADER_DIGEST_KEY, SIGNATURE_KEY, SIGNER_KEY, UpdateMeta, header_digest, read_flat
from gradshard.format.writer import update_metadata, write_update
from gradshard.security import keys
from gradshard.security.keys import PrivateKey
from gradshard.security.registry import KeyRegistry, key_record_key
from gradshard.security.signing import DOMAIN, sign_update_meta, signed_message, verify

LAYOUT = ModelLayout([TensorSpec("w", (40, 10), "float32")])
CHUNK = 16  # 25 chunks
BASE = "ab" * 32
OTHER_BASE = "cd" * 32
SIGNED = AggregateConfig(shards=4, require_signatures=True)


def values_of(client: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(client.encode()).digest()[:4], "little")
    return np.random.default_rng(seed).standard_normal(LAYOUT.numel).astype(np.float32)


def examples_of(client: str) -> int:
    return 1 + sum(client.encode()) % 9


def open_signed_round(store: MemoryStore, r: int = 0, digest: str = "blake3") -> None:
    open_round(store, RoundSpec.create(r, LAYOUT, chunk_elems=CHUNK, digest=digest,  # type: ignore[arg-type]
                                       base_model=BASE))


def put_update(store: MemoryStore, client: str, key: PrivateKey | None, *, r: int = 0, base: str = BASE,
               filed_as: str | None = None, filed_round: int | None = None) -> str:
    """Write ``client``'s update for round ``r`` (signed with ``key``), filed under ``filed_as`` in
    ``filed_round`` (default: the same)."""
    target = update_key(r if filed_round is None else filed_round, filed_as or client)
    write_update(store, target, LAYOUT, values_of(client), UpdateMeta(
        client=filed_as or client, round=r, examples=examples_of(client), layout_digest=LAYOUT.digest(),
        chunk_elems=CHUNK, base_model=base, digest="blake3"), signer=key)
    return target


def rewrite_header(store: MemoryStore, key: str, edit: Callable[[dict[str, str]], None], *,
                   redigest: bool = True) -> None:
    """Change the metadata of a stored object as an attacker would: edit it, recompute the header digest (or not),
    keep the data section."""
    blob = store.get(key)
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    edit(header["__metadata__"])
    if redigest:
        header["__metadata__"][HEADER_DIGEST_KEY] = header_digest(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    store.put(key, struct.pack("<Q", len(text)) + text + blob[8 + n :])


def honest_round(clients: list[str], r: int = 0) -> tuple[MemoryStore, dict[str, PrivateKey]]:
    store = MemoryStore()
    open_signed_round(store, r)
    registry = KeyRegistry(store)
    signers = {}
    for client in clients:
        signers[client] = keys.generate()
        registry.register(client, signers[client].public_key())
        put_update(store, client, signers[client], r=r)
    return store, signers


def reference_sha256(clients: list[str]) -> str:
    """The aggregate of ``clients`` alone, derived independently: unsigned updates, signatures not required, the
    flat single-aggregator topology."""
    store = MemoryStore()
    open_signed_round(store)
    for client in clients:
        put_update(store, client, None)
    aggregate_round(store, 0, InlineExecutor(), AggregateConfig(topology="flat"))
    return hashlib.sha256(store.get(aggregate_key(0))).hexdigest()


def published_sha256(store: MemoryStore) -> str:
    return hashlib.sha256(store.get(aggregate_key(0))).hexdigest()


HONEST = ["c0", "c1", "c2"]


def test_a_signed_round_accepts_registered_signers_and_records_them() -> None:
    # Prepare
    store, signers = honest_round(HONEST)

    # Execute
    result = aggregate_round(store, 0, InlineExecutor(), SIGNED)

    # Assert: all accepted, each with its signer's fingerprint, the aggregate equal to the unsigned flat reference
    assert result.manifest.rejected == {}
    assert {c.client: c.signer for c in result.manifest.clients} == {c: keys.fingerprint(k)
                                                                      for c, k in signers.items()}
    assert published_sha256(store) == reference_sha256(HONEST)
    expected = fedavg([values_of(c) for c in HONEST], fedavg_weights([examples_of(c) for c in HONEST]))
    np.testing.assert_array_equal(read_flat(store, aggregate_key(0), LAYOUT), expected)


def test_every_bad_update_is_rejected_with_its_reason_and_the_round_completes_with_the_honest_clients() -> None:
    # Prepare: three honest clients and one of every attack, each under its own client id
    store, signers = honest_round(HONEST)
    registry = KeyRegistry(store)
    for client in ["forged", "tampered", "tampered-nodigest", "replay-round", "replay-round-edited",
                   "replay-base", "unsigned", "wrong-owner", "revoked"]:
        signers[client] = keys.generate()
        registry.register(client, signers[client].public_key())
    # forged: signed by another (registered) key, the signer field then set to the victim's key
    forged = put_update(store, "forged", signers["c0"], filed_as="forged")
    rewrite_header(store, forged, lambda md: md.update({SIGNER_KEY: keys.fingerprint(signers["forged"])}))
    # tampered header: examples raised, header digest recomputed (the signature cannot be)
    tampered = put_update(store, "tampered", signers["tampered"])
    rewrite_header(store, tampered, lambda md: md.update({"gradshard.examples": "900"}))
    nodigest = put_update(store, "tampered-nodigest", signers["tampered-nodigest"])
    rewrite_header(store, nodigest, lambda md: md.update({"gradshard.examples": "900"}), redigest=False)
    # replays: an honestly signed update of round 1 copied into round 0 (as it is, and with its round edited);
    # one trained from another base model
    put_update(store, "replay-round", signers["replay-round"], r=1, filed_round=0)
    edited = put_update(store, "replay-round-edited", signers["replay-round-edited"], r=1, filed_round=0)
    rewrite_header(store, edited, lambda md: md.update({"gradshard.round": "0"}))
    put_update(store, "replay-base", signers["replay-base"], base=OTHER_BASE)
    put_update(store, "unsigned", None)
    unregistered = keys.generate()
    put_update(store, "unregistered", unregistered)
    put_update(store, "wrong-owner", signers["c1"])  # c1's registered key signing for another client
    put_update(store, "revoked", signers["revoked"])
    revocation = registry.revoke(keys.fingerprint(signers["revoked"]), "laptop stolen")

    # Execute
    result = aggregate_round(store, 0, InlineExecutor(), SIGNED)

    # Assert: each named with its reason; the aggregate is the honest clients' alone, bit for bit
    rejected = result.manifest.rejected
    fp = {c: keys.fingerprint(k)[:12] for c, k in signers.items()}
    assert rejected["forged"] == "signature does not verify (forged or altered)"
    assert rejected["tampered"] == "signature does not verify (forged or altered)"
    assert rejected["tampered-nodigest"].startswith("header digest mismatch")
    assert rejected["replay-round"] == "update is for round 1, this is round 0"
    assert rejected["replay-round-edited"] == "signature does not verify (forged or altered)"
    assert rejected["replay-base"].startswith(f"update was trained from base model {OTHER_BASE[:12]}")
    assert rejected["unsigned"].startswith("unsigned")
    assert rejected["unregistered"] == f"signed by unregistered key {keys.fingerprint(unregistered)[:12]}"
    assert rejected["wrong-owner"] == (f"signed by key {fp['c1']}, which is registered for client 'c1', not "
                                       "'wrong-owner'")
    assert rejected["revoked"] == f"key {fp['revoked']} revoked on {revocation.date}: laptop stolen"
    assert len(rejected) == 10
    assert [c.client for c in result.manifest.clients] == HONEST
    assert published_sha256(store) == reference_sha256(HONEST)


def test_revoking_a_key_gives_bit_for_bit_the_aggregate_of_the_round_without_it() -> None:
    # Prepare: the same four clients; in one store c3's key is revoked, the other never had c3
    with_k, signers = honest_round([*HONEST, "c3"])
    KeyRegistry(with_k).revoke(keys.fingerprint(signers["c3"]), "compromised")
    without_k, _ = honest_round(HONEST)

    # Execute
    revoked = aggregate_round(with_k, 0, InlineExecutor(), SIGNED)
    aggregate_round(without_k, 0, InlineExecutor(), SIGNED)

    # Assert
    assert list(revoked.manifest.rejected) == ["c3"]
    assert published_sha256(with_k) == published_sha256(without_k) == reference_sha256(HONEST)


def test_a_revoked_key_stays_revoked_even_if_registered_again() -> None:
    store, signers = honest_round(["c0"])
    registry = KeyRegistry(store)
    fp = keys.fingerprint(signers["c0"])
    registry.revoke(fp, "lost")
    with pytest.raises(KeyRejectedError, match="stays revoked"):
        registry.register("c0", signers["c0"].public_key())
    # a record written again behind the registry's back (or by a concurrent writer) changes nothing
    store.put(key_record_key("c0", fp), json.dumps({"client": "c0", "fingerprint": fp, "public_key":
                                                    keys.public_b64(signers["c0"]),
                                                    "registered_at": "2030-01-01T00:00:00+00:00"}).encode())
    with pytest.raises(KeyRejectedError, match=f"key {fp[:12]} revoked on .*: lost"):
        registry.lookup("c0", fp)
    assert registry.revoke(fp, "another reason").reason == "lost"  # the first revocation stands
    # the client registers a new key and goes on
    fresh = keys.generate()
    registry.register("c0", fresh.public_key())
    assert keys.public_bytes(registry.lookup("c0", keys.fingerprint(fresh))) == keys.public_bytes(fresh)


def test_one_flipped_byte_in_one_chunk_fails_only_the_shards_covering_it_and_costs_one_rerun() -> None:
    # Prepare: c1's data altered in chunk 13 (the header, and so its signature, untouched)
    clients = [*HONEST, "c3"]
    store, _ = honest_round(clients)
    chunk = 13
    blob = bytearray(store.get(update_key(0, "c1")))
    blob[len(blob) - 4 * (LAYOUT.numel - chunk * CHUNK - 3)] ^= 0x01
    store.put(update_key(0, "c1"), bytes(blob))
    assert prepare_round(store, 0, require_signatures=True).clients[1].signer is not None  # still verifies

    # Execute
    result = aggregate_round(store, 0, InlineExecutor(), SIGNED)

    # Assert: in the first run only the invocations whose range covers the chunk reported c1; one rerun without it
    ranges = {inv.id: inv.args for inv in result.plan.invocations if isinstance(inv.args, ShardReduceArgs)}
    first, second = result.all_reports[: len(ranges)], result.all_reports[len(ranges) :]
    covering = {i for i, a in ranges.items() if a.start <= chunk * CHUNK < a.stop}
    assert len(covering) == 1
    assert {r.invocation for r in first if r.bad_updates} == covering
    assert all(set(r.bad_updates) == {"c1"} and "checksum mismatch in chunk 13" in r.bad_updates["c1"]
               for r in first if r.bad_updates)
    assert result.runs == 2 and len(second) == len(ranges) and all(r.ok for r in second)
    assert "c1" in result.manifest.rejected and "c1" not in [c.client for c in result.manifest.clients]
    with open_aggregate(store) as agg:
        assert agg.meta.extra["clients"] == "c0,c2,c3"
    assert published_sha256(store) == reference_sha256(["c0", "c2", "c3"])


def open_aggregate(store: MemoryStore) -> Any:
    from gradshard.format.update import open_update

    return open_update(store, aggregate_key(0), "aggregate", LAYOUT)


def test_signing_and_accepting_xxh3_digests_is_refused() -> None:
    key = keys.generate()
    store = MemoryStore()
    meta = UpdateMeta(client="c0", round=0, examples=1, layout_digest=LAYOUT.digest(), chunk_elems=CHUNK)
    with pytest.raises(SignatureError, match="xxh3 detects accidents and authenticates nothing"):
        write_update(store, update_key(0, "c0"), LAYOUT, values_of("c0"), meta, signer=key)
    assert store.list() == []  # nothing was begun
    with pytest.raises(SignatureError, match="authenticates nothing"):
        sign_update_meta(meta.with_checksums(["0" * 16] * 25), "0" * 64, key)
    with pytest.raises(SignatureError, match="authenticates nothing"):
        verify(meta.with_checksums(["0" * 16] * 25), "0" * 64, "0" * 128, key.public_key())
    # a round that requires signatures over xxh3 digests fails as a whole
    open_signed_round(store, digest="xxh3_64")
    put_update_xxh3 = UpdateMeta(client="c0", round=0, examples=1, layout_digest=LAYOUT.digest(), chunk_elems=CHUNK)
    write_update(store, update_key(0, "c0"), LAYOUT, values_of("c0"), put_update_xxh3)
    with pytest.raises(RoundError, match="requires signatures but its chunk digest is xxh3_64"):
        aggregate_round(store, 0, InlineExecutor(), SIGNED)


def test_signed_files_open_with_the_plain_safetensors_library() -> None:
    store, signers = honest_round(["c0"])
    blob = store.get(update_key(0, "c0"))
    np.testing.assert_array_equal(safetensors.numpy.load(blob)["w"].reshape(-1), values_of("c0"))
    (n,) = struct.unpack("<Q", blob[:8])
    md = json.loads(blob[8 : 8 + n])["__metadata__"]
    assert md[SIGNER_KEY] == keys.fingerprint(signers["c0"])
    assert len(md[SIGNATURE_KEY]) == 128


def test_update_metadata_signs_files_the_plain_safetensors_library_writes() -> None:
    store = MemoryStore()
    open_signed_round(store)
    key = keys.generate()
    KeyRegistry(store).register("c0", key.public_key())
    tensors = LAYOUT.unflatten(values_of("c0"))
    md = update_metadata(LAYOUT, tensors, client="c0", round=0, examples=3, base_model=BASE, chunk_elems=CHUNK,
                         digest="sha256", signer=key)
    open_round(store, RoundSpec.create(0, LAYOUT, chunk_elems=CHUNK, digest="sha256", base_model=BASE))
    store.put(update_key(0, "c0"), safetensors.numpy.save(tensors, metadata=md))
    manifest = prepare_round(store, 0, require_signatures=True)
    assert manifest.rejected == {} and manifest.clients[0].signer == keys.fingerprint(key)


def test_signatures_are_ignored_unless_required() -> None:
    store, signers = honest_round(["c0", "c1"])
    KeyRegistry(store).revoke(keys.fingerprint(signers["c1"]), "lost")
    put_update(store, "c2", None)
    manifest = prepare_round(store, 0)  # not required: neither checked nor recorded
    assert manifest.rejected == {} and all(c.signer is None for c in manifest.clients)


def test_a_signature_without_a_signer_or_of_the_wrong_width_is_refused_structurally() -> None:
    store, _ = honest_round(["c0"])
    key = update_key(0, "c0")
    rewrite_header(store, key, lambda md: md.pop(SIGNER_KEY))
    with pytest.raises(UpdateError, match="signer or a signature but not both"):
        read_flat(store, key, LAYOUT, "c0")
    rewrite_header(store, key, lambda md: md.update({SIGNER_KEY: "AB" * 32}))
    with pytest.raises(UpdateError, match="64 lowercase hex digits"):
        read_flat(store, key, LAYOUT, "c0")


def test_unsigned_updates_are_byte_for_byte_unchanged_by_the_signature_fields() -> None:
    # the header digest leaves the signature out as it leaves itself out: an unsigned header digests as before
    meta = UpdateMeta(client="c0", round=0, examples=1, layout_digest=LAYOUT.digest(), chunk_elems=CHUNK)
    header = {"__metadata__": meta.to_metadata(), "w": {"dtype": "F32", "shape": [40, 10],
                                                        "data_offsets": [0, 1600]}}
    before = header_digest(header)
    header["__metadata__"][SIGNATURE_KEY] = "0" * 128
    assert header_digest(header) == before
    assert SIGNER_KEY not in meta.to_metadata() and SIGNATURE_KEY not in meta.to_metadata()


FIELDS = st.sampled_from(["round", "client", "examples", "base_model", "layout_digest", "chunk_elems",
                          "checksums", "digest"])


@settings(max_examples=40, deadline=None)
@given(field=FIELDS, seed=st.integers(0, 2**32 - 1))
def test_changing_any_signed_field_breaks_the_signature(field: str, seed: int) -> None:
    # Prepare: a signed metadata and the same with one field changed
    import dataclasses

    rng = np.random.default_rng(seed)
    key = keys.generate()
    hexes = [bytes(rng.integers(0, 256, 32, dtype=np.uint8)).hex() for _ in range(4)]
    meta = UpdateMeta(client="c0", round=int(rng.integers(0, 100)), examples=int(rng.integers(1, 1000)),
                      layout_digest="aa" * 32, chunk_elems=100, base_model="bb" * 32, digest="blake3",
                      checksums="".join(hexes))
    digest = "cc" * 32
    signature = sign_update_meta(meta, digest, key)
    changes: dict[str, Any] = {"round": meta.round + 1, "client": "c1", "examples": meta.examples + 1,
                               "base_model": "dd" * 32, "layout_digest": "ee" * 32, "chunk_elems": 101,
                               "checksums": "".join([hexes[1], hexes[0], *hexes[2:]]), "digest": "sha256"}
    altered = dataclasses.replace(meta, **{field: changes[field]})

    # Execute / Assert
    verify(meta, digest, signature, key.public_key())
    assert signed_message(altered, digest, keys.fingerprint(key)).startswith(DOMAIN)
    with pytest.raises(SignatureError, match="does not verify"):
        verify(altered, digest, signature, key.public_key())
    with pytest.raises(SignatureError, match="does not verify"):
        verify(meta, "cd" * 32, signature, key.public_key())


def test_hostile_registry_objects_are_refused_with_a_message() -> None:
    store, signers = honest_round(["c0"])
    registry = KeyRegistry(store)
    fp = keys.fingerprint(signers["c0"])
    record = key_record_key("c0", fp)
    good = store.get(record)
    store.put(record, b"{" * 5000)
    with pytest.raises(KeyRejectedError, match="over the 4,096 a record may have"):
        registry.lookup("c0", fp)
    other = keys.public_b64(keys.generate())
    store.put(record, good.replace(keys.public_b64(signers["c0"]).encode(), other.encode()))
    with pytest.raises(KeyRejectedError, match="fingerprint mismatch"):
        registry.lookup("c0", fp)
    store.put(record, b'{"client": "c0"}')
    with pytest.raises(KeyRejectedError, match="not a valid KeyRecord"):
        registry.lookup("c0", fp)
    store.put(f"security/revoked/{fp}.json", b"not json")
    with pytest.raises(KeyRejectedError, match="not a valid Revocation"):  # fail closed
        registry.lookup("c0", fp)
    with pytest.raises(SecurityError, match="not a key fingerprint"):
        registry.revoke("nothex", "x")
