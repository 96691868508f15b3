"""Gaussian noise that is a pure function of (round key, element index): the same bytes for every shard plan.

Element j of the model lies in chunk k = j // chunk_elems of the update format's fixed chunk grid. Chunk k's noise is
the ``standard_normal`` stream of numpy's Philox-4x64 counter-based generator keyed by the round's 128-bit noise
key, with the chunk index in the third counter word (so streams of different chunks never overlap: a chunk uses
fewer than 2^64 counter steps). A shard function generates the chunks its range touches, whatever M, window or
plan, so the noised aggregate is bit-identical across M, topologies and reruns with the same key.

The round key is ``HMAC-SHA256(secret, "gradshard-central-dp-noise" ‖ round)`` of a secret the driver holds (a key
file it creates with mode 0600, or a fresh one per process), so rounds get independent noise and the published
model does not reveal the key. Philox is a counter-based generator built for statistical quality, not a
cryptographic one; the noise stays secret as long as the key does (see docs/privacy.md). Cost: numpy's ziggurat
``standard_normal`` at ~34 ns per element (float64) on this machine.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gradshard.core.checksum import ChunkGrid
from gradshard.errors import PrivacyError

SECRET_BYTES = 32
_DOMAIN = b"gradshard-central-dp-noise\x00"


def round_key(secret: bytes, r: int) -> str:
    """The hex noise key of round ``r`` (32 bytes of HMAC-SHA256; Philox uses the first 16)."""
    if len(secret) < 16:
        raise PrivacyError(f"a noise secret needs at least 16 bytes, got {len(secret)}")
    return hmac.new(secret, _DOMAIN + r.to_bytes(8, "little"), hashlib.sha256).hexdigest()


def load_secret(path: str | os.PathLike[str]) -> bytes:
    """The secret in ``path``, created with 32 random bytes (mode 0600, atomically) when missing."""
    file = Path(path)
    if not file.exists():
        tmp = file.with_name(f".{file.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_bytes(SECRET_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, file)  # fails if another process created it meanwhile: use theirs
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    info = file.lstat()
    if not stat.S_ISREG(info.st_mode):
        raise PrivacyError(f"noise key file {file} is not a regular file")
    if info.st_size != SECRET_BYTES:
        raise PrivacyError(f"noise key file {file} holds {info.st_size} bytes, expected {SECRET_BYTES}")
    if info.st_mode & 0o077:
        raise PrivacyError(f"noise key file {file} is readable by others (mode {oct(info.st_mode & 0o777)}); "
                           "chmod 600 it")
    return file.read_bytes()


def _generator(key_hex: str, chunk: int) -> np.random.Generator:
    raw = bytes.fromhex(key_hex)
    if len(raw) < 16:
        raise PrivacyError(f"a round noise key has at least 16 bytes, got {len(raw)}")
    key = np.frombuffer(raw[:16], dtype="<u8").astype(np.uint64)
    counter = np.array([0, 0, chunk, 0], dtype=np.uint64)
    return np.random.Generator(np.random.Philox(key=key, counter=counter))


class ChunkNoise:
    """Standard normal noise over a fixed chunk grid, generated a chunk at a time (one chunk buffer of float64)."""

    def __init__(self, key_hex: str, grid: ChunkGrid) -> None:
        _generator(key_hex, 0)  # refuse a bad key now
        self.key, self.grid = key_hex, grid
        self._chunk = -1
        self._values = np.empty(min(grid.chunk_elems, max(grid.numel, 1)), dtype=np.float64)

    def _load(self, index: int) -> npt.NDArray[np.float64]:
        a, b = self.grid.bounds(index)
        values = self._values[: b - a]
        if index != self._chunk:
            _generator(self.key, index).standard_normal(out=values)
            self._chunk = index
        return values

    def fill(self, start: int, out: npt.NDArray[np.float64]) -> None:
        """``out[i]`` = the noise of element ``start + i``."""
        stop = start + len(out)
        for index in self.grid.covering(start, stop):
            a, b = self.grid.bounds(index)
            lo, hi = max(a, start), min(b, stop)
            out[lo - start : hi - start] = self._load(index)[lo - a : hi - a]

    def add(self, start: int, values: npt.NDArray[Any], sigma: float) -> None:
        """``values[i] += sigma · noise(start + i)``, computed in float64, a chunk at a time."""
        stop = start + len(values)
        for index in self.grid.covering(start, stop):
            a, b = self.grid.bounds(index)
            lo, hi = max(a, start), min(b, stop)
            part = values[lo - start : hi - start]
            part += sigma * self._load(index)[lo - a : hi - a]


def noise(key_hex: str, grid: ChunkGrid, start: int, stop: int) -> npt.NDArray[np.float64]:
    """The standard normal noise of elements ``[start, stop)`` (tests, references)."""
    out = np.empty(stop - start, dtype=np.float64)
    ChunkNoise(key_hex, grid).fill(start, out)
    return out
