"""Compact updates (SuperFed): clients upload only their subnetwork's elements; the round aggregates them with
``coverage-mean`` exactly as superfednas' ``_aggregate`` would, for every M, reading only the covered bytes.

References here are built independently of the library: coverage masks by numpy slicing of each tensor, the
aggregate by a dense numpy loop with the kernel's float op order, bytes read from those masks.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradshard import AggregateConfig, aggregate_round
from gradshard.aggregation.contracts import ReduceResult, ShardReduceArgs
from gradshard.aggregation.driver import AggregateResult
from gradshard.core.coverage import CoverageMap
from gradshard.core.layout import ModelLayout, TensorSpec
from gradshard.errors import GradshardError
from gradshard.format.compact import (
    CompactChunkStream,
    compact_of,
    dense_of,
    open_client_update,
    write_compact_update,
)
from gradshard.format.keys import aggregate_key, update_key
from gradshard.format.round import RoundSpec, open_round, prepare_round
from gradshard.format.update import UpdateMeta, UpdateReader, open_update, read_flat
from gradshard.format.writer import write_update
from gradshard.runtime import InlineExecutor, LocalExecutor
from gradshard.runtime.registry import parse_result
from gradshard.store import LocalStore, MemoryStore, Store

F32 = npt.NDArray[np.float32]
Coverage = dict[str, tuple[int, ...]]
BASE_KEY = "models/base.safetensors"
WINDOW_BYTES = 4 * 37  # windows of 37 elements cross chunks, tensors and runs


# --- an elastic supernet and its prefix subnetworks ----------------------------------------------------------------
def supernet(rng: np.random.Generator) -> tuple[ModelLayout, list[int]]:
    """A stem conv, 2-4 blocks (conv 4-D + BN weight/bias 1-D) and a linear classifier; returns the layout and the
    channels of stem and blocks."""
    channels = [int(rng.integers(2, 9))] + [int(rng.integers(2, 13)) for _ in range(int(rng.integers(2, 5)))]
    specs = [TensorSpec("stem.conv.weight", (channels[0], 3, 3, 3), "float32"),
             TensorSpec("stem.bn.weight", (channels[0],), "float32"),
             TensorSpec("stem.bn.bias", (channels[0],), "float32")]
    for b in range(1, len(channels)):
        k = int(rng.choice([1, 3]))
        specs += [TensorSpec(f"blocks.{b}.conv.weight", (channels[b], channels[b - 1], k, k), "float32"),
                  TensorSpec(f"blocks.{b}.bn.weight", (channels[b],), "float32"),
                  TensorSpec(f"blocks.{b}.bn.bias", (channels[b],), "float32")]
    specs += [TensorSpec("fc.weight", (10, max(channels)), "float32"), TensorSpec("fc.bias", (10,), "float32")]
    return ModelLayout(specs), channels


def subnetwork(rng: np.random.Generator, layout: ModelLayout, channels: list[int], full: bool = False) -> Coverage:
    """Leading widths per layer (out channels; in channels follow the previous layer), the first ``depth`` blocks
    (the rest absent), the classifier's leading input columns."""
    blocks = len(channels) - 1
    depth = blocks if full else int(rng.integers(1, blocks + 1))
    width = [c if full else int(rng.integers(1, c + 1)) for c in channels]
    shapes = {spec.name: spec.shape for spec in layout}
    cov: Coverage = {"stem.conv.weight": (width[0], 3, 3, 3), "stem.bn.weight": (width[0],),
                     "stem.bn.bias": (width[0],)}
    for b in range(1, depth + 1):
        k = shapes[f"blocks.{b}.conv.weight"][2]
        cov[f"blocks.{b}.conv.weight"] = (width[b], width[b - 1], k, k)
        cov[f"blocks.{b}.bn.weight"] = cov[f"blocks.{b}.bn.bias"] = (width[b],)
    cov["fc.weight"] = (10, max(channels) if full else width[depth])
    cov["fc.bias"] = (10,)
    return cov


def dense_mask(layout: ModelLayout, coverage: Coverage) -> npt.NDArray[np.bool_]:
    """The covered elements as a full-size mask, by slicing each tensor."""
    parts = []
    for spec in layout:
        block = np.zeros(spec.shape, dtype=np.bool_)
        if spec.name in coverage:
            block[tuple(slice(0, e) for e in coverage[spec.name])] = True
        parts.append(block.ravel())
    return np.concatenate(parts)


class Round:
    """A round in a store: supernet layout, base model, each client's dense values (NaN where uncovered), coverage,
    examples."""

    def __init__(self, seed: int, n: int = 5, chunk: int = 32, store: Store | None = None,
                 compact: bool = True) -> None:
        rng = np.random.default_rng(seed)
        self.store = store if store is not None else MemoryStore()
        self.layout, channels = supernet(rng)
        self.chunk = chunk
        layout = self.layout
        self.base = rng.standard_normal(layout.numel).astype(np.float32)
        write_update(self.store, BASE_KEY, layout, self.base, UpdateMeta(
            client="server", round=0, examples=1, kind="model", layout_digest=layout.digest(), chunk_elems=chunk))
        with open_update(self.store, BASE_KEY, "base", layout) as upd:
            self.base_sha = upd.sha256
        open_round(self.store, RoundSpec.create(0, layout, chunk_elems=chunk, base_model=self.base_sha,
                                                base_key=BASE_KEY))
        self.vecs: dict[str, F32] = {}
        self.coverages: dict[str, Coverage] = {}
        self.examples: dict[str, int] = {}
        for i in range(n):
            client = f"c{i:02d}"
            coverage = subnetwork(rng, layout, channels, full=(i == 0 and seed % 2 == 0))
            values = (rng.standard_normal(layout.numel) * 10.0 ** rng.uniform(-2, 2, layout.numel)).astype(np.float32)
            values[~dense_mask(layout, coverage)] = np.nan
            self.vecs[client], self.coverages[client] = values, coverage
            self.examples[client] = int(rng.integers(1, 500))
            self.write(client, compact)

    def meta(self, client: str, **extra: Any) -> UpdateMeta:
        return UpdateMeta(client=client, round=0, examples=self.examples[client], layout_digest=self.layout.digest(),
                          chunk_elems=self.chunk, base_model=self.base_sha, **extra)

    def write(self, client: str, compact: bool = True) -> None:
        key, values, coverage = update_key(0, client), self.vecs[client], self.coverages[client]
        if compact:
            packed = values[dense_mask(self.layout, coverage)]  # the reference's own packing, not compact_of
            write_compact_update(self.store, key, self.layout, coverage, packed, self.meta(client))
        else:
            write_update(self.store, key, self.layout, values, self.meta(client, coverage=coverage))

    def reference(self, weights: dict[str, float], clients: list[str] | None = None) -> F32:
        """superfednas' ``_aggregate`` with the kernel's float32 op order: per client in sorted order, over its
        covered elements, ``num += x·w`` (the product rounded first) and ``den += w``; ``num/den`` where ``den > 0``,
        else the previous global."""
        order = sorted(clients if clients is not None else self.vecs)
        total = math.fsum(weights[c] for c in order)
        num = np.zeros(self.layout.numel, dtype=np.float32)
        den = np.zeros(self.layout.numel, dtype=np.float32)
        for c in order:
            w = np.float32(weights[c] / total)
            mask = dense_mask(self.layout, self.coverages[c])
            num[mask] = num[mask] + self.vecs[c][mask] * w
            den[mask] = den[mask] + w
        out = self.base.copy()
        covered = den > 0
        out[covered] = num[covered] / den[covered]
        return out


def aggregate(store: Store, executor: Any = None, **config: Any) -> tuple[bytes, AggregateResult]:
    result = aggregate_round(store, 0, executor or InlineExecutor(), AggregateConfig(reducer="coverage-mean",
                                                                                     **config))
    return store.get(aggregate_key(0)), result


def bits(x: F32) -> npt.NDArray[np.uint32]:
    return x.view(np.uint32)


WEIGHTINGS = ["examples", "uniform", "server"]


def weighting_config(rnd: Round, weighting: str) -> tuple[dict[str, float], dict[str, Any]]:
    if weighting == "examples":
        return {c: float(e) for c, e in rnd.examples.items()}, {}
    if weighting == "uniform":
        return {c: 1.0 for c in rnd.vecs}, {"weighting": "uniform"}
    server = {c: 0.25 + i * 0.7 for i, c in enumerate(sorted(rnd.vecs))}
    return server, {"weighting": "server", "weights": server}


# --- the mapping and the format --------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_covered_before_is_the_prefix_count_of_the_dense_mask(seed: int) -> None:
    # Prepare
    rng = np.random.default_rng(seed)
    layout, channels = supernet(rng)
    coverage = subnetwork(rng, layout, channels)
    prefix = np.concatenate(([0], np.cumsum(dense_mask(layout, coverage))))

    # Execute
    cov = CoverageMap(layout, coverage)
    got = [cov.covered_before(j) for j in range(layout.numel + 1)]

    # Assert
    np.testing.assert_array_equal(got, prefix)


@settings(max_examples=100, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(1, 6), min_size=0, max_size=4), min_size=1, max_size=5),
       data=st.data())
def test_covered_before_handles_scalars_empty_extents_and_absent_tensors(shapes: list[list[int]],
                                                                         data: st.DataObject) -> None:
    # Prepare: any shapes (0-d included); each tensor absent, or any extents (0 included)
    layout = ModelLayout(TensorSpec(f"t{i}", tuple(s), "float32") for i, s in enumerate(shapes))
    coverage: Coverage = {}
    for spec in layout:
        if data.draw(st.booleans()):
            coverage[spec.name] = tuple(data.draw(st.integers(0, d)) for d in spec.shape)
    prefix = np.concatenate(([0], np.cumsum(dense_mask(layout, coverage))))

    # Execute
    cov = CoverageMap(layout, coverage)

    # Assert
    np.testing.assert_array_equal([cov.covered_before(j) for j in range(layout.numel + 1)], prefix)
    with pytest.raises(GradshardError):
        cov.covered_before(layout.numel + 1)


def test_the_streaming_writer_in_pieces_writes_the_bytes_of_the_one_shot_writer() -> None:
    # Prepare
    from gradshard.format.compact import CompactWriter

    rnd = Round(seed=15, n=2)
    client = "c01"
    packed = rnd.vecs[client][dense_mask(rnd.layout, rnd.coverages[client])]

    # Execute: pieces of 1, 7, 50 elements, then the rest
    with CompactWriter(rnd.store, "streamed.safetensors", rnd.layout, rnd.coverages[client],
                       rnd.meta(client)) as writer:
        for lo, hi in ((0, 1), (1, 8), (8, 58), (58, len(packed))):
            writer.write(packed[lo:hi])
        meta = writer.commit()

    # Assert
    assert rnd.store.get("streamed.safetensors") == rnd.store.get(update_key(0, client))
    assert meta.compact and meta.coverage == rnd.coverages[client]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), chunk=st.integers(1, 97), pieces=st.integers(1, 9))
def test_compact_chunk_digests_are_the_digests_of_each_supernet_chunks_covered_bytes(seed: int, chunk: int,
                                                                                      pieces: int) -> None:
    # Prepare
    from gradshard.core import checksum, digests

    rng = np.random.default_rng(seed)
    layout, channels = supernet(rng)
    coverage = subnetwork(rng, layout, channels)
    dense = rng.standard_normal(layout.numel).astype(np.float32)
    mask = dense_mask(layout, coverage)
    grid = checksum.ChunkGrid(layout.numel, chunk)
    expected = [digests.algorithm("xxh3_64").hexdigest(np.ascontiguousarray(dense[a:b][mask[a:b]]))
                for a, b in map(grid.bounds, range(grid.count))]

    # Execute: fed in random pieces
    packed = compact_of(layout, coverage, dense)
    stream = CompactChunkStream(grid, CoverageMap(layout, coverage), 0, "xxh3_64")
    cuts = sorted(rng.integers(0, len(packed) + 1, pieces - 1).tolist())
    got: dict[int, str] = {}
    for lo, hi in zip([0, *cuts], [*cuts, len(packed)], strict=True):
        got.update(stream.feed(packed[lo:hi]))

    # Assert
    np.testing.assert_array_equal(packed, dense[mask])
    assert [got[i] for i in range(grid.count)] == expected
    back = dense_of(layout, coverage, packed, fill=np.float32(7.0))
    np.testing.assert_array_equal(back[mask], dense[mask])
    assert (back[~mask] == 7.0).all()


def test_a_compact_file_is_plain_safetensors_with_one_tensor_and_the_supernet_digest() -> None:
    # Prepare
    import safetensors.numpy

    rnd = Round(seed=3, n=2)
    client = "c01"

    # Execute
    blob = rnd.store.get(update_key(0, client))
    (n,) = struct.unpack("<Q", blob[:8])
    tensors = safetensors.numpy.load(blob)
    with open_client_update(rnd.store, update_key(0, client), client, rnd.layout) as upd:
        meta = upd.meta

    # Assert
    mask = dense_mask(rnd.layout, rnd.coverages[client])
    assert list(tensors) == ["compact"]
    np.testing.assert_array_equal(tensors["compact"], rnd.vecs[client][mask])
    assert len(blob) == 8 + n + 4 * int(mask.sum())
    assert meta.compact and meta.layout_digest == rnd.layout.digest()
    assert meta.coverage == rnd.coverages[client]
    assert len(meta.checksums) == 16 * -(-rnd.layout.numel // rnd.chunk)


# --- aggregation -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("seed", "weighting"), [(0, "examples"), (1, "uniform"), (2, "server"), (5, "examples")])
def test_compact_rounds_equal_the_superfednas_reference_for_every_m(seed: int, weighting: str) -> None:
    # Prepare
    rnd = Round(seed)
    weights, config = weighting_config(rnd, weighting)
    expected = rnd.reference(weights)

    # Execute
    outputs = {}
    for m in (1, 2, 4, 8):
        outputs[f"M={m}"], _ = aggregate(rnd.store, shards=m, window_bytes=WINDOW_BYTES, **config)
    outputs["tensor-aligned M=4"], _ = aggregate(rnd.store, shards=4, partition="tensor-aligned",
                                                 window_bytes=WINDOW_BYTES, **config)
    outputs["M=3, 2 parallel reads"], result = aggregate(rnd.store, shards=3, window_bytes=WINDOW_BYTES,
                                                         parallel_reads=2, **config)

    # Assert: (a) the reference byte for byte, (b) one set of bytes for every M, (c) the previous global elsewhere
    assert len(set(outputs.values())) == 1
    assert not result.manifest.rejected and all(c.compact for c in result.manifest.clients)
    got = read_flat(rnd.store, aggregate_key(0), rnd.layout)
    np.testing.assert_array_equal(bits(got), bits(expected))
    nobody = ~np.any([dense_mask(rnd.layout, c) for c in rnd.coverages.values()], axis=0)
    np.testing.assert_array_equal(bits(got[nobody]), bits(rnd.base[nobody]))
    assert np.isfinite(got).all()


@pytest.mark.parametrize("m", [1, 3, 8])
def test_each_shard_reads_exactly_the_covered_elements_of_each_client(m: int) -> None:
    # Prepare
    rnd = Round(seed=7, n=4)
    masks = {c: dense_mask(rnd.layout, cov) for c, cov in rnd.coverages.items()}

    # Execute
    _, result = aggregate(rnd.store, shards=m, window_bytes=WINDOW_BYTES)

    # Assert: (d) per client per shard, covered elements in the shard × 4 bytes
    shards = {inv.id: inv.args for inv in result.plan.invocations if isinstance(inv.args, ShardReduceArgs)}
    assert len(shards) == m
    for report in result.reports:
        args = shards[report.invocation]
        read = parse_result(report.function, report.result, ReduceResult).bytes_read_per_client
        assert read == {c: 4 * int(mask[args.start : args.stop].sum()) for c, mask in masks.items()}


def test_compact_updates_aggregate_to_the_bytes_of_full_size_coverage_updates() -> None:
    # Prepare: (e) the same round, written compact and full-size with coverage
    compact, dense = Round(seed=11), Round(seed=11, compact=False)

    # Execute
    got_compact, rc = aggregate(compact.store, shards=4, window_bytes=WINDOW_BYTES)
    got_dense, rd = aggregate(dense.store, shards=4, window_bytes=WINDOW_BYTES)

    # Assert
    assert got_compact == got_dense
    assert all(c.compact for c in rc.manifest.clients) and not any(c.compact for c in rd.manifest.clients)
    assert sum(c.size for c in rc.manifest.clients) < sum(c.size for c in rd.manifest.clients)


def test_a_tampered_compact_chunk_rejects_that_client_by_name_and_the_round_completes() -> None:
    # Prepare: flip one bit of c02's and of c04's compact data
    rnd = Round(seed=4)
    for client, element in (("c02", 5), ("c04", -1)):
        key = update_key(0, client)
        blob = bytearray(rnd.store.get(key))
        (n,) = struct.unpack("<Q", blob[:8])
        offset = 8 + n + 4 * element if element >= 0 else len(blob) - 2
        blob[offset] ^= 0x10
        rnd.store.put(key, bytes(blob))

    # Execute
    _, result = aggregate(rnd.store, shards=4, window_bytes=WINDOW_BYTES)

    # Assert: both named (found in one pass), the rest aggregated as if they had never sent anything
    assert "checksum mismatch" in result.manifest.rejected["c02"]
    assert "checksum mismatch" in result.manifest.rejected["c04"]
    remaining = [c for c in rnd.vecs if c not in ("c02", "c04")]
    expected = rnd.reference({c: float(e) for c, e in rnd.examples.items()}, remaining)
    np.testing.assert_array_equal(bits(read_flat(rnd.store, aggregate_key(0), rnd.layout)), bits(expected))


def test_a_nan_in_a_compact_update_names_that_client() -> None:
    # Prepare
    rnd = Round(seed=6, n=3)
    mask = dense_mask(rnd.layout, rnd.coverages["c01"])
    rnd.vecs["c01"][np.flatnonzero(mask)[3]] = np.nan
    rnd.write("c01")

    # Execute
    _, result = aggregate(rnd.store, shards=2, window_bytes=WINDOW_BYTES)

    # Assert
    assert "non-finite" in result.manifest.rejected["c01"]
    assert set(rnd.vecs) - set(result.manifest.rejected) == {c.client for c in result.manifest.clients}


def _put_compact(store: Store, rnd: Round, client: str, coverage_json: str, values: F32) -> None:
    """A compact file written by hand (the writer refuses these): its own header digest, but bad content."""
    from gradshard.format.writer import encode_header

    meta = rnd.meta(client, coverage=rnd.coverages[client], compact=True)
    md = meta.with_checksums(["0" * 16] * -(-rnd.layout.numel // rnd.chunk)).to_metadata()
    md["gradshard.coverage"] = coverage_json
    header = encode_header(ModelLayout([TensorSpec("compact", (len(values),), "float32")]), md)
    store.put(update_key(0, client), header + values.tobytes())


def test_wrong_length_bad_coverage_and_wrong_dtype_compact_files_are_rejected_with_reasons() -> None:
    # Prepare
    rnd = Round(seed=8, n=5)
    _put_compact(rnd.store, rnd, "c01", '{"fc.bias":[10]}', np.zeros(11, dtype=np.float32))
    _put_compact(rnd.store, rnd, "c02", '{"fc.bias":[11]}', np.zeros(11, dtype=np.float32))
    _put_compact(rnd.store, rnd, "c03", '{"nope":[1]}', np.zeros(1, dtype=np.float32))
    f16 = rnd.layout.aggregated("float16")
    cov = rnd.coverages["c04"]
    write_compact_update(rnd.store, update_key(0, "c04"), f16, cov,
                         np.zeros(int(dense_mask(rnd.layout, cov).sum()), dtype=np.float16),
                         UpdateMeta(client="c04", round=0, examples=1, layout_digest=f16.digest(), chunk_elems=32,
                                    base_model=rnd.base_sha))

    # Execute
    manifest = prepare_round(rnd.store, 0)
    _, result = aggregate(rnd.store, shards=2)

    # Assert
    rejected = manifest.rejected
    assert "wrong length" in rejected["c01"] and "10 elements" in rejected["c01"]
    assert "bad coverage" in rejected["c02"] and "'fc.bias'" in rejected["c02"]
    assert "bad coverage" in rejected["c03"] and "nope" in rejected["c03"]
    assert "wrong dtype" in rejected["c04"]
    assert [c.client for c in manifest.clients] == ["c00"]
    assert result.manifest.rejected.keys() == rejected.keys()
    with pytest.raises(GradshardError, match="c01"):
        prepare_round(rnd.store, 0, policy="fail")


def test_the_writer_refuses_values_that_do_not_fit_the_coverage() -> None:
    rnd = Round(seed=9, n=1)
    cov = rnd.coverages["c00"]
    with pytest.raises(GradshardError, match="compact vector has shape"):
        write_compact_update(rnd.store, "x.safetensors", rnd.layout, cov, np.zeros(3, dtype=np.float32),
                             rnd.meta("c00"))
    assert not rnd.store.exists("x.safetensors")


def test_compact_updates_aggregate_in_worker_processes_on_a_local_store(tmp_path: Any) -> None:
    # Prepare
    rnd = Round(seed=12, n=4, store=LocalStore(tmp_path, fsync=False))
    expected = rnd.reference({c: float(e) for c, e in rnd.examples.items()})

    # Execute
    with LocalExecutor(workers=2) as executor:
        got, result = aggregate(rnd.store, executor, shards=3, window_bytes=WINDOW_BYTES)

    # Assert
    assert not result.manifest.rejected
    np.testing.assert_array_equal(bits(read_flat(rnd.store, aggregate_key(0), rnd.layout)), bits(expected))
    assert got == aggregate(rnd.store, shards=1)[0]


def test_a_signed_compact_update_is_verified_at_validation_and_a_tampered_signature_rejected() -> None:
    # Prepare: a blake3 round; c00 signs its compact update, c01 signs then has its signature replaced
    from gradshard.security import keys
    from gradshard.security.registry import KeyRegistry

    rng = np.random.default_rng(13)
    store = MemoryStore()
    layout, channels = supernet(rng)
    open_round(store, RoundSpec.create(0, layout, chunk_elems=32, digest="blake3"))
    registry = KeyRegistry(store)
    for client in ("c00", "c01"):
        signer = keys.generate()
        registry.register(client, signer.public_key())
        coverage = subnetwork(rng, layout, channels)
        values = rng.standard_normal(int(dense_mask(layout, coverage).sum())).astype(np.float32)
        write_compact_update(store, update_key(0, client), layout, coverage, values, UpdateMeta(
            client=client, round=0, examples=3, layout_digest=layout.digest(), chunk_elems=32, digest="blake3"),
            signer=signer if client == "c00" else keys.generate())

    # Execute
    manifest = prepare_round(store, 0, require_signatures=True)

    # Assert
    assert [c.client for c in manifest.clients] == ["c00"] and manifest.clients[0].signer is not None
    assert manifest.clients[0].compact
    assert "unregistered" in manifest.rejected["c01"]


def test_a_shard_function_holds_window_buffers_not_the_model() -> None:
    # Prepare: a 2M-element supernet (8 MiB of float32), 3 compact clients, 64 KiB windows; the output upload is
    # opened before tracing (the memory store allocates the whole object there)
    import tracemalloc

    from gradshard.aggregation.contracts import ReduceSettings
    from gradshard.aggregation.functions import reduce_range
    from gradshard.format.round import write_manifest
    from gradshard.format.writer import ObjectUpload

    layout = ModelLayout([TensorSpec("conv.weight", (512, 512, 2, 2), "float32"),
                          TensorSpec("fc.weight", (1000, 1024), "float32")])
    store = MemoryStore()
    open_round(store, RoundSpec.create(0, layout, chunk_elems=1 << 14))
    rng = np.random.default_rng(0)
    for i, width in enumerate((512, 300, 128)):
        coverage = {"conv.weight": (width, width, 2, 2), "fc.weight": (1000, 2 * width)}
        k = int(dense_mask(layout, coverage).sum())
        write_compact_update(store, update_key(0, f"c{i}"), layout, coverage,
                             rng.standard_normal(k).astype(np.float32),
                             UpdateMeta(client=f"c{i}", round=0, examples=1, layout_digest=layout.digest(),
                                        chunk_elems=1 << 14))
    manifest = prepare_round(store, 0)
    write_manifest(store, manifest)
    upload = ObjectUpload.begin(store, "out.safetensors", layout, UpdateMeta(
        client="server", round=0, examples=3, kind="aggregate", layout_digest=layout.digest(),
        chunk_elems=1 << 14))
    settings = ReduceSettings(window_bytes=64 << 10, reducer="coverage-mean")

    # Execute
    tracemalloc.start()
    try:
        result = reduce_range(store, manifest, settings, upload.target(), 0, layout.numel)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # Assert: well under one dense vector (8 MiB); bytes read are the compact sizes
    assert peak < 1 << 20, peak
    assert result.bytes_read_per_client == {c.client: c.size - _header_len(store, c.key) for c in manifest.clients}


def _header_len(store: Store, key: str) -> int:
    (n,) = struct.unpack("<Q", store.get(key)[:8])
    return 8 + int(n)


def test_on_s3_a_compact_input_reads_its_shard_with_one_ranged_get(s3_store: Any) -> None:
    # Prepare: one compact client on S3, a shard of 5 chunks read in windows of 37 elements
    from gradshard.aggregation.inputs import CompactInput

    rnd = Round(seed=14, n=2, store=s3_store)
    client, chunk = "c01", rnd.chunk
    start, stop = 2 * chunk, 7 * chunk
    mask = dense_mask(rnd.layout, rnd.coverages[client])
    assert mask[start:stop].any() and not mask[start:stop].all()  # a partly covered shard
    reader = open_client_update(s3_store, update_key(0, client), client, rnd.layout)
    buffer = np.empty(37, dtype=np.float32)
    gets_before = s3_store.io.gets

    # Execute
    got = np.full(stop - start, np.nan, dtype=np.float32)
    with reader:
        assert not isinstance(reader, UpdateReader)
        source = CompactInput(reader, start, stop, len(buffer))
        for a in range(start, stop, len(buffer)):
            b = min(a + len(buffer), stop)
            covered = source.read(a, b, buffer[: b - a])
            if covered is False:
                continue
            window = got[a - start : b - start]
            np.copyto(window, buffer[: b - a], where=np.ones(b - a, dtype=bool) if covered is None else covered)

    # Assert: the covered values in place, one GET, exactly the covered bytes
    assert s3_store.io.gets - gets_before == 1
    assert source.bytes_read == 4 * int(mask[start:stop].sum())
    np.testing.assert_array_equal(got[mask[start:stop]], rnd.vecs[client][start:stop][mask[start:stop]])
    assert np.isnan(got[~mask[start:stop]]).all()
