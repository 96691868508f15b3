"""A client's presigned view of the store (gradshard.store.presigned): it reads and writes exactly the objects the
driver presigned for it, against the local S3 server, and refuses everything else with the reason."""

from __future__ import annotations

import pytest

from gradshard.errors import ObjectNotFoundError, StoreError
from gradshard.store import S3Store
from gradshard.store.presigned import PresignedStore


def test_reads_and_writes_exactly_the_presigned_objects(s3_store: S3Store) -> None:
    # Prepare: two objects; the view may read one and write one new key
    s3_store.put("models/000001.safetensors", b"model bytes")
    s3_store.put("rounds/000001/updates/other.safetensors", b"someone else's")
    size = s3_store.size("models/000001.safetensors")
    view = PresignedStore({"models/000001.safetensors": (s3_store.presign_range("models/000001.safetensors", 0, size),
                                                         size)},
                          {"rounds/000001/updates/mine.safetensors":
                           s3_store.presign_put("rounds/000001/updates/mine.safetensors")})

    # Execute: read the model (whole, and a range), write the own update through an upload
    model = view.get("models/000001.safetensors")
    with view.open_reader("models/000001.safetensors") as reader:
        part = bytearray(5)
        reader.read_into(6, memoryview(part))
    upload = view.begin_upload("rounds/000001/updates/mine.safetensors", 4)
    view.write_at("rounds/000001/updates/mine.safetensors", upload, 0, b"ab")
    view.write_at("rounds/000001/updates/mine.safetensors", upload, 2, b"cd")
    assert not s3_store.exists("rounds/000001/updates/mine.safetensors")  # nothing visible before completion
    view.complete_upload("rounds/000001/updates/mine.safetensors", upload)

    # Assert
    assert model == b"model bytes" and bytes(part) == b"bytes"
    assert s3_store.get("rounds/000001/updates/mine.safetensors") == b"abcd"
    with pytest.raises(ObjectNotFoundError, match="no presigned GET"):
        view.get("rounds/000001/updates/other.safetensors")
    with pytest.raises(StoreError, match="not among the objects"):
        view.put("models/000002.safetensors", b"x")
    with pytest.raises(StoreError, match="not among the objects"):
        view.begin_upload("rounds/000001/updates/other.safetensors", 3)
    with pytest.raises(StoreError, match="cannot list"):
        view.list("rounds/")
    with pytest.raises(StoreError, match="not among the objects"):
        view.delete("models/000001.safetensors")
    assert s3_store.get("rounds/000001/updates/other.safetensors") == b"someone else's"

