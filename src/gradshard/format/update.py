"""The update object: one safetensors file per client per round, and how it is read and verified.

Layout on the wire (plain safetensors, readable by the ``safetensors`` library)::

    u64 header length | JSON header (tensors + "__metadata__") | data: tensors in layout order

Because the tensors are written in the layout's order with one dtype, the data section *is* the flat update
vector, and any element range is one byte range. Files written by the plain safetensors library (which orders
tensors its own way) are accepted too: the reader maps a flat range to the byte ranges of the tensors it touches
(:func:`gradshard.format.writer.update_metadata` computes their metadata). Integer and boolean tensors the round's
layout does not name — a model's kept buffers, such as BatchNorm's ``num_batches_tracked`` — may be in the file as
well: they are covered by the header digest and otherwise ignored (the server keeps its own values).

Metadata (all strings, keys prefixed ``gradshard.``): ``format`` (``2``; ``1`` is still read), ``kind``,
``client``, ``round``, ``examples``, ``base_model``, ``layout`` (digest of the aggregated layout), ``checksum``
(the chunk digest algorithm: ``xxh3_64``, ``blake3`` or ``sha256``), ``chunk_elems``, ``checksums`` (every chunk's
digest, fixed-width hex, concatenated), optionally ``coverage``, and in format 2 ``header_digest``: the sha256 of
the canonical JSON of the parsed header without that field and ``signature`` (:func:`header_digest`), so a changed
bit anywhere in the header is found before any metadata is trusted. A signed update adds ``signer`` (the key's
fingerprint, 64 hex digits) and ``signature`` (128 hex digits, over the header digest and the chunk digests:
:mod:`gradshard.security.signing`); older readers ignore both. Writing lives in :mod:`gradshard.format.writer`.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import itertools
import json
import math
import re
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Self

import numpy as np
import numpy.typing as npt

from gradshard.core import checksum, digests
from gradshard.core.digests import DigestName
from gradshard.core.layout import UPDATE_DTYPES, ModelLayout, TensorSpec, numpy_dtype, safetensors_dtype
from gradshard.core.reduce import MAX_EXAMPLES
from gradshard.errors import GradshardError, UnsafeObjectError, UpdateError
from gradshard.store import ObjectReader, Store
from gradshard.store.base import as_bytes

FORMAT_VERSION = "2"
READABLE_FORMATS = ("1", "2")  # format 1: xxh3_64 chunk checksums, no header digest
# A header of 100,000 tensors with 64-character names and 4-d shapes takes ~17 MB, 4096 chunk digests of 64 hex
# digits 256 KiB: 32 MiB leaves room for both (the safetensors library itself allows 100 MiB). Parsing is bounded by
# it, and the nesting depth is checked before parsing (an update's header nests 3 levels: header, tensor, shape).
MAX_HEADER_BYTES = 32 * 1024 * 1024
MAX_JSON_DEPTH = 8
MAX_COVERAGE_BYTES = 64 * 1024
_P = "gradshard."
HEADER_DIGEST_KEY = f"{_P}header_digest"
COVERAGE_KEY = f"{_P}coverage"
COMPACT_KEY = f"{_P}compact"  # "1": the data is only the covered elements (gradshard.format.compact)
ENCODING_KEY = f"{_P}encoding"  # how the values are stored: "int8" (format.quantized), "topk" (format.sparse)
ENCODINGS = ("", "int8", "topk", "secagg")  # "": the layout's dtype, every element
TOPK_COUNTS_KEY = f"{_P}topk_counts"  # a topk update's pointer table (gradshard.format.sparse)
SIGNER_KEY = f"{_P}signer"  # the signing key's fingerprint: 64 hex digits (gradshard.security.keys.fingerprint)
SIGNATURE_KEY = f"{_P}signature"  # the Ed25519 signature: 128 hex digits (gradshard.security.signing)
SIGNER_HEX, SIGNATURE_HEX = 64, 128
_UNSIGNED = (HEADER_DIGEST_KEY, SIGNATURE_KEY)  # what the header digest leaves out
Coverage = dict[str, tuple[int, ...]]


# --- the header digest -------------------------------------------------------------------------------------------
def canonical_header(header: Mapping[str, Any]) -> bytes:
    """The canonical encoding of a parsed header without ``gradshard.header_digest`` and ``gradshard.signature``
    (the signature covers the header digest): sorted keys, no spaces.

    Padding, key order and JSON formatting do not change it, so a file the plain safetensors library wrote
    (other key order, other padding) verifies as well as one of ours."""
    body = dict(header)
    metadata = body.get("__metadata__")
    if isinstance(metadata, Mapping):
        body["__metadata__"] = {k: v for k, v in metadata.items() if k not in _UNSIGNED}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def header_digest(header: Mapping[str, Any]) -> str:
    """The value of ``gradshard.header_digest`` for a parsed header (sha256, 64 hex digits)."""
    return hashlib.sha256(canonical_header(header)).hexdigest()


# --- coverage ----------------------------------------------------------------------------------------------------
def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` refusing duplicate keys (JSON parsers disagree on which one wins)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))  # type: ignore[func-returns-value]
        raise ValueError(f"duplicate key {duplicate!r}")
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    """``parse_float`` refusing numbers that overflow to inf (they have no canonical encoding)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} overflows")
    return value


_BRACKET_STEP = np.zeros(256, dtype=np.int32)
_BRACKET_STEP[[ord("["), ord("{")]] = 1
_BRACKET_STEP[[ord("]"), ord("}")]] = -1
_QUOTE, _BACKSLASH = ord('"'), ord("\\")
# 64 KiB blocks: the scan's int32 temporaries stay near 2 MiB (a shard function scans N headers, up to 32 MiB each)
_DEPTH_BLOCK = 1 << 16
# Text this short without backslashes is scanned in one pass of C-speed byte operations (see json_depth)
_DEPTH_SHORT = 1 << 20
_STRING = re.compile(rb'"[^"]*"')
_NOT_BRACKET = bytes(c for c in range(256) if c not in b"[]{}")


class _TooDeep(ValueError):
    pass


def json_depth(text: bytes, limit: int) -> int:
    """How deep arrays and objects nest in the UTF-8 JSON ``text`` (brackets inside strings do not count), or
    ``limit + 1`` as soon as it is deeper than ``limit``.

    A linear scan made before parsing (numpy, blocks of 64 KiB, no recursion): ``json.loads`` recurses once per
    level and raises ``RecursionError`` at a few thousand. A quote preceded by an odd run of backslashes is escaped.
    For invalid JSON the count is exact up to the first error, the only part a parser descends into."""
    if len(text) <= _DEPTH_SHORT and b"\\" not in text and text.count(b'"') % 2 == 0:
        # no escapes and balanced quotes (every header we write): each string is a "..." pair, so removing the
        # pairs leaves exactly the brackets outside strings
        brackets = _STRING.sub(b"", text).translate(None, _NOT_BRACKET)
        levels = np.cumsum(_BRACKET_STEP[np.frombuffer(brackets, np.uint8)], dtype=np.int64)
        deepest = max(0, int(levels.max())) if len(levels) else 0
        return deepest if deepest <= limit else limit + 1
    return _json_depth_scan(text, limit)


def _json_depth_scan(text: bytes, limit: int) -> int:
    """:func:`json_depth` for any text: escapes and unterminated strings tracked block by block."""
    data = np.frombuffer(text, np.uint8)
    depth = deepest = 0
    in_string, backslashes = 0, 0  # carried across blocks: inside a string?, the backslash run ending the block
    for offset in range(0, len(data), _DEPTH_BLOCK):
        block = data[offset : offset + _DEPTH_BLOCK]
        index = np.arange(len(block), dtype=np.int32)
        last_other = np.maximum.accumulate(np.where(block == _BACKSLASH, -1, index))
        run = index - last_other + np.where(last_other < 0, np.int32(backslashes), np.int32(0))  # backslash run
        before = np.concatenate(([backslashes], run[:-1]))
        quotes = (block == _QUOTE) & (before % 2 == 0)
        inside = (np.cumsum(quotes, dtype=np.int32) + in_string) % 2
        levels = np.cumsum(_BRACKET_STEP[block] * (inside == 0), dtype=np.int32) + depth
        deepest, depth = max(deepest, int(levels.max())), int(levels[-1])
        if deepest > limit:
            return limit + 1
        in_string, backslashes = int(inside[-1]), int(run[-1])
    return deepest


def _loads(text: str | bytes | bytearray) -> Any:
    """Strict JSON: UTF-8, nested at most :data:`MAX_JSON_DEPTH` levels, no duplicate keys, no NaN/Infinity, no
    overflowing numbers. Raises ``ValueError`` (``_TooDeep`` for the depth)."""
    if isinstance(text, str):
        raw, decoded = text.encode("utf-8", "surrogatepass"), text
    else:
        raw = bytes(text)
        decoded = raw.decode("utf-8")  # strict: json.loads would guess UTF-16 or UTF-32 from null bytes
    if json_depth(raw, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise _TooDeep(f"nested deeper than {MAX_JSON_DEPTH} levels of arrays and objects")
    return json.loads(decoded, object_pairs_hook=_unique_pairs, parse_constant=_reject_constant,
                      parse_float=_finite_float)


def _coverage_problem(coverage: Mapping[str, Any]) -> str | None:
    for name, extents in coverage.items():
        if not isinstance(name, str):
            return f"tensor name {name!r} is not a string"
        if not isinstance(extents, list | tuple) or not all(type(x) is int and x >= 0 for x in extents):
            return f"tensor {name!r}: expected a list of integers >= 0 (leading extent per dimension), got {extents!r}"
    return None


def encode_coverage(coverage: Mapping[str, Sequence[int]]) -> str:
    """The compact JSON stored as ``gradshard.coverage``: ``{"tensor": [leading extent per dim], ...}``."""
    problem = _coverage_problem(coverage)
    if problem is not None:
        raise GradshardError(f"invalid coverage: {problem}")
    text = json.dumps({k: list(v) for k, v in coverage.items()}, separators=(",", ":"))
    if len(text.encode()) > MAX_COVERAGE_BYTES:
        raise GradshardError(f"coverage is {len(text.encode())} bytes of JSON, at most {MAX_COVERAGE_BYTES} fit")
    return text


def parse_coverage(client: str, text: str) -> Coverage:
    """Parse ``gradshard.coverage`` structurally (an object of tensor name -> list of ints >= 0, at most 64 KiB).

    Whether the names and extents fit the round's layout is checked where the layout is known."""
    size = len(text.encode())
    if size > MAX_COVERAGE_BYTES:
        raise UpdateError(client, f"metadata field '{COVERAGE_KEY}' is {size} bytes, at most {MAX_COVERAGE_BYTES}")
    try:
        value = _loads(text)
    except ValueError as exc:
        raise UpdateError(client, f"metadata field '{COVERAGE_KEY}' is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UpdateError(client, f"metadata field '{COVERAGE_KEY}' must be a JSON object of tensor name -> "
                                  f"list of extents, got {type(value).__name__}")
    problem = _coverage_problem(value)
    if problem is not None:
        raise UpdateError(client, f"metadata field '{COVERAGE_KEY}': {problem}")
    return {name: tuple(extents) for name, extents in value.items()}


# --- metadata ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UpdateMeta:
    """What an update says about itself. ``digest`` is the chunk digest algorithm of ``checksums``."""

    client: str
    round: int
    examples: int
    layout_digest: str
    chunk_elems: int
    checksums: str = ""
    base_model: str = ""
    kind: str = "update"
    extra: Mapping[str, str] = field(default_factory=dict)
    digest: DigestName = digests.DEFAULT
    coverage: Coverage | None = None
    signer: str = ""  # fingerprint of the key that signed it ("" unsigned); see gradshard.security.signing
    signature: str = ""  # hex of the Ed25519 signature, set at commit
    compact: bool = False  # the data holds only the covered elements (gradshard.format.compact)
    encoding: str = ""  # "int8" (gradshard.format.quantized), "topk" (gradshard.format.sparse); "": plain
    topk_counts: str = ""  # "topk": the pointer table, base64 of one little-endian uint32 per chunk

    def __post_init__(self) -> None:
        digests.algorithm(self.digest)  # refuse unknown algorithms before anything is written
        if self.encoding not in ENCODINGS:
            raise GradshardError(f"update of client {self.client!r}: unknown encoding {self.encoding[:20]!r}; "
                                 "known: int8, topk, secagg")
        if (self.encoding == "topk") != bool(self.topk_counts):
            raise GradshardError(f"update of client {self.client!r}: a topk update carries its pointer table "
                                 "(topk_counts), and only a topk update does")
        if self.encoding and (self.compact or self.coverage is not None):
            raise GradshardError(f"update of client {self.client!r}: an {self.encoding} update covers the whole "
                                 "model (no coverage, not compact)")
        if self.compact and self.coverage is None:
            raise GradshardError(f"compact update of client {self.client!r} needs a coverage (the elements it "
                                 "holds)")
        if self.kind == "update" and not 1 <= self.examples <= MAX_EXAMPLES:
            raise GradshardError(f"update of client {self.client!r}: examples must be between 1 and {MAX_EXAMPLES} "
                                 f"(the most one client may report per round), got {self.examples}")
        if self.coverage is not None:
            encode_coverage(self.coverage)
            object.__setattr__(self, "coverage", {k: tuple(v) for k, v in self.coverage.items()})

    @property
    def hex_width(self) -> int:
        return digests.algorithm(self.digest).hex_width

    def with_checksums(self, hexes: list[str]) -> UpdateMeta:
        return dataclasses.replace(self, checksums=checksum.pack(hexes))

    def to_metadata(self) -> dict[str, str]:
        """The format-2 metadata strings, without ``header_digest`` (the writer adds it over the whole header)."""
        md = {f"{_P}format": FORMAT_VERSION, f"{_P}kind": self.kind, f"{_P}client": self.client,
              f"{_P}round": str(self.round), f"{_P}examples": str(self.examples),
              f"{_P}base_model": self.base_model, f"{_P}layout": self.layout_digest,
              f"{_P}checksum": self.digest, f"{_P}chunk_elems": str(self.chunk_elems),
              f"{_P}checksums": self.checksums}
        if self.coverage is not None:
            md[COVERAGE_KEY] = encode_coverage(self.coverage)
        if self.compact:
            md[COMPACT_KEY] = "1"
        if self.encoding:
            md[ENCODING_KEY] = self.encoding
        if self.topk_counts:
            md[TOPK_COUNTS_KEY] = self.topk_counts
        if self.signer:
            md[SIGNER_KEY] = self.signer
        if self.signature:
            md[SIGNATURE_KEY] = self.signature
        md.update({f"{_P}x.{k}": v for k, v in self.extra.items()})
        return md

    @classmethod
    def from_metadata(cls, client: str, md: Mapping[str, str]) -> UpdateMeta:
        """Parse and validate (format 1 or 2); errors name ``client`` (the client the object is filed under)."""

        def need(name: str) -> str:
            value = md.get(_P + name)
            if value is None:
                raise UpdateError(client, f"metadata field '{_P}{name}' is missing")
            return value

        def positive_int(name: str, minimum: int, maximum: int | None = None, why: str = "") -> int:
            raw = need(name)
            try:
                value = int(raw)  # at most 4300 digits (Python's limit), or ValueError
            except ValueError:
                raise UpdateError(client, f"metadata field '{_P}{name}' is not an integer: {raw[:40]!r}") from None
            if value < minimum:
                raise UpdateError(client, f"metadata field '{_P}{name}' must be >= {minimum}, got {value}")
            if maximum is not None and value > maximum:
                shown = raw if len(raw) <= 20 else f"{raw[:8]}... ({len(raw)} digits)"
                raise UpdateError(client, f"metadata field '{_P}{name}' must be <= {maximum}{why}, got {shown}")
            return value

        version, algorithm = need("format"), need("checksum")
        if version not in READABLE_FORMATS:
            raise UpdateError(client, f"unsupported update format {version!r} (expected "
                                      f"{' or '.join(READABLE_FORMATS)})")
        allowed = (digests.DEFAULT,) if version == "1" else digests.NAMES
        if algorithm not in allowed:
            expected = allowed[0] if len(allowed) == 1 else f"one of {', '.join(allowed)}"
            raise UpdateError(client, f"unsupported checksum {algorithm!r} for format {version} (expected "
                                      f"{expected})")
        coverage = parse_coverage(client, md[COVERAGE_KEY]) if COVERAGE_KEY in md else None
        compact = md.get(COMPACT_KEY)
        if compact is not None and (compact != "1" or coverage is None):
            raise UpdateError(client, f"metadata field '{COMPACT_KEY}' must be \"1\" and come with "
                                      f"'{COVERAGE_KEY}' (the elements a compact update holds), got {compact[:8]!r}")
        encoding, topk_counts = md.get(ENCODING_KEY, ""), md.get(TOPK_COUNTS_KEY, "")
        if (encoding == "topk") != bool(topk_counts):
            raise UpdateError(client, f"metadata field '{TOPK_COUNTS_KEY}' (the pointer table) goes with encoding "
                                      "\"topk\", and only with it")
        if encoding not in ENCODINGS or (encoding and coverage is not None):
            raise UpdateError(client, f"metadata field '{ENCODING_KEY}' must be one of {ENCODINGS[1:]} on an update "
                                      f"of the whole model (no coverage), got {encoding[:8]!r}")
        extra = {k.removeprefix(_P + "x."): v for k, v in md.items() if k.startswith(_P + "x.")}
        kind = need("kind")
        signer, signature = _parse_signature(client, md)
        # an update's count is bounded (its weight must stay exact); an aggregate's is the sum of its clients'
        examples = positive_int("examples", 1, *((MAX_EXAMPLES, " (the most one client may report per round)")
                                                 if kind == "update" else ()))
        return cls(client=need("client"), round=positive_int("round", 0), examples=examples,
                   layout_digest=need("layout"), chunk_elems=positive_int("chunk_elems", 1),
                   checksums=need("checksums"), base_model=need("base_model"), kind=kind, extra=extra,
                   digest=digests.algorithm(algorithm).name, coverage=coverage, signer=signer,
                   signature=signature, compact=compact is not None, encoding=encoding,
                   topk_counts=topk_counts)

    @property
    def signed(self) -> bool:
        return bool(self.signer)


def _is_hex(text: str, width: int) -> bool:
    return len(text) == width and all(c in "0123456789abcdef" for c in text)


def _parse_signature(client: str, md: Mapping[str, str]) -> tuple[str, str]:
    """``(signer, signature)`` checked structurally (fixed-width lowercase hex, both or neither); ("", "") when the
    update is unsigned. Whether the signature verifies is decided where the registry is known."""
    signer, signature = md.get(SIGNER_KEY), md.get(SIGNATURE_KEY)
    if signer is None and signature is None:
        return "", ""
    if signer is None or signature is None:
        missing = SIGNER_KEY if signer is None else SIGNATURE_KEY
        raise UpdateError(client, f"metadata has a signer or a signature but not both ('{missing}' is missing)")
    if not _is_hex(signer, SIGNER_HEX):
        raise UpdateError(client, f"metadata field '{SIGNER_KEY}' must be {SIGNER_HEX} lowercase hex digits (a key "
                                  f"fingerprint), got {signer[:20]!r}")
    if not _is_hex(signature, SIGNATURE_HEX):
        raise UpdateError(client, f"metadata field '{SIGNATURE_KEY}' must be {SIGNATURE_HEX} lowercase hex digits, "
                                  f"got {signature[:20]!r}")
    return signer, signature


# --- reading -----------------------------------------------------------------------------------------------------
class Validated(NamedTuple):
    """What a round's validation recorded of a full-size update for the functions that reopen it: the object's
    size and its data's byte runs (see :meth:`UpdateReader.runs`)."""

    size: int
    runs: tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # byte offset inside the data section
    end: int


@dataclass(frozen=True)
class UpdateHeader:
    """A parsed, structurally valid safetensors header and where the data section starts."""

    key: str
    data_start: int
    object_size: int
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    sha256: str  # of the raw header bytes: identifies the object version
    format: str = FORMAT_VERSION
    header_verified: bool = False  # its header digest was checked (format 2); format 1 has none
    # the layout whose tensor table this header is, entry for entry and in layout order, if it was read as one
    shaped_as: ModelLayout | None = field(default=None, compare=False, repr=False)


class _Itemsizes(dict[str, int]):
    """numpy dtype name -> bytes per element, looked up once per dtype."""

    def __missing__(self, dtype: str) -> int:
        self[dtype] = np.dtype(dtype).itemsize
        return self[dtype]


_ITEMSIZE = _Itemsizes()


def _parse_tensors(client: str, header: dict[str, Any]) -> dict[str, TensorEntry]:
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = numpy_dtype(info["dtype"])
            shape = tuple(map(int, info["shape"]))
            begin, end = map(int, info["data_offsets"])
        except (KeyError, TypeError, ValueError, GradshardError) as exc:
            raise UpdateError(client, f"header entry for tensor {name!r} is malformed: {exc}") from None
        if (shape and min(shape) < 0) or end - begin != math.prod(shape) * _ITEMSIZE[dtype]:
            raise UpdateError(client, f"tensor {name!r}: data_offsets [{begin}, {end}) do not fit shape {shape}")
        entries[name] = TensorEntry(dtype, shape, begin, end)
    covered = 0
    for entry in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if entry.begin != covered:
            raise UpdateError(client, f"header data offsets leave a gap or overlap at byte {covered}")
        covered = entry.end
    return entries


def tensor_table(specs: Iterable[TensorSpec]) -> dict[str, dict[str, Any]]:
    """The safetensors header entries of tensors stored one after another in the order of ``specs``."""
    table: dict[str, dict[str, Any]] = {}
    offset = 0
    for spec in specs:
        table[spec.name] = {"dtype": safetensors_dtype(spec.dtype), "shape": list(spec.shape),
                            "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    return table


def _layout_entries(layout: ModelLayout) -> tuple[dict[str, dict[str, Any]], dict[str, TensorEntry]]:
    """``layout``'s header entries in layout order (what gradshard's writer stores), raw and parsed (built once per
    layout object)."""
    return layout.memo("safetensors_entries", _build_layout_entries)


def _build_layout_entries(layout: ModelLayout) -> tuple[dict[str, dict[str, Any]], dict[str, TensorEntry]]:
    table = tensor_table(layout)
    entries = {spec.name: TensorEntry(spec.dtype, spec.shape, *table[spec.name]["data_offsets"]) for spec in layout}
    return table, entries


def _is_layout_table(header: Mapping[str, Any], layout: ModelLayout | None) -> bool:
    """Whether the header's tensor table is exactly ``layout``'s in layout order (one comparison of the parsed JSON)."""
    if layout is None:
        return False
    table = _layout_entries(layout)[0]
    if len(header) - ("__metadata__" in header) != len(table) or not all(
            header.get(name) == entry for name, entry in table.items()):
        return False
    # equal, and encoded alike: JSON's true or 1.0 equals 1 in Python but is not the same header bytes
    entries = [header[name] for name in table]
    kinds = set(map(type, itertools.chain.from_iterable(e["shape"] for e in entries)))
    kinds.update(map(type, itertools.chain.from_iterable(e["data_offsets"] for e in entries)))
    return kinds <= {int}


_METADATA_OPEN = b'{"__metadata__":'


def _layout_shaped(raw: bytes | bytearray, layout: ModelLayout | None) -> bytes | None:
    """The bytes of the ``__metadata__`` value when ``raw`` is ``{"__metadata__":<value>`` followed by ``layout``'s
    tensor table exactly as gradshard's writer encodes it (and the space padding), else None.

    The table is then known without parsing it: the header is valid JSON with that table if and only if the value
    alone is (a complete JSON value between a key and a comma), and no tensor is named ``__metadata__``. (When the
    value alone is not valid JSON the caller parses the whole header, for the error it would give.)"""
    if layout is None or not raw.startswith(_METADATA_OPEN):
        return None
    tail = layout.memo("header_tail", _header_tail)
    end = len(raw.rstrip(b" "))
    if tail is None or end - len(tail) <= len(_METADATA_OPEN) or not raw.endswith(tail, 0, end):
        return None
    return bytes(raw[len(_METADATA_OPEN) : end - len(tail)])


def _header_tail(layout: ModelLayout) -> bytes | None:
    """What follows the metadata in a header of ``layout`` written by gradshard: ``,<tensor table>}``."""
    table = _layout_entries(layout)[0]
    if not table or "__metadata__" in table:
        return None  # no table: "{...}," would end in a comma JSON does not allow
    return b"," + json.dumps(table, separators=(",", ":")).encode()[1:]


def _canonical_table(layout: ModelLayout) -> tuple[list[str], list[str]]:
    """``layout``'s tensor entries as they appear in a canonical header: sorted names and their ``"name":{...}``
    encodings (built once per layout object)."""
    def build(layout: ModelLayout) -> tuple[list[str], list[str]]:
        table = _layout_entries(layout)[0]
        names = sorted(table)
        return names, [json.dumps(name) + ":" + json.dumps(table[name], sort_keys=True, separators=(",", ":"))
                       for name in names]

    return layout.memo("canonical_table", build)


def layout_header_digest(metadata: Mapping[str, str], layout: ModelLayout) -> str:
    """:func:`header_digest` of a header whose tensor table is ``layout``'s, from its metadata alone: the table's
    canonical encoding is made once per layout, so only the metadata is encoded per header (the same bytes as
    :func:`canonical_header`, tested)."""
    names, parts = _canonical_table(layout)
    signed = {k: v for k, v in metadata.items() if k not in _UNSIGNED}
    at = bisect.bisect_left(names, "__metadata__")
    middle = ['"__metadata__":' + json.dumps(signed, sort_keys=True, separators=(",", ":"), allow_nan=False)]
    body = "{" + ",".join([*parts[:at], *middle, *parts[at:]]) + "}"
    return hashlib.sha256(body.encode()).hexdigest()


def read_header(reader: ObjectReader, key: str, client: str, trusted_sha256: str | None = None, *,
                trusted_size: int | None = None, layout: ModelLayout | None = None) -> UpdateHeader:
    """Read and structurally validate the header of the object ``key`` (filed for ``client``).

    ``trusted_sha256``: the sha256 of the raw header bytes as the round's validation found them (the manifest's
    ``header_sha256``). Bytes that hash to it were already depth-checked and digest-verified, so a function that
    reopens the object only compares the hash (a changed header is refused at once) and parses it.

    ``layout``: the layout the object is expected to have; a header whose tensor table is exactly that layout's in
    layout order is read without parsing entry by entry (any other table is parsed and checked in full)."""
    if reader.size < 8:
        raise UpdateError(client, f"object {key!r} is truncated: {reader.size} bytes, too short for a header")
    prefix = bytearray(8)
    reader.read_into(0, memoryview(prefix))
    (n,) = struct.unpack("<Q", prefix)
    if n > MAX_HEADER_BYTES:
        raise UpdateError(client, f"object {key!r} has a header length of {n} bytes, over the maximum of "
                                  f"{MAX_HEADER_BYTES} (enough for 100,000 tensors): it is not an update or it is "
                                  "corrupted")
    if 8 + n > reader.size:
        raise UpdateError(client, f"object {key!r} is truncated or not safetensors: header length {n} "
                                  f"but the object has {reader.size} bytes")
    raw = bytearray(n)
    reader.read_into(8, memoryview(raw))
    sha256 = hashlib.sha256(raw).hexdigest()
    trusted = trusted_sha256 is not None
    if trusted and sha256 != trusted_sha256:
        raise UpdateError(client, "object changed since the round was validated (header differs)")
    metadata_text = _layout_shaped(raw, layout)
    header: Any = None
    if metadata_text is not None:  # the table is byte for byte the layout's: only the metadata is parsed
        try:
            metadata = json.loads(metadata_text) if trusted else _loads(metadata_text)
        except ValueError:
            metadata_text = None  # parsed whole below, for its own error
    try:
        if metadata_text is None:
            header = json.loads(raw) if trusted else _loads(raw)
    except _TooDeep as exc:
        raise UpdateError(client, f"object {key!r} has a header {exc} (an update's header nests 3): it is not an "
                                  "update or it is corrupted") from None
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError included
        raise UpdateError(client, f"object {key!r} has a header that is not valid JSON: {exc}") from None
    if header is not None:
        if not isinstance(header, dict):
            raise UpdateError(client, f"object {key!r} has a header that is not a JSON object")
        metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UpdateError(client, "header '__metadata__' must map strings to strings")
    # a table that is exactly the layout's is read, and its digest computed, from the layout's cached forms
    as_layout = metadata_text is not None or (not (trusted and trusted_size is not None)
                                               and _is_layout_table(header, layout)
                                               and "__metadata__" in header)
    verified = (metadata.get(HEADER_DIGEST_KEY) is not None if trusted
                else verify_header_digest(header, metadata, key, client, layout if as_layout else None))
    if trusted and trusted_size is not None:
        # the validation parsed these bytes' tensor entries and recorded the object's size and byte runs: a
        # function that was handed them skips the per-tensor parse (the bulk of opening a many-tensor update)
        if reader.size != trusted_size:
            raise UpdateError(client, f"object changed since the round was validated (size {reader.size}, "
                                      f"validated {trusted_size})")
        return UpdateHeader(key, 8 + n, reader.size, {}, metadata, sha256, metadata.get(f"{_P}format", ""),
                            verified)
    tensors = dict(_layout_entries(layout)[1]) if as_layout and layout is not None else \
        _parse_tensors(client, header)
    data_len = max((e.end for e in tensors.values()), default=0)
    expected = 8 + n + data_len
    if reader.size < expected:
        raise UpdateError(client, f"object {key!r} is truncated: {reader.size} bytes, header promises {expected}")
    if reader.size > expected:
        raise UpdateError(client, f"object {key!r} has {reader.size - expected} unexpected trailing bytes")
    return UpdateHeader(key, 8 + n, reader.size, tensors, metadata, sha256,
                        metadata.get(f"{_P}format", ""), verified, layout if as_layout else None)


def verify_header_digest(header: Mapping[str, Any], metadata: Mapping[str, str], key: str, client: str,
                         layout: ModelLayout | None = None) -> bool:
    """Check ``gradshard.header_digest`` against the parsed header; False for a format-1 object (it has none).
    ``layout``: the header's tensor table is known to be exactly that layout's (the digest is then computed from the
    metadata and the layout's cached canonical table).

    Any object that carries a digest is checked, whatever its format field says; an object without one is
    accepted only if it says format 1, so removing or renaming the digest field is caught as well."""
    stored = metadata.get(HEADER_DIGEST_KEY)
    if stored is None:
        version = metadata.get(f"{_P}format")
        if version is None or version == "1":
            return False  # format 1, or no gradshard metadata at all (UpdateMeta says which field is missing)
        raise UpdateError(client, f"header digest missing: object {key!r} says format {version!r} but has no "
                                  f"'{HEADER_DIGEST_KEY}'; rewrite it with gradshard.format.writer")
    computed = header_digest(header) if layout is None else layout_header_digest(metadata, layout)
    if stored != computed:
        raise UpdateError(client, f"header digest mismatch: object {key!r} records {stored[:16]!r}, its header "
                                  f"hashes to {computed[:16]!r}: the header (metadata or tensor table) was altered "
                                  "after it was written")
    return True


def _is_kept(dtype: str) -> bool:
    """Whether a tensor of ``dtype`` is a kept buffer (integer or bool), never averaged."""
    return not np.issubdtype(np.dtype(dtype), np.floating)


def check_layout(client: str, header: UpdateHeader, layout: ModelLayout) -> None:
    """Raise :class:`UpdateError` naming the first tensor that differs from the round's layout.

    Integer and bool tensors the layout does not name (kept buffers) are allowed and ignored."""
    if header.shaped_as is layout:
        return  # the header's table was found to be exactly the layout's
    missing = [t.name for t in layout if t.name not in header.tensors]
    names = {t.name for t in layout}
    extra = sorted(n for n, e in header.tensors.items() if n not in names and not _is_kept(e.dtype))
    if missing or extra:
        raise UpdateError(client, f"wrong layout: missing tensors {missing[:5]}, unexpected tensors {extra[:5]}")
    for spec in layout:
        entry = header.tensors[spec.name]
        if entry.dtype != spec.dtype:
            raise UpdateError(client, f"wrong dtype: tensor {spec.name!r} is {entry.dtype}, the round expects "
                                      f"{spec.dtype}")
        if entry.shape != spec.shape:
            raise UpdateError(client, f"wrong layout: tensor {spec.name!r} has shape {entry.shape}, the round "
                                      f"expects {spec.shape}")


def byte_runs(header: UpdateHeader, layout: ModelLayout) -> list[list[int]]:
    """Where each element range of ``layout`` lies in the object: ``[flat start, flat stop, file offset]`` runs,
    merged where the file stores tensors in layout order (one run for a gradshard-written file)."""
    if header.shaped_as is layout:
        return [[start, stop, header.data_start + offset] for start, stop, offset in layout.memo("byte_runs", _runs)]
    return _runs(layout, header.data_start, header.tensors)


def _runs(layout: ModelLayout, data_start: int = 0, tensors: Mapping[str, TensorEntry] | None = None) \
        -> list[list[int]]:
    """:func:`byte_runs` of tensors at ``tensors``' offsets (default: the layout's own table) after ``data_start``."""
    if tensors is None:
        tensors = _layout_entries(layout)[1]
    itemsize = np.dtype(layout.flat_dtype).itemsize
    runs: list[list[int]] = []
    for slot in layout.slots:
        offset = data_start + tensors[slot.spec.name].begin
        if runs and runs[-1][1] == slot.start and runs[-1][2] + (slot.start - runs[-1][0]) * itemsize == offset:
            runs[-1][1] = slot.stop
        elif slot.stop > slot.start:
            runs.append([slot.start, slot.stop, offset])
    return runs


class VerifiedObject:
    """What every reader of a validated update holds (full-size, compact, int8): the object, its validated header's
    identity (sha256, whether its digest was checked, the digest a signature covers), the round's layout and chunk
    grid, and one stored digest per chunk. Keeps no parsed header (one dict per tensor): a shard function holds one
    reader per client, and its memory must not grow with N times the number of tensors."""

    def __init__(self, reader: ObjectReader, header: UpdateHeader, layout: ModelLayout, meta: UpdateMeta) -> None:
        self.client = meta.client
        self.reader, self.layout, self.meta = reader, layout, meta
        self.sha256, self.object_size = header.sha256, header.object_size
        # ``header_verified``: whether the header's digest was checked (format 2); a format-1 object has none
        self.format, self.header_verified = header.format, header.header_verified
        # the header digest this reader's header was verified against ("" if none): what a signature covers
        self.header_digest = header.metadata.get(HEADER_DIGEST_KEY, "") if header.header_verified else ""
        self.dtype = np.dtype(layout.flat_dtype)
        self.grid = checksum.ChunkGrid(layout.numel, meta.chunk_elems)
        self._width = meta.hex_width
        if len(meta.checksums) != self.grid.count * self._width:
            raise UpdateError(self.client, f"checksums do not match the layout: {self.grid.count} chunks need "
                                           f"{self.grid.count * self._width} hex digits, got "
                                           f"{len(meta.checksums)}")

    def checksum_of(self, index: int) -> str:
        """The stored digest of chunk ``index`` (sliced from the packed metadata string)."""
        return self.meta.checksums[index * self._width : (index + 1) * self._width]

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EncodedReader(VerifiedObject):
    """A reader of an encoded update (block-wise int8, top-k): decodes one verified chunk at a time into the round's
    dtype (:meth:`read_chunk`); counts the encoded bytes it read."""

    def __init__(self, reader: ObjectReader, header: UpdateHeader, layout: ModelLayout, meta: UpdateMeta) -> None:
        super().__init__(reader, header, layout, meta)
        self.algorithm = digests.algorithm(meta.digest)
        self.bytes_read = 0

    def read_chunk(self, index: int, out: npt.NDArray[Any]) -> None:
        """Read, verify and decode chunk ``index`` into ``out`` (the chunk's length)."""
        raise NotImplementedError

    def expect(self, start: int, stop: int) -> None:
        """Announce a chunk-aligned range read front to back (one streamed GET per byte range on S3)."""

    def read_verified(self, start: int, stop: int, out: npt.NDArray[Any]) -> None:
        """Fill ``out`` with the decoded elements of chunk-aligned ``[start, stop)``, every chunk verified."""
        if not self.grid.is_aligned(start, stop):
            raise GradshardError(f"verified reads must be chunk-aligned, got [{start}, {stop})")
        for index in self.grid.covering(start, stop):
            a, b = self.grid.bounds(index)
            self.read_chunk(index, out[a - start : b - start])


class UpdateReader(VerifiedObject):
    """Ranged, checksum-verified reads of one validated update, in flat (layout) element coordinates."""

    def __init__(self, reader: ObjectReader, header: UpdateHeader, layout: ModelLayout, meta: UpdateMeta,
                 runs: Sequence[Sequence[int]] | None = None) -> None:
        super().__init__(reader, header, layout, meta)
        # byte runs: (flat start element, flat stop element, file offset); merged when the file is in layout order.
        # ``runs``: the ones the round's validation found for these header bytes (the manifest's), used as given
        self._runs = [list(r) for r in runs] if runs is not None else byte_runs(header, layout)
        self._run_starts = [r[0] for r in self._runs]

    @property
    def runs(self) -> tuple[tuple[int, int, int], ...]:
        """The data's byte runs: ``(flat start element, flat stop element, file offset)`` in element order."""
        return tuple((a, b, offset) for a, b, offset in self._runs)

    @property
    def contiguous(self) -> bool:
        """True when the data section is the flat vector in layout order (one byte range per element range)."""
        return len(self._runs) <= 1

    def read(self, start: int, stop: int, out: npt.NDArray[Any]) -> None:
        """Fill ``out`` (length ``stop - start``) with elements ``[start, stop)``; no checksum check.

        A :class:`StoreError` propagates as it is: it says nothing about the update's content (a dropped
        connection, a throttled request), so the executor retries the invocation instead of the round rejecting
        a healthy client. Only content errors (checksums, values, header) are :class:`UpdateError`."""
        view = as_bytes(out)
        size = self.dtype.itemsize
        for a, b, offset in self._byte_runs(start, stop):
            self.reader.read_into(offset, view[(a - start) * size : (b - start) * size])

    def expect(self, start: int, stop: int) -> None:
        """Announce that elements ``[start, stop)`` will be read next, in order (see :meth:`ObjectReader.expect`)."""
        size = self.dtype.itemsize
        for a, b, offset in self._byte_runs(start, stop):
            self.reader.expect(offset, offset + (b - a) * size)

    def _byte_runs(self, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
        """``(a, b, byte offset of a)`` for each stored run of elements that ``[start, stop)`` touches, in order."""
        size = self.dtype.itemsize
        for i in range(max(0, bisect.bisect_right(self._run_starts, start) - 1), len(self._runs)):
            lo, hi, offset = self._runs[i]
            if lo >= stop:
                break
            a, b = max(start, lo), min(stop, hi)
            if a < b:
                yield a, b, offset + (a - lo) * size

    def stream(self, start: int, stop: int) -> VerifiedStream:
        """Sequential reads of ``[start, stop)`` (chunk-aligned), each chunk's checksum checked when complete."""
        if not self.grid.is_aligned(start, stop):
            raise GradshardError(f"verified reads must be chunk-aligned, got [{start}, {stop})")
        return VerifiedStream(self, start, stop)

    def read_verified(self, start: int, stop: int, out: npt.NDArray[Any]) -> None:
        """:meth:`read` a chunk-aligned range and check every chunk's checksum."""
        self.stream(start, stop).read_next(out)


class VerifiedStream:
    """Reads a chunk-aligned range window by window; a chunk's checksum is checked as soon as it is complete.

    A corrupted chunk raises :class:`UpdateError` at the window that completes it, after earlier windows of that
    chunk were already used: callers must treat their output as void on error (the aggregation driver aborts the
    output upload, so unverified data never becomes visible).
    """

    def __init__(self, update: UpdateReader, start: int, stop: int) -> None:
        self.update, self.stop = update, stop
        self.pos = start
        self._chunks = checksum.ChunkStream(update.grid, start, update.meta.digest)
        update.expect(start, stop)

    def read_next(self, out: npt.NDArray[Any]) -> None:
        """Fill ``out`` with the next ``len(out)`` elements."""
        self._check_room(len(out))
        self.update.read(self.pos, self.pos + len(out), out)
        self._advance(out)

    def _check_room(self, n: int) -> None:
        if self.pos + n > self.stop:
            raise GradshardError(f"read past the end of the stream at element {self.stop}")

    def _advance(self, out: npt.NDArray[Any]) -> None:
        self.pos += len(out)
        for index, digest in self._chunks.feed(out):
            if digest != self.update.checksum_of(index):
                a, b = self.update.grid.bounds(index)
                raise UpdateError(self.update.client, f"checksum mismatch in chunk {index} (elements [{a}, {b})): "
                                                      "the object is corrupted")


def open_update(store: Store, key: str, client: str, layout: ModelLayout,
                trusted_sha256: str | None = None, *, trusted: Validated | None = None) -> UpdateReader:
    """Open ``key``, validate header, metadata and layout, and return a reader; errors name ``client``.

    ``trusted_sha256``: see :func:`read_header` (functions pass the manifest's ``header_sha256``); with it,
    ``trusted`` (the object's validated size and byte runs, from the manifest) skips re-parsing the tensors."""
    try:
        reader = store.open_reader(key)
    except UnsafeObjectError as exc:  # a symlink, FIFO, ... in the store: this client's update is refused
        raise UpdateError(client, str(exc)) from None
    try:
        fast = trusted if trusted_sha256 is not None else None
        header = read_header(reader, key, client, trusted_sha256,
                             trusted_size=fast.size if fast is not None else None, layout=layout)
        meta = UpdateMeta.from_metadata(client, header.metadata)
        if meta.compact or meta.encoding:
            what = "a compact update (only its covered elements)" if meta.compact else f"an {meta.encoding} update"
            raise UpdateError(client, f"object {key!r} is {what}; read it with "
                                      "gradshard.format.compact.open_client_update")
        if fast is not None:
            return UpdateReader(reader, header, layout, meta, fast.runs)
        check_layout(client, header, layout)
        return UpdateReader(reader, header, layout, meta)
    except BaseException:
        reader.close()
        raise


def read_flat(store: Store, key: str, layout: ModelLayout, client: str = "?") -> npt.NDArray[Any]:
    """The whole flat vector of an update or aggregate, every chunk verified."""
    upd = open_update(store, key, client, layout)
    try:
        out = np.empty(layout.numel, dtype=layout.flat_dtype)
        upd.read_verified(0, layout.numel, out)
        return out
    finally:
        upd.close()


def infer_layout(header: UpdateHeader) -> ModelLayout:
    """The layout of an object's floating tensors in file order (our writer's order is the layout order); integer
    and bool tensors are kept buffers, not part of it."""
    ordered = sorted(header.tensors.items(), key=lambda item: (item[1].begin, item[1].end))
    return ModelLayout(TensorSpec(name, entry.shape, entry.dtype) for name, entry in ordered
                       if not _is_kept(entry.dtype))


def fit_layout(layout: ModelLayout, header: UpdateHeader, client: str) -> ModelLayout:
    """The layout an object was written with, from a model's ``layout``: as given, or its aggregated part in the
    object's floating dtype (a model layout with kept buffers, or a float32 model read against a float16 update).

    Raises :class:`UpdateError` when neither matches the layout digest in the object's metadata."""
    stored = header.metadata.get(f"{_P}layout")
    floating = {e.dtype for e in header.tensors.values() if not _is_kept(e.dtype)}
    candidates = [layout] + [layout.aggregated(dtype) for dtype in sorted(floating) if dtype in UPDATE_DTYPES]
    for candidate in candidates:
        if candidate.digest() == stored:
            return candidate
    raise UpdateError(client, f"the layout ({len(layout)} tensors, {layout.numel:,} elements) does not match the "
                              "object's layout digest: pass the layout of the model or round it was written for")


def inspect_update(store: Store, key: str, layout: ModelLayout | None = None,
                   window_elems: int = 4 << 20) -> dict[str, Any]:
    """Validate one update or aggregate completely (every chunk, every value) and describe it.

    Without ``layout`` the file order of the floating tensors is taken as the layout order and confirmed against
    the layout digest in the metadata (files from other writers may order tensors differently: then pass the
    model's or the round's layout, see :func:`fit_layout`). ``header_verified`` is False for a format-1 object
    (it has no header digest).
    """
    client = key.rsplit("/", 1)[-1].removesuffix(".safetensors")
    with store.open_reader(key) as reader:
        header = read_header(reader, key, client)
    meta = UpdateMeta.from_metadata(client, header.metadata)
    if layout is not None:
        layout = fit_layout(layout, header, client)
    else:
        layout = infer_layout(header)
        if layout.digest() != meta.layout_digest:
            raise UpdateError(client, "the tensors in file order do not match the metadata's layout digest (the "
                                      "plain safetensors library orders them by name): pass the model's or the "
                                      "round's layout")
    nonfinite = 0
    with open_update(store, key, client, layout) as upd:
        stream = upd.stream(0, layout.numel)
        buf = np.empty(min(window_elems, layout.numel), dtype=upd.dtype)
        for start in range(0, layout.numel, len(buf)):
            values = buf[: min(len(buf), layout.numel - start)]
            stream.read_next(values)
            nonfinite += int(np.count_nonzero(~np.isfinite(values)))
    return {"key": key, "kind": meta.kind, "client": meta.client, "round": meta.round, "examples": meta.examples,
            "base_model": meta.base_model, "tensors": len(layout), "elements": layout.numel,
            "dtype": layout.flat_dtype, "bytes": header.object_size, "chunk_elems": meta.chunk_elems,
            "chunks_verified": upd.grid.count, "non_finite_values": nonfinite, "layout_digest": meta.layout_digest,
            "format": header.format, "header_verified": header.header_verified, "digest": meta.digest,
            "coverage": ({k: list(v) for k, v in meta.coverage.items()} if meta.coverage is not None else None),
            "extra": dict(meta.extra), "signer": meta.signer or None}
