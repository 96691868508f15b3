"""Secure aggregation (SecAgg+-style double masking), exact under sharding: the server learns the sum, not an update.

Per round, in canonical client order:

1. **Keys.** Every client makes two X25519 key pairs (one to agree masks, one to encrypt shares) and a 32-byte
   self-mask seed ``bᵢ``; it publishes the public keys (:meth:`SecAggClient.advertise`).
2. **Shares.** Every client splits its mask private key and ``bᵢ`` into Shamir shares (threshold t, over the prime
   field GF(2⁵²¹ − 1)) and sends each peer its shares encrypted with ChaCha20-Poly1305 under a key agreed with that
   peer (X25519 + HKDF-SHA256); the store only relays ciphertexts (:meth:`SecAggClient.share`).
3. **Masked upload.** The update is clipped to ``[−c, c]`` and quantized to fixed point, ``qᵢ = ⌊xᵢ·2^s + u⌋``
   with ``u`` uniform in [0, 1) from a per-element counter stream (stochastic rounding), as uint32 modulo 2³². The
   client uploads ``yᵢ = qᵢ + PRG(bᵢ) + Σ_{j>i} PRG(kᵢⱼ) − Σ_{j<i} PRG(kᵢⱼ)`` (mod 2³²), where ``kᵢⱼ`` is the full
   256-bit key agreed with peer j and PRG is ChaCha20's keystream read as little-endian uint32, so element e's mask
   is keystream word e: a shard function regenerates exactly words ``[lo, hi)``, seeking by ChaCha20's block
   counter (:func:`mask_slice`).
4. **Unmasking.** For the clients that did not upload (dropped after masking) the surviving clients reveal their
   shares of the dropped client's mask key; for the survivors, their shares of ``bᵢ`` — never both for one client
   (:meth:`SecAggClient.reveal`). With t shares of each the server reconstructs them, and every shard subtracts
   ``PRG(bᵢ)`` of each survivor and the pairwise masks survivors shared with dropped clients, element by element.

The sum modulo 2³² is associative, so the unmasked result is the same for every M, window and order. It equals the
plain sum of the survivors' ``qᵢ`` exactly; read as int32 and divided by ``2^s`` it is their float sum to
``N·2^−s`` (while ``|Σ| < 2³¹ / 2^s``). The key agreement, shares and encryption use the ``cryptography`` library;
no step here is left to a bespoke cipher.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from gradshard.core.masks import mask_slice
from gradshard.errors import SecurityError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

PRIME = 2**521 - 1  # a Mersenne prime above every 32-byte secret


def pair_key(shared: bytes, round_: int, low: str, high: str) -> bytes:
    """The 256-bit mask key of a pair from their X25519 secret (HKDF-SHA256; the round and both ids bound)."""
    return _hkdf(shared, f"gradshard secagg mask {round_} {low} {high}")


def _hkdf(secret: bytes, info: str) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info.encode()).derive(secret)


# --- fixed point ----------------------------------------------------------------------------------------------------
def quantize(x: npt.NDArray[np.floating], bits: int, clip: float, key: bytes, weight: float = 1.0
             ) -> npt.NDArray[np.uint32]:
    """``⌊w·clip(x)·2^bits + u⌋`` mod 2³² with ``u`` from the counter stream of ``key`` (stochastic rounding) and
    the client's weight ``w`` in (0, 1] (1: unweighted)."""
    if not np.isfinite(x).all():
        raise SecurityError("cannot quantize NaN or inf (the masked words would hide them from every check)")
    if not 0 < weight <= 1:
        raise SecurityError(f"a client's weight is in (0, 1], got {weight!r}")
    scaled = np.clip(x.astype(np.float64), -clip, clip) * (weight * float(2**bits))
    noise = mask_slice(key, 0, len(x)).astype(np.float64) / 2.0**32  # uniform in [0, 1), one word per element
    return np.floor(scaled + noise).astype(np.int64).astype(np.uint32)


def dequantize(total: npt.NDArray[np.uint32], bits: int) -> npt.NDArray[np.float64]:
    """A sum of quantized values, mod 2³², back to floats (two's complement)."""
    return total.view(np.int32).astype(np.float64) / float(2**bits)


# --- Shamir secret sharing ------------------------------------------------------------------------------------------
def split(secret: bytes, holders: Sequence[int], threshold: int, seed: bytes | None = None) -> dict[int, int]:
    """Shares ``{x: f(x)}`` of a ≤ 32-byte ``secret`` for the nonzero ``holders``; any ``threshold`` recover it.

    The polynomial's other coefficients are random, or with ``seed`` (secret, 32 bytes) drawn from SHAKE-256 of it,
    so a client that keeps no state between its steps can make the same shares again."""
    if not 1 <= threshold <= len(holders):
        raise SecurityError(f"threshold {threshold} needs 1 <= t <= {len(holders)} holders")
    coefficients = [int.from_bytes(secret, "big")] + [
        secrets.randbelow(PRIME) if seed is None
        else int.from_bytes(hashlib.shake_256(seed + k.to_bytes(4, "big")).digest(96), "big") % PRIME
        for k in range(1, threshold)]
    return {x: sum(c * pow(x, k, PRIME) for k, c in enumerate(coefficients)) % PRIME for x in holders}


def combine(shares: Mapping[int, int], threshold: int) -> bytes:
    """The 32-byte secret from at least ``threshold`` shares (Lagrange interpolation at 0)."""
    if len(shares) < threshold:
        raise SecurityError(f"{len(shares)} shares, {threshold} needed to reconstruct")
    points = list(shares.items())[:threshold]
    total = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    if total >= 2**256:
        raise SecurityError("the shares do not reconstruct a 32-byte secret")
    return total.to_bytes(32, "big")


# --- one client -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Advertised:
    """A client's public keys for one round (hex of the raw X25519 public keys)."""

    client: str
    mask_key: str
    share_key: str


class SecAggClient:
    """One client's side of the protocol for one round. ``peers``: every client of the round (itself included),
    whose canonical order fixes the mask signs and the Shamir x-coordinates (position + 1).

    ``secret``: the client's own long-term secret (32 bytes or more). Its keys, self-mask seed and share polynomials
    of the round are then derived from it (HKDF-SHA256, SHAKE-256), so a client function that keeps no state can
    advertise, share, mask and reveal in separate invocations; without it they are random, for one object that lives
    through the round."""

    def __init__(self, client: str, round_: int, peers: Sequence[str], threshold: int,
                 secret: bytes | None = None) -> None:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        self.client, self.round = client, round_
        self.peers = sorted(peers)
        if client not in self.peers:
            raise SecurityError(f"client {client!r} is not among the round's peers")
        if not 1 < threshold <= len(self.peers):
            raise SecurityError(f"threshold {threshold} must be in (1, {len(self.peers)}]")
        self.threshold = threshold
        if secret is None:
            self._mask = X25519PrivateKey.generate()
            self._share = X25519PrivateKey.generate()
            self._self_seed = secrets.token_bytes(32)
            self._polynomials: bytes | None = None
        else:
            if len(secret) < 32:
                raise SecurityError(f"a client's secret has at least 32 bytes, got {len(secret)}")

            def derive(what: str) -> bytes:
                return _hkdf(secret, f"gradshard secagg {what} {round_} {client}")

            self._mask = X25519PrivateKey.from_private_bytes(derive("mask key"))
            self._share = X25519PrivateKey.from_private_bytes(derive("share key"))
            self._self_seed = derive("self mask")
            self._polynomials = derive("shamir")
        self._revealed: set[tuple[str, str]] = set()

    def advertise(self) -> Advertised:
        return Advertised(self.client, _public(self._mask), _public(self._share))

    def _x(self, client: str) -> int:
        return self.peers.index(client) + 1

    def _channel(self, peer: Advertised) -> bytes:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

        shared = self._share.exchange(X25519PublicKey.from_public_bytes(bytes.fromhex(peer.share_key)))
        low, high = sorted((self.client, peer.client))
        return _hkdf(shared, f"gradshard secagg shares {self.round} {low} {high}")

    def share(self, directory: Mapping[str, Advertised]) -> dict[str, bytes]:
        """Every peer's encrypted shares of this client's mask key and self-mask seed (peer -> ciphertext)."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

        raw = self._mask.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                       serialization.NoEncryption())
        holders = [self._x(p) for p in self.peers]
        seeds = (None, None) if self._polynomials is None else (self._polynomials + b"key", self._polynomials + b"seed")
        key_shares = split(raw, holders, self.threshold, seeds[0])
        seed_shares = split(self._self_seed, holders, self.threshold, seeds[1])
        out = {}
        for peer in self.peers:
            if peer == self.client:
                continue
            x = self._x(peer)
            plain = json.dumps({"from": self.client, "to": peer, "x": x, "key": hex(key_shares[x]),
                                "seed": hex(seed_shares[x])}).encode()
            nonce = hashlib.sha256(f"{self.round} {self.client} {peer}".encode()).digest()[:12]
            out[peer] = nonce + ChaCha20Poly1305(self._channel(directory[peer])).encrypt(nonce, plain, None)
        self._own = {"key": key_shares[self._x(self.client)], "seed": seed_shares[self._x(self.client)]}
        return out

    def _pair_key(self, peer: Advertised) -> bytes:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

        shared = self._mask.exchange(X25519PublicKey.from_public_bytes(bytes.fromhex(peer.mask_key)))
        low, high = sorted((self.client, peer.client))
        return pair_key(shared, self.round, low, high)

    def quantized(self, update: npt.NDArray[np.floating], *, bits: int, clip: float, weight: float = 1.0
                  ) -> npt.NDArray[np.uint32]:
        """This client's quantized (and weighted) update, what :meth:`masked` masks: a reference for tests and
        simulations."""
        return quantize(update, bits, clip, _hkdf(self._self_seed, f"gradshard secagg rounding {self.round}"),
                        weight)

    def masked(self, update: npt.NDArray[np.floating], directory: Mapping[str, Advertised], *, bits: int,
               clip: float, weight: float = 1.0) -> npt.NDArray[np.uint32]:
        """This client's upload: its quantized update (× ``weight``, the directory's weight of this client; 1:
        unweighted) plus its self mask and every pairwise mask (mod 2³²)."""
        n = len(update)
        y = self.quantized(update, bits=bits, clip=clip, weight=weight)
        with np.errstate(over="ignore"):
            y += mask_slice(self._self_seed, 0, n, self.round)
            for peer in self.peers:
                if peer == self.client:
                    continue
                mask = mask_slice(self._pair_key(directory[peer]), 0, n, self.round)
                if peer > self.client:
                    y += mask
                else:
                    y -= mask
        return y

    def reveal(self, inbox: Mapping[str, bytes], directory: Mapping[str, Advertised], survivors: Sequence[str]
               ) -> dict[str, dict[str, str]]:
        """The shares the server may have: of each survivor's self-mask seed, of each dropped peer's mask key.

        Refuses a request that names this client as dropped (it uploaded), and never reveals both secrets of one
        peer across calls."""
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

        if self.client not in survivors:
            raise SecurityError(f"client {self.client!r} uploaded; it does not reveal shares as a dropped client")
        revealed: dict[str, dict[str, str]] = {}
        for peer in self.peers:
            what = "seed" if peer in survivors else "key"
            if (peer, "key" if what == "seed" else "seed") in self._revealed:
                raise SecurityError(f"refusing to reveal both secrets of client {peer!r}")
            self._revealed.add((peer, what))
            if peer == self.client:
                value = self._own[what]
            else:
                blob = inbox[peer]
                plain = json.loads(ChaCha20Poly1305(self._channel(directory[peer])).decrypt(blob[:12], blob[12:],
                                                                                             None))
                if plain["from"] != peer or plain["to"] != self.client:
                    raise SecurityError(f"a share from {peer!r} is not addressed to {self.client!r}")
                value = int(plain[what], 16)
            revealed[peer] = {"what": what, "x": str(self._x(self.client)), "share": hex(value)}
        return revealed


def _public(key: X25519PrivateKey) -> str:
    from cryptography.hazmat.primitives import serialization

    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


# --- the server's unmasking -----------------------------------------------------------------------------------------
def unmasking_terms(round_: int, peers: Sequence[str], survivors: Sequence[str], directory: Mapping[str, Advertised],
                    revealed: Mapping[str, Mapping[str, Mapping[str, str]]], threshold: int
                    ) -> list[tuple[str, int]]:
    """The masks to remove from the survivors' sum, as ``(key hex, sign)``: minus each survivor's self mask, and for
    each survivor–dropped pair the pairwise mask the survivor added (sign as the survivor applied it, negated).

    ``revealed``: revealer -> peer -> {"what", "x", "share"}; needs ``threshold`` revealers."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

    peers = sorted(peers)
    survivors = sorted(survivors)
    if len(revealed) < threshold:
        raise SecurityError(f"{len(revealed)} survivors revealed shares, {threshold} are needed to unmask")
    terms: list[tuple[str, int]] = []
    for peer in peers:
        what = "seed" if peer in survivors else "key"
        shares = {}
        for revealer, by_peer in revealed.items():
            entry = by_peer.get(peer)
            if entry is None or entry.get("what") != what:
                raise SecurityError(f"client {revealer!r} revealed no {what} share of {peer!r}")
            x, share = int(entry["x"]), int(entry["share"][:140], 16)  # a share is below 2^521: 131 hex digits
            if not 1 <= x <= len(peers) or not 0 <= share < PRIME or x in shares:
                raise SecurityError(f"client {revealer!r} revealed a malformed share of {peer!r}")
            shares[x] = share
        secret = combine(shares, threshold)
        if what == "seed":
            terms.append((secret.hex(), -1))
            continue
        dropped = X25519PrivateKey.from_private_bytes(secret)
        if _public(dropped) != directory[peer].mask_key:
            raise SecurityError(f"the shares of {peer!r} do not reconstruct its advertised key")
        for survivor in survivors:
            shared = dropped.exchange(X25519PublicKey.from_public_bytes(bytes.fromhex(directory[survivor].mask_key)))
            low, high = sorted((survivor, peer))
            sign = 1 if peer > survivor else -1  # what the survivor added
            terms.append((pair_key(shared, round_, low, high).hex(), -sign))
    return terms
