"""The one writer of the object format: begin an upload, fill it with range writers, commit it with the digests.

An object (update, partial, aggregate, model, optimizer state) is written in three steps, which may run in
different processes:

1. :meth:`ObjectUpload.begin` opens a store upload with the header's length reserved. That length is known
   before any data is: chunk digests are fixed-width hex, the header digest is 64 hex digits, and every other
   field comes from the :class:`UpdateMeta` given at the start.
2. One or many :class:`RangeWriter` s write consecutive elements of the data section from a chunk boundary —
   a shard function builds one from :meth:`ObjectUpload.target` and its start element — casting from the
   accumulation dtype and digesting every chunk they complete.
3. :meth:`ObjectUpload.commit` takes every chunk's digest, refuses when one is missing, writes the header at
   offset 0 and completes the upload; :meth:`ObjectUpload.abort` discards it. Nothing is visible before.

:class:`UpdateWriter` (one stream from element 0) and :func:`write_update` are those steps in one process.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from gradshard.core import checksum, digests
from gradshard.core.digests import DigestName
from gradshard.core.layout import ModelLayout, TensorSpec, as_numpy, tensor_dtype
from gradshard.errors import GradshardError, InvocationError, LayoutError
from gradshard.format.keys import check_client_id
from gradshard.format.update import (
    HEADER_DIGEST_KEY,
    MAX_HEADER_BYTES,
    SIGNATURE_HEX,
    SIGNATURE_KEY,
    Coverage,
    UpdateMeta,
    header_digest,
    tensor_table,
)
from gradshard.store import Store

if TYPE_CHECKING:  # cryptography loads only when an update is signed (function packages may lack it)
    from gradshard.security.keys import PrivateKey

#: Signs a header digest: returns the signature's hex (see :func:`signer_for`).
Sign = Callable[[str], str]

_WRITE_PIECE_BYTES = 64 << 20  # bounds what one store write (and one cast) holds


# --- headers -----------------------------------------------------------------------------------------------------
def _header(specs: Iterable[TensorSpec], metadata: Mapping[str, str], sign: Sign | None = None) -> dict[str, Any]:
    """The parsed form of a safetensors header with tensors stored in the order of ``specs``, digest included, and
    with ``sign``: the signature of that digest (the last field)."""
    header: dict[str, Any] = {"__metadata__": {k: v for k, v in metadata.items()
                                               if k not in (HEADER_DIGEST_KEY, SIGNATURE_KEY)}}
    header.update(tensor_table(specs))
    digest = header_digest(header)
    header["__metadata__"][HEADER_DIGEST_KEY] = digest
    if sign is not None:
        header["__metadata__"][SIGNATURE_KEY] = sign(digest)
    return header


def signer_for(meta: UpdateMeta, key: PrivateKey) -> Sign:
    """What :func:`encode_header` takes to sign ``meta`` (its chunk digests included) with ``key``."""
    from gradshard.security.signing import sign_update_meta

    return lambda digest: sign_update_meta(meta, digest, key)


def _placeholder_signature(digest: str) -> str:
    return "0" * SIGNATURE_HEX


def encode_header(layout: ModelLayout, metadata: Mapping[str, str], sign: Sign | None = None) -> bytes:
    """The 8-byte length and the space-padded JSON header of an object in layout order, with its header digest
    (and with ``sign``, its signature)."""
    blob = json.dumps(_header(layout, metadata, sign), separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors pads the header with spaces to 8-byte alignment
    return struct.pack("<Q", len(blob)) + blob


def header_length(layout: ModelLayout, meta: UpdateMeta) -> int:
    """The bytes :func:`encode_header` will take for ``meta`` once its digests (and, when ``meta.signer`` is set,
    its signature) are known: they are all fixed-width hex."""
    count = checksum.ChunkGrid(layout.numel, meta.chunk_elems).count
    placeholder = dataclasses.replace(meta, signature="").with_checksums(["0" * meta.hex_width] * count)
    return len(encode_header(layout, placeholder.to_metadata(), _placeholder_signature if meta.signer else None))


def safetensors_order(specs: Iterable[TensorSpec]) -> list[TensorSpec]:
    """The order ``safetensors.*.save_file`` stores these tensors in, asked of the installed library.

    The library sorts by dtype, then by name (one dtype: by name); rather than restate its rule, this serializes
    one-element stand-ins with the same names and dtypes (a few bytes a tensor) and reads their offsets back."""
    import safetensors.numpy

    specs = list(specs)
    blob = safetensors.numpy.save({s.name: np.zeros(1, dtype=s.dtype) for s in specs})
    (n,) = struct.unpack("<Q", blob[:8])
    offsets = {name: entry["data_offsets"][0] for name, entry in json.loads(blob[8 : 8 + n]).items()
               if name != "__metadata__"}
    return sorted(specs, key=lambda s: offsets[s.name])


def with_header_digest(layout: ModelLayout, metadata: Mapping[str, str],
                       file_order: Literal["safetensors", "layout"] = "safetensors") -> dict[str, str]:
    """``metadata`` plus the header digest of the file another writer makes of ``layout``'s tensors.

    ``"safetensors"``: the order ``safetensors.*.save_file`` stores tensors in (:func:`safetensors_order`).
    ``"layout"``: layout order, as :func:`encode_header` writes."""
    specs = safetensors_order(layout) if file_order == "safetensors" else list(layout)
    return dict(_header(specs, metadata)["__metadata__"])


# --- the upload ----------------------------------------------------------------------------------------------------
@dataclass
class ObjectUpload:
    """An object under construction at ``key``: begun, written by range writers, then committed or aborted."""

    store: Store
    key: str
    layout: ModelLayout
    meta: UpdateMeta
    upload_id: str
    header_len: int
    state: Literal["open", "committed", "aborted"] = "open"
    signer: PrivateKey | None = None

    @classmethod
    def begin(cls, store: Store, key: str, layout: ModelLayout, meta: UpdateMeta,
              signer: PrivateKey | None = None) -> ObjectUpload:
        """Open the upload; with ``signer`` (an Ed25519 private key) the object is signed at commit: its header
        reserves room for the fingerprint and the signature (a cryptographic chunk digest is required)."""
        meta = signing_meta(key, meta, signer)
        header_len = header_length(layout, meta)
        if header_len - 8 > MAX_HEADER_BYTES:  # readers would refuse it: never write what nothing can read
            raise GradshardError(f"the header of {key!r} would be {header_len - 8:,} bytes, over the "
                                 f"{MAX_HEADER_BYTES:,} readers accept; use fewer tensors or larger chunks")
        return cls(store, key, layout, meta, store.begin_upload(key, header_len + layout.nbytes), header_len,
                   signer=signer)

    @property
    def grid(self) -> checksum.ChunkGrid:
        return checksum.ChunkGrid(self.layout.numel, self.meta.chunk_elems)

    def target(self) -> OutputTarget:
        """Where a function writes: with its start element, what :meth:`RangeWriter.to` takes."""
        return OutputTarget(output_key=self.key, upload_id=self.upload_id, data_start=self.header_len,
                            digest=self.meta.digest)

    def range_writer(self, start: int = 0, *, capacity: int = 0, accumulate: str | None = None) -> RangeWriter:
        """A writer of this upload from element ``start`` in this process (``accumulate``: see RangeWriter)."""
        return RangeWriter(self.store, self.key, self.upload_id, self.header_len, start, self.layout,
                           self.meta.chunk_elems, self.meta.digest, capacity, accumulate or self.layout.flat_dtype)

    def commit(self, chunk_digests: Mapping[int, str]) -> UpdateMeta:
        """Write the header with every chunk's digest and publish; refuses if a chunk is missing or malformed."""
        if self.state != "open":
            raise GradshardError(f"upload of {self.key!r} is {self.state}; begin a new one")
        count = self.grid.count
        missing = [i for i in range(count) if i not in chunk_digests]
        if missing or len(chunk_digests) != count:
            raise InvocationError(f"cannot commit {self.key!r}: the range writers returned digests for "
                                  f"{len(chunk_digests)} of {count} chunks (missing {missing[:8]}); rerun the "
                                  "invocations that write them")
        algorithm = digests.algorithm(self.meta.digest)
        bad = next((i for i in range(count) if not algorithm.is_digest(chunk_digests[i])), None)
        if bad is not None:
            raise InvocationError(f"cannot commit {self.key!r}: chunk {bad}'s digest {chunk_digests[bad]!r} is not "
                                  f"{algorithm.hex_width} hex digits of {algorithm.name}")
        meta = self.meta.with_checksums([chunk_digests[i] for i in range(count)])
        published = publish_header(self.store, self.key, self.upload_id, self.layout, meta, self.header_len,
                                   self.signer)
        self.state = "committed"
        return published

    def abort(self) -> None:
        """Discard the upload (nothing becomes visible); a no-op once committed or aborted."""
        if self.state == "open":
            self.state = "aborted"
            self.store.abort_upload(self.key, self.upload_id)

    def __enter__(self) -> ObjectUpload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()  # by an exception, or left without commit


def publish_header(store: Store, key: str, upload_id: str, layout: ModelLayout, meta: UpdateMeta, header_len: int,
                   signer: PrivateKey | None) -> UpdateMeta:
    """Write the header of an upload whose data is complete (signed over its header digest with ``signer``) and
    complete the upload, so the object becomes visible at once; returns ``meta`` with its signature."""
    signatures: list[str] = []
    sign: Sign | None = None
    if signer is not None:
        make = signer_for(meta, signer)

        def sign(digest: str) -> str:
            signatures.append(make(digest))
            return signatures[-1]

    header = encode_header(layout, meta.to_metadata(), sign)
    if len(header) != header_len:  # fixed-width fields: only a bug gets here
        raise GradshardError(f"header of {key!r} is {len(header)} bytes, {header_len} were reserved")
    store.write_at(key, upload_id, 0, header)
    store.complete_upload(key, upload_id)
    return dataclasses.replace(meta, signature=signatures[0]) if signatures else meta


class OutputTarget(BaseModel):
    """Where functions write an object: its open upload, the byte offset of its data section, the digest algorithm.

    Part of the invocation contracts of every function that writes a range of an object."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    output_key: str
    upload_id: str
    data_start: int = Field(ge=0)
    digest: DigestName = "xxh3_64"


class RangeWriter:
    """Writes consecutive elements of an upload's data section from ``start`` (a chunk boundary).

    Built from plain values, so a function in another process can write its range: ``data_start`` is the
    reserved header length. Values in the layout dtype are written as they are; values in ``accumulate`` are
    cast into a preallocated buffer of ``capacity`` elements, piece by piece. Every chunk the writes complete is
    digested with ``digest``; :meth:`finish` flushes the store's writer and returns those digests.
    """

    def __init__(self, store: Store, key: str, upload_id: str, data_start: int, start: int, layout: ModelLayout,
                 chunk_elems: int, digest: str, capacity: int, accumulate: str) -> None:
        self.key, self.dtype, self.numel = key, np.dtype(layout.flat_dtype), layout.numel
        self._chunks = checksum.ChunkStream(checksum.ChunkGrid(layout.numel, chunk_elems), start, digest)
        self._accepted = {self.dtype, np.dtype(accumulate)}
        cast = np.dtype(accumulate) != self.dtype
        if cast and capacity < 1:
            raise GradshardError(f"casting {accumulate} to {self.dtype} needs a buffer of capacity >= 1 element")
        self._cast = np.empty(capacity, dtype=self.dtype) if cast else None
        self._piece = max(1, _WRITE_PIECE_BYTES // self.dtype.itemsize)
        if self._cast is not None:
            self._piece = min(self._piece, capacity)
        self.pos = start
        self.digests: dict[int, str] = {}  # chunk index -> digest, returned by functions
        self._out = store.writer(key, upload_id, data_start + start * self.dtype.itemsize)

    def write(self, values: npt.NDArray[Any]) -> None:
        """Write the next ``len(values)`` elements."""
        if values.ndim != 1 or values.dtype not in self._accepted:
            wanted = " or ".join(sorted(str(d) for d in self._accepted))
            raise GradshardError(f"expected a 1-D {wanted} array, got {values.ndim}-D {values.dtype}")
        if self.pos + len(values) > self.numel:
            raise GradshardError(f"writing {len(values)} more elements overflows the layout's {self.numel}")
        for lo in range(0, len(values), self._piece):
            piece = np.ascontiguousarray(values[lo : lo + self._piece])
            if piece.dtype != self.dtype and self._cast is not None:
                cast = self._cast[: len(piece)]
                np.copyto(cast, piece, casting="same_kind")
                piece = cast
            self._out.write(piece)
            self.digests.update(self._chunks.feed(piece))
        self.pos += len(values)

    @classmethod
    def to(cls, store: Store, target: OutputTarget, start: int, layout: ModelLayout, chunk_elems: int,
           capacity: int, accumulate: str) -> RangeWriter:
        """A writer of ``target`` (an :meth:`ObjectUpload.target` that travelled to a function) from ``start``."""
        return cls(store, target.output_key, target.upload_id, target.data_start, start, layout, chunk_elems,
                   target.digest, capacity, accumulate)

    def finish(self) -> dict[int, str]:
        """Flush what the store's writer buffered; the digests of every chunk written."""
        self._out.close()
        return self.digests


def merge_digests(parts: Iterable[Mapping[int, str]]) -> dict[int, str]:
    """Merge the ``{chunk: digest}`` maps that functions returned, for :meth:`ObjectUpload.commit`; a chunk reported
    twice must agree."""
    merged: dict[int, str] = {}
    for part in parts:
        for index, digest in part.items():
            if merged.setdefault(int(index), digest) != digest:
                raise InvocationError(f"two functions wrote chunk {index} with different contents")
    return merged


# --- one process, front to back ---------------------------------------------------------------------------------
def check_encodable(key: str, layout: ModelLayout, flat: npt.NDArray[Any], meta: UpdateMeta, what: str) -> None:
    """Refuse to encode (``what``: int8, top-k) anything but a float32 round's whole flat vector with its digest."""
    if layout.flat_dtype != "float32":
        raise GradshardError(f"{what} updates encode float32 rounds, this layout is {layout.flat_dtype}")
    if flat.shape != (layout.numel,):
        raise GradshardError(f"flat vector has shape {flat.shape}, layout needs ({layout.numel},)")
    if meta.layout_digest != layout.digest():
        raise GradshardError(f"{what} update {key!r}: its metadata's layout digest is not the round layout's")


def publish_encoded(store: Store, key: str, file: ModelLayout, meta: UpdateMeta, chunk_digests: list[str],
                    pieces: Iterable[npt.NDArray[Any]], signer: PrivateKey | None = None) -> UpdateMeta:
    """Write an encoded update atomically: the file's tensors (``file``) are ``pieces`` one after another; its
    digests are the round's chunks' (one per chunk of the round's grid, not of ``file``). Returns ``meta`` with
    them (and its signature)."""
    placeholder = meta.with_checksums(["0" * meta.hex_width] * len(chunk_digests))
    header_len = len(encode_header(file, placeholder.to_metadata(),
                                   _placeholder_signature if meta.signer else None))
    if header_len - 8 > MAX_HEADER_BYTES:
        raise GradshardError(f"the header of {key!r} would be {header_len - 8:,} bytes, over the "
                             f"{MAX_HEADER_BYTES:,} readers accept; use larger chunks")
    upload_id = store.begin_upload(key, header_len + file.nbytes)
    try:
        offset = header_len
        for piece in pieces:
            store.write_at(key, upload_id, offset, piece)
            offset += piece.nbytes
        return publish_header(store, key, upload_id, file, meta.with_checksums(chunk_digests), header_len, signer)
    except BaseException:
        store.abort_upload(key, upload_id)
        raise


def signing_meta(key: str, meta: UpdateMeta, signer: PrivateKey | None) -> UpdateMeta:
    """``meta`` naming ``signer``'s fingerprint (refused for an xxh3 digest), or ``meta`` when unsigned."""
    if signer is None:
        if meta.signer or meta.signature:
            raise GradshardError(f"the metadata of {key!r} names signer {meta.signer[:12]!r} but no private key was "
                                 "given: pass signer=<the private key>")
        return meta
    from gradshard.security.keys import fingerprint
    from gradshard.security.signing import require_cryptographic

    require_cryptographic(meta.digest, f"signing {key!r}")
    return dataclasses.replace(meta, signer=fingerprint(signer), signature="")


class UpdateWriter:
    """Streams a flat vector into a new object from element 0 and publishes it on :meth:`commit`.

    The header is written last, at offset 0, so a 10 GB update is written in one pass with constant memory. Use
    as a context manager: leaving it by an exception, or without commit, aborts the upload.
    """

    def __init__(self, store: Store, key: str, layout: ModelLayout, meta: UpdateMeta,
                 signer: PrivateKey | None = None) -> None:
        self.upload = ObjectUpload.begin(store, key, layout, meta, signer)
        self._range = self.upload.range_writer(0)

    @property
    def key(self) -> str:
        return self.upload.key

    @property
    def upload_id(self) -> str:
        return self.upload.upload_id

    def write(self, values: npt.NDArray[Any]) -> None:
        """Append the next ``len(values)`` elements of the flat vector (1-D, the layout's dtype)."""
        self._range.write(values)

    def commit(self) -> UpdateMeta:
        """Write the header and publish the object; returns the metadata with its digests."""
        if self._range.pos != self.upload.layout.numel:
            raise GradshardError(f"update {self.key!r} got {self._range.pos} of {self.upload.layout.numel} elements")
        return self.upload.commit(self._range.finish())

    def abort(self) -> None:
        self.upload.abort()

    def __enter__(self) -> UpdateWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


def write_update(store: Store, key: str, layout: ModelLayout, flat: npt.NDArray[Any], meta: UpdateMeta, *,
                 signer: PrivateKey | None = None) -> UpdateMeta:
    """Write a whole flat vector as an object (atomically); returns ``meta`` with its chunk digests (and, with
    ``signer``, its signer and signature: the update is signed, see :mod:`gradshard.security.signing`)."""
    if flat.shape != (layout.numel,):
        raise GradshardError(f"flat vector has shape {flat.shape}, layout needs ({layout.numel},)")
    with UpdateWriter(store, key, layout, meta, signer) as writer:
        writer.write(flat)
        return writer.commit()


def update_metadata(layout: ModelLayout, tensors: Mapping[str, Any] | npt.NDArray[Any], *, client: str, round: int,
                    examples: int, base_model: str = "", chunk_elems: int | None = None,
                    digest: DigestName = digests.DEFAULT, coverage: Coverage | None = None,
                    signer: PrivateKey | None = None) -> dict[str, str]:
    """Format-2 metadata for an update the plain safetensors library writes::

        safetensors.torch.save_file(tensors, path, metadata=update_metadata(layout, tensors, client=..., ...))

    ``layout`` is the round's (aggregated) layout. ``tensors`` is exactly what will be saved, by name (numpy
    arrays or torch tensors): every tensor of ``layout`` in its dtype and shape, plus any integer or bool buffers
    (kept: the reader ignores them); or the flat vector of ``layout`` (then save ``layout.unflatten(flat)``).
    Computed here is everything the reader verifies: the layout digest, every chunk's digest and the header digest
    of the file the library writes from these tensors (in the order it stores them, :func:`safetensors_order`), and
    with ``signer`` the signer's fingerprint and the signature (``digest`` must then be blake3 or sha256)."""
    if isinstance(tensors, np.ndarray):
        if tensors.shape != (layout.numel,):
            raise GradshardError(f"flat vector has shape {tensors.shape}, layout needs ({layout.numel},)")
        tensors = layout.unflatten(tensors)
    files = _file_specs(layout, tensors)
    chunk = chunk_elems or checksum.default_chunk_elems(layout.numel)
    grid = checksum.ChunkGrid(layout.numel, chunk)
    stream = checksum.ChunkStream(grid, 0, digest)
    hexes: dict[int, str] = {}
    for spec in layout:
        hexes.update(stream.feed(np.ascontiguousarray(as_numpy(spec.name, tensors[spec.name]).reshape(-1))))
    meta = UpdateMeta(client=check_client_id(client), round=round, examples=examples,
                      layout_digest=layout.digest(), chunk_elems=chunk,
                      checksums=checksum.pack([hexes[i] for i in range(grid.count)]),
                      base_model=base_model, digest=digest, coverage=coverage)
    meta = signing_meta(f"{client}'s update", meta, signer)
    header = _header(safetensors_order(files), meta.to_metadata(),
                     signer_for(meta, signer) if signer is not None else None)
    if len(json.dumps(header, separators=(",", ":"))) > MAX_HEADER_BYTES:  # readers would refuse the file
        raise GradshardError(f"the header of {client!r}'s update would be over the {MAX_HEADER_BYTES:,} bytes "
                             "readers accept; use fewer tensors or larger chunks")
    return dict(header["__metadata__"])


def _file_specs(layout: ModelLayout, tensors: Mapping[str, Any]) -> list[TensorSpec]:
    """The specs of the tensors to be saved, checked against ``layout``: its tensors exactly, the rest kept buffers."""
    given = {name: TensorSpec(name, tuple(int(d) for d in t.shape), tensor_dtype(name, t))
             for name, t in tensors.items()}
    for spec in layout:
        found = given.get(spec.name)
        if found is None:
            raise LayoutError(f"tensor {spec.name!r} of the layout is missing from the tensors to save")
        if found != spec:
            hint = " (bfloat16 tensors are saved as float32: tensor.float())" if found.dtype == "bfloat16" else ""
            raise LayoutError(f"tensor {spec.name!r} is {found.dtype} {found.shape}, the layout says {spec.dtype} "
                              f"{spec.shape}{hint}")
    names = {spec.name for spec in layout}
    floating = [s.name for s in given.values() if s.name not in names and s.is_floating]
    if floating:
        raise LayoutError(f"floating tensors {floating[:5]} are not in the layout; only integer and bool buffers "
                          "may be saved besides it")
    return list(given.values())
