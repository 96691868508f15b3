"""Pseudo-random masks that any shard can regenerate for its own elements (secure aggregation's PRG).

Element e of the stream keyed by a 32-byte key is word e of ChaCha20's keystream (little-endian uint32), with the
round as the nonce: a function regenerates exactly elements ``[lo, hi)`` by seeking to ChaCha20 block ``4·lo // 64``
(``cryptography``'s ChaCha20, RFC 7539: a 32-bit block counter, then a 96-bit nonce). Keys are the full 256 bits
(never folded to a smaller seed), so two keys that differ in one bit give unrelated masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from gradshard.errors import SecurityError

_WORD = 4  # bytes per mask element (uint32)
_BLOCK = 64  # bytes per ChaCha20 block


def mask_slice(key: bytes, start: int, stop: int, round_: int = 0) -> npt.NDArray[np.uint32]:
    """Mask elements ``[start, stop)`` of the stream keyed by the full 32-byte ``key``: ChaCha20 keystream words,
    little-endian uint32, seeking straight to word ``start`` (block counter ``4·start // 64``)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    if len(key) != 32:
        raise SecurityError(f"a mask key is 32 bytes, got {len(key)}")
    if not 0 <= start <= stop:
        raise SecurityError(f"bad mask range [{start}, {stop})")
    block, skip = divmod(_WORD * start, _BLOCK)
    if block + (_WORD * (stop - start) + skip) // _BLOCK >= 2**32:
        raise SecurityError("mask range beyond the stream (2^32 ChaCha20 blocks: 64 G elements)")
    # RFC 7539 layout: a 32-bit little-endian block counter, then the 96-bit nonce (here the round)
    nonce = block.to_bytes(4, "little") + round_.to_bytes(12, "little")
    encryptor = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
    stream = encryptor.update(bytes(skip + _WORD * (stop - start)))[skip:]
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32)


def remove_masks(total: npt.NDArray[np.uint32], start: int, terms: Sequence[tuple[str, int]], round_: int) -> None:
    """Subtract (or add) each term's mask slice ``[start, start + len(total))`` from ``total`` in place (mod 2³²)."""
    with np.errstate(over="ignore"):
        for key, sign in terms:
            mask = mask_slice(bytes.fromhex(key), start, start + len(total), round_)
            if sign > 0:
                total += mask
            else:
                total -= mask
