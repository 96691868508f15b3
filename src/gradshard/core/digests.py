"""The chunk digest algorithms an update may use, by name.

Measured with ``bench/digests.py`` (one core, a 256 MiB float32 array, best of 5, on this 2-core AMD EPYC VM with
AVX2 and SHA-NI, shared with other jobs, so ranges over 2-4 runs): "whole" is one digest of the array, "chunked" the
per-chunk digests of a :class:`~gradshard.core.checksum.ChunkStream` fed 4 MiB windows, 65536-element chunks.

=========  ==========  =============  ===============  ===============
name       hex digits  cryptographic  whole            chunked
=========  ==========  =============  ===============  ===============
xxh3_64    16          no             9.6-12.5 GB/s    10.0-10.7 GB/s
blake3     64          yes            2.2-3.0 GB/s     2.8 GB/s
sha256     64          yes            1.4-1.5 GB/s     1.3-1.4 GB/s
=========  ==========  =============  ===============  ===============

An in-place ``np.add`` of the same array runs at 6.3-8.0 GB/s. xxh3 (``xxhash``) detects accidents — bit rot,
truncation, a wrong range — and authenticates nothing: anyone can make data with a given xxh3. BLAKE3 (the
``blake3`` package, one thread) and SHA-256 (``hashlib``) make each chunk digest a commitment, which a signature
over the digest list extends to the data; they cost about 3x and 5x a reduction step's ``np.add``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args

import blake3
import numpy as np
import numpy.typing as npt
import xxhash

from gradshard.errors import GradshardError

DigestName = Literal["xxh3_64", "blake3", "sha256"]
NAMES: tuple[str, ...] = get_args(DigestName)
DEFAULT: DigestName = "xxh3_64"
Data = bytes | bytearray | memoryview | npt.NDArray[Any]


class Hasher(Protocol):
    """An incremental hasher: the part of the ``hashlib`` interface the chunk streams use."""

    def update(self, data: memoryview, /) -> object: ...

    def hexdigest(self) -> str: ...


def byte_view(data: Data) -> memoryview:
    """A flat unsigned-byte view of a buffer (BLAKE3 accepts nothing else); numpy arrays must be contiguous."""
    view = data.data if isinstance(data, np.ndarray) else memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


@dataclass(frozen=True)
class DigestAlgorithm:
    """One algorithm: its name in the metadata, its fixed hex width, and how to hash (incrementally, or at once)."""

    name: DigestName
    hex_width: int
    cryptographic: bool
    new: Callable[[], Hasher]
    oneshot: Callable[[memoryview], str]  # whole chunks: one call, no hasher object

    def hexdigest(self, data: Data) -> str:
        """The digest of a whole buffer as ``hex_width`` lowercase hex digits."""
        return self.oneshot(byte_view(data))

    def is_digest(self, text: str) -> bool:
        """Whether ``text`` has the form of this algorithm's digests (width and lowercase hex)."""
        return len(text) == self.hex_width and all(c in "0123456789abcdef" for c in text)


ALGORITHMS: dict[str, DigestAlgorithm] = {
    "xxh3_64": DigestAlgorithm("xxh3_64", 16, False, xxhash.xxh3_64, xxhash.xxh3_64_hexdigest),
    "blake3": DigestAlgorithm("blake3", 64, True, blake3.blake3, lambda data: blake3.blake3(data).hexdigest()),
    "sha256": DigestAlgorithm("sha256", 64, True, hashlib.sha256, lambda data: hashlib.sha256(data).hexdigest()),
}


def algorithm(name: str) -> DigestAlgorithm:
    """The algorithm called ``name``; :class:`GradshardError` naming the known ones otherwise."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise GradshardError(f"unknown digest algorithm {name!r}; use one of {', '.join(NAMES)}") from None
