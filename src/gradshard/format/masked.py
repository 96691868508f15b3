"""Masked updates of secure aggregation (:mod:`gradshard.security.secagg`): a client's quantized update plus its
masks, uint32 modulo 2³², one element per element of the round's layout.

A safetensors file with one 1-D ``uint32`` tensor, ``masked``, in layout order; the metadata is an update's with
``gradshard.encoding = "secagg"`` and the round's layout digest; chunk digests over each chunk's bytes as for any
update. Readers hand the words on bit for bit (in the round's float32 buffers, viewed as uint32): only the reducer
``secagg`` sums them, modulo 2³², and removes the masks.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from gradshard.core import checksum, digests
from gradshard.core.layout import ModelLayout, TensorSpec
from gradshard.errors import GradshardError, UpdateError
from gradshard.format.update import EncodedReader, UpdateHeader, UpdateMeta
from gradshard.format.writer import publish_encoded, signing_meta
from gradshard.store import ObjectReader, Store
from gradshard.store.base import as_bytes

if TYPE_CHECKING:
    from gradshard.security.keys import PrivateKey

SECAGG = "secagg"
MASKED_TENSOR = "masked"


def write_masked_update(store: Store, key: str, layout: ModelLayout, masked: npt.NDArray[np.uint32], meta: UpdateMeta,
                        *, signer: PrivateKey | None = None) -> UpdateMeta:
    """Write a client's masked upload (uint32, one per element of the round's float32 layout) atomically."""
    if layout.flat_dtype != "float32":
        raise GradshardError(f"secure aggregation runs on float32 rounds, this layout is {layout.flat_dtype}")
    if masked.dtype != np.uint32 or masked.shape != (layout.numel,):
        raise GradshardError(f"a masked update is {layout.numel} uint32, got {masked.shape} {masked.dtype}")
    if meta.layout_digest != layout.digest():
        raise GradshardError(f"masked update {key!r}: its metadata's layout digest is not the round layout's")
    meta = signing_meta(key, dataclasses.replace(meta, encoding=SECAGG, checksums=""), signer)
    grid = checksum.ChunkGrid(layout.numel, meta.chunk_elems)
    words = np.ascontiguousarray(masked, dtype="<u4")
    algorithm = digests.algorithm(meta.digest)
    hexes = [algorithm.hexdigest(words[a:b]) for a, b in (grid.bounds(i) for i in range(grid.count))]
    file = ModelLayout([TensorSpec(MASKED_TENSOR, (layout.numel,), "uint32")])
    return publish_encoded(store, key, file, meta, hexes, [words], signer)


class MaskedReader(EncodedReader):
    """Verified reads of a masked update: each chunk's uint32 words into the round's float32 buffers, bit for bit."""

    def __init__(self, reader: ObjectReader, header: UpdateHeader, layout: ModelLayout, meta: UpdateMeta) -> None:
        super().__init__(reader, header, layout, meta)
        if layout.flat_dtype != "float32":
            raise UpdateError(meta.client, f"a masked update needs a float32 round, this one is {layout.flat_dtype}")
        entry = header.tensors.get(MASKED_TENSOR)
        if sorted(header.tensors) != [MASKED_TENSOR] or entry is None or entry.dtype != "uint32" or (
                entry.shape != (layout.numel,)):
            raise UpdateError(meta.client, f"a masked update holds one uint32 tensor {MASKED_TENSOR!r} of "
                                           f"{layout.numel} words, got {sorted(header.tensors)[:5]}")
        self.data_start = header.data_start + entry.begin

    def expect(self, start: int, stop: int) -> None:
        if stop > start:
            self.reader.expect(self.data_start + 4 * start, self.data_start + 4 * stop)

    def read_chunk(self, index: int, out: npt.NDArray[Any]) -> None:
        a, b = self.grid.bounds(index)
        words = out[: b - a].view(np.uint32)
        self.reader.read_into(self.data_start + 4 * a, as_bytes(words))
        self.bytes_read += 4 * (b - a)
        if self.algorithm.hexdigest(words) != self.checksum_of(index):
            raise UpdateError(self.client, f"checksum mismatch in chunk {index} (elements [{a}, {b})): the object "
                                           "is corrupted")
