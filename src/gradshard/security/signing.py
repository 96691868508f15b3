"""What an update's signature covers, and how it is made and checked (Ed25519).

The signed message is domain-separated bytes: :data:`DOMAIN` followed by the canonical JSON (sorted keys, no
spaces) of::

    {round, client, kind, base_model, layout, examples, digest, chunk_elems, signer, header_digest, checksums}

``checksums`` is the packed digest of every chunk (the ``gradshard.checksums`` string) and ``header_digest`` the
sha256 of the canonical header without the digest and the signature (:func:`gradshard.format.update.header_digest`)
— which covers every other metadata field (coverage, extras) and the tensor table too. So a signature is a
commitment to the whole file: a shard function that checks the chunks of its range against the digest list in the
header (whose bytes the manifest's ``header_sha256`` pins) has checked them against the signed list, without
reading the rest of the file.

Only cryptographic chunk digests (``blake3``, ``sha256``) may back a signature: anyone can make data with a given
xxh3, so a signature over xxh3 digests would sign the header and nothing of the data. Signing and verifying refuse
them.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature

from gradshard.core import digests
from gradshard.errors import SignatureError
from gradshard.format.update import UpdateMeta
from gradshard.security.keys import PrivateKey, PublicKey, fingerprint

if TYPE_CHECKING:
    from gradshard.security.registry import KeyRegistry

DOMAIN = b"gradshard-update-signature-v1\n"
SIGNATURE_HEX = 128  # an Ed25519 signature is 64 bytes
_SIGNATURE = re.compile(r"^[0-9a-f]{128}$")


def require_cryptographic(digest: str, what: str = "a signed update") -> None:
    """Refuse a chunk digest that authenticates nothing (xxh3) where a signature must rest on it."""
    if not digests.algorithm(digest).cryptographic:
        raise SignatureError(f"{what} needs a cryptographic chunk digest (blake3 or sha256), not {digest}: xxh3 "
                             "detects accidents and authenticates nothing (anyone can make data with a given xxh3), "
                             "so a signature over it would not cover the data")


def signed_message(meta: UpdateMeta, header_digest: str, signer: str) -> bytes:
    """The bytes a signature of ``meta`` (with its chunk digests) by key ``signer`` covers."""
    body = {"round": meta.round, "client": meta.client, "kind": meta.kind, "base_model": meta.base_model,
            "layout": meta.layout_digest, "examples": meta.examples, "digest": meta.digest,
            "chunk_elems": meta.chunk_elems, "signer": signer, "header_digest": header_digest,
            "checksums": meta.checksums}
    return DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign_update_meta(meta: UpdateMeta, header_digest: str, key: PrivateKey) -> str:
    """The signature (128 hex digits) of ``meta`` and its header digest by ``key``; refused for xxh3 digests."""
    require_cryptographic(meta.digest, f"signing the update of {meta.client!r}")
    if not meta.checksums:
        raise SignatureError(f"the update of {meta.client!r} has no chunk digests yet: sign it at commit")
    return key.sign(signed_message(meta, header_digest, fingerprint(key))).hex()


def verify(meta: UpdateMeta, header_digest: str, signature: str, key: PublicKey) -> None:
    """Check ``signature`` over ``meta`` and its (verified) header digest with ``key``; :class:`SignatureError`
    otherwise."""
    require_cryptographic(meta.digest, "a signature")
    if not _SIGNATURE.match(signature):
        raise SignatureError("the signature is not 128 lowercase hex digits")
    try:
        key.verify(bytes.fromhex(signature), signed_message(meta, header_digest, fingerprint(key)))
    except InvalidSignature:
        raise SignatureError("signature does not verify (forged or altered)") from None


def verify_signed_update(registry: KeyRegistry, client: str, meta: UpdateMeta, header_digest: str) -> str:
    """Check that ``client``'s update is signed by a key registered for it and not revoked, over its own metadata
    and its verified ``header_digest``; returns the signer's fingerprint.

    Raises :class:`SignatureError` or :class:`~gradshard.errors.KeyRejectedError` whose message is the reason a
    user sees: ``unsigned``, ``signed by unregistered key <fp12>``, ``key <fp12> revoked on <date>: <reason>``,
    ``signature does not verify (forged or altered)``, or the xxh3 refusal."""
    if not meta.signed:
        raise SignatureError("unsigned: this round requires signed updates (write it with "
                             "write_update(..., signer=<the client's private key>))")
    if not header_digest:
        raise SignatureError("signed, but its header carries no verified header digest (format 1): the signature "
                             "would not cover the header")
    require_cryptographic(meta.digest, "a signature")
    verify(meta, header_digest, meta.signature, registry.lookup(client, meta.signer))
    return meta.signer
