"""Options and output targets shared by every aggregation topology."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradshard.aggregation.contracts import NoiseSpec, OutputTarget, ReduceSettings, RoundRef
from gradshard.core import digests
from gradshard.core.digests import DigestName
from gradshard.core.reduce import ACCUMULATE_DTYPES, WEIGHTINGS
from gradshard.core.reducers import REDUCERS, parse_reducer
from gradshard.errors import PlanError
from gradshard.format.round import RoundManifest

# A window of each client's input small enough that the read buffer and the accumulator stay in the CPU cache:
# measured here (pread + xxh3 + multiply + add), 256-512 KiB windows ~5.5 GB/s per core, 4 MiB ~3.9 GB/s.
DEFAULT_WINDOW_BYTES = 512 << 10
# What a reducing function holds besides its buffers (parsed manifest and headers, pydantic models, allocator
# slack): measured 6.2-6.4 MiB above the no-op baseline for a 44.7 MB ResNet-18 round with N = 16 (bench/aggregate.py).
FUNCTION_OVERHEAD_BYTES = 8 << 20


@dataclass(frozen=True)
class ReduceOptions:
    """How to reduce: window size (bytes of one client's input), accumulation dtype, weighting, and how many
    clients' windows a shard function reads at once (each in its own buffer; worth it on object stores)."""

    window_bytes: int = DEFAULT_WINDOW_BYTES
    accumulate: str = "float32"
    weighting: str = "examples"
    parallel_reads: int = 1
    reducer: str = "mean"
    noise: NoiseSpec | None = None  # central DP: added to every element of the aggregate

    def __post_init__(self) -> None:
        if self.accumulate not in ACCUMULATE_DTYPES:
            raise PlanError(f"accumulate must be one of {ACCUMULATE_DTYPES}, got {self.accumulate!r}")
        if self.weighting not in WEIGHTINGS:
            raise PlanError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.window_bytes < 1:
            raise PlanError(f"window must be at least 1 byte, got {self.window_bytes}")
        if self.parallel_reads < 1:
            raise PlanError(f"parallel_reads must be at least 1, got {self.parallel_reads}")

    def window_elems(self, itemsize: int) -> int:
        return window_elems(self.window_bytes, itemsize)

    def settings(self) -> ReduceSettings:
        """The options as the functions' contract carries them."""
        return ReduceSettings(window_bytes=self.window_bytes, accumulate=self.accumulate,  # type: ignore[arg-type]
                              weighting=self.weighting, reducer=self.reducer,  # type: ignore[arg-type]
                              parallel_reads=self.parallel_reads, noise=self.noise)


@dataclass(frozen=True)
class PlanOutput:
    """What a plan reads and writes: the round's manifest and the open upload of the output object (the byte offset
    of its data section and its digest algorithm)."""

    manifest_key: str
    key: str
    upload_id: str
    data_start: int
    digest: DigestName = "xxh3_64"

    def target(self) -> OutputTarget:
        return OutputTarget(output_key=self.key, upload_id=self.upload_id, data_start=self.data_start,
                            digest=self.digest)

    def round_ref(self, manifest_sha256: str) -> RoundRef:
        return RoundRef(manifest_key=self.manifest_key, manifest_sha256=manifest_sha256)


def window_elems(window_bytes: int, itemsize: int) -> int:
    """``window_bytes`` of one client's input, in elements (at least one)."""
    return max(1, window_bytes // itemsize)


def window_memory(window_elems: int, itemsize: int, accumulate: str) -> int:
    """Bytes a streaming reducer holds: read buffer + accumulator (+ cast buffers when dtypes differ)."""
    acc = np.dtype(accumulate).itemsize
    extra = 0 if acc == itemsize else window_elems * (acc + itemsize)  # tmp in acc dtype + output cast
    return window_elems * (itemsize + acc) + extra + FUNCTION_OVERHEAD_BYTES


def reduce_memory(manifest: RoundManifest, options: ReduceOptions, window: int, parallel_reads: int) -> int:
    """Bytes a reducing function over ``window`` elements holds above the interpreter: the reducer's buffers (its
    own formula), the writer's cast buffer, coverage masks, the base model's window, headers and overhead."""
    layout = manifest.spec.model_layout()
    itemsize = np.dtype(layout.flat_dtype).itemsize
    spec = parse_reducer(options.reducer)
    kind = REDUCERS[spec.name]
    held = kind.memory_bytes(spec, clients=len(manifest.clients), window_elems=window, itemsize=itemsize,
                             accumulate=options.accumulate, parallel_reads=parallel_reads)
    cast = window * itemsize if np.dtype(options.accumulate).itemsize != itemsize else 0
    extra = 0
    if kind.uses_coverage:
        extra += window * sum(1 for c in manifest.clients if c.partial)  # one boolean mask per partial client
        if manifest.spec.base_key:  # the base model's window, rounded out to whole chunks
            extra += (window + 2 * manifest.spec.chunk_elems) * itemsize
    if options.noise is not None:  # central DP: one chunk of float64 noise and its scaled temporary
        extra += 2 * 8 * min(manifest.spec.chunk_elems, layout.numel)
    return held + cast + extra + FUNCTION_OVERHEAD_BYTES + manifest_header_bytes(manifest)


def manifest_header_bytes(manifest: RoundManifest) -> int:
    """Memory a function spends on headers: every client's packed chunk digests (hex, 16 or 64 bytes a chunk) stay,
    but a parsed header (~1.5 KiB a tensor, measured) exists for one client at a time."""
    chunks = -(-manifest.spec.model_layout().numel // manifest.spec.chunk_elems)
    width = digests.algorithm(manifest.spec.digest).hex_width
    return width * chunks * len(manifest.clients) + 1536 * len(manifest.spec.layout)
