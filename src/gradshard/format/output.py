"""Objects written by many functions at once: an open upload whose checksummed header is written last.

The driver opens the upload with the header's length reserved (checksums are fixed-width), functions write their
element ranges into the data section and return the checksums of the chunks they wrote, and the driver writes the
header and completes the upload only when every chunk is accounted for — so the object appears whole or not at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gradshard.core import checksum
from gradshard.core.layout import ModelLayout
from gradshard.errors import InvocationError
from gradshard.format.update import UpdateMeta, encode_header
from gradshard.store import Store


@dataclass
class PendingObject:
    """An update-format object under construction at ``key``."""

    store: Store
    key: str
    layout: ModelLayout
    meta: UpdateMeta
    upload_id: str
    header_len: int

    @classmethod
    def begin(cls, store: Store, key: str, layout: ModelLayout, meta: UpdateMeta) -> PendingObject:
        count = checksum.ChunkGrid(layout.numel, meta.chunk_elems).count
        header_len = len(encode_header(layout, meta.with_checksums(["0" * checksum.HEX_WIDTH] * count).to_metadata()))
        upload_id = store.begin_upload(key, header_len + layout.nbytes)
        return cls(store, key, layout, meta, upload_id, header_len)

    def target(self) -> dict[str, Any]:
        """Where a function writes: the arguments ``OutputWriter`` takes."""
        return {"output_key": self.key, "upload_id": self.upload_id, "data_start": self.header_len}

    def commit(self, checksums: Mapping[int, str]) -> None:
        """Write the header with every chunk's checksum and publish; refuses if a chunk was not written."""
        count = checksum.ChunkGrid(self.layout.numel, self.meta.chunk_elems).count
        if sorted(checksums) != list(range(count)):
            raise InvocationError(f"functions returned checksums for {len(checksums)} of {count} chunks of "
                                  f"{self.key}")
        header = encode_header(self.layout, self.meta.with_checksums([checksums[i] for i in range(count)])
                               .to_metadata())
        self.store.write_at(self.key, self.upload_id, 0, header)
        self.store.complete_upload(self.key, self.upload_id)

    def abort(self) -> None:
        self.store.abort_upload(self.key, self.upload_id)


def merge_digests(parts: Iterable[Mapping[int, str]]) -> dict[int, str]:
    """Merge the ``{chunk: digest}`` maps that functions returned; a chunk reported twice must agree."""
    merged: dict[int, str] = {}
    for part in parts:
        for index, digest in part.items():
            if merged.setdefault(index, digest) != digest:
                raise InvocationError(f"two functions wrote chunk {index} with different contents")
    return merged
