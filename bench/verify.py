"""The cost of verification, measured in one run as ratios to the plain reduction.

One shard of ``--mib`` MiB per client, ``--clients`` clients, in a LocalStore on local disk (just written, so
served from the page cache: this measures compute, not the disk). For each chunk digest algorithm the round is
aggregated with one shard function (inline executor, so its own duration is measured without process start):
it reads every client's range in windows, checks every chunk's digest, reduces, and writes its range of the
output (digesting those chunks too). Next to it: a bare loop that reads the same windows and adds them (no digest,
no output), and the validation of the round with and without ``require_signatures`` (N Ed25519 verifications,
key lookups in the registry included), plus N bare Ed25519 verifications. Best of ``--repeats``; stdout and
``bench/out/verify.json``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import BENCH_DIR, MIB, setup_logging, write_section

from gradshard import AggregateConfig, InlineExecutor, LocalStore, ModelLayout, TensorSpec, aggregate_round
from gradshard.core.digests import DigestName
from gradshard.format.keys import update_key
from gradshard.format.round import RoundSpec, open_round, prepare_round
from gradshard.format.update import UpdateMeta, open_update
from gradshard.format.writer import write_update
from gradshard.security import keys
from gradshard.security.registry import KeyRegistry
from gradshard.security.signing import signed_message

WINDOW_BYTES = 4 * MIB


def write_round(root: Path, layout: ModelLayout, clients: int, digest: DigestName, signed: bool) -> LocalStore:
    store = LocalStore(root)
    chunk = 1 << 16
    open_round(store, RoundSpec.create(0, layout, chunk_elems=chunk, digest=digest))
    registry = KeyRegistry(store)
    rng = np.random.default_rng(0)
    values = rng.standard_normal(layout.numel, dtype=np.float32)
    for i in range(clients):
        client = f"c{i}"
        key = keys.generate() if signed else None
        if key is not None:
            registry.register(client, key.public_key())
        values += np.float32(0.001)  # every client different
        write_update(store, update_key(0, client), layout, values, UpdateMeta(
            client=client, round=0, examples=i + 1, layout_digest=layout.digest(), chunk_elems=chunk,
            digest=digest), signer=key)
    return store


def shard_seconds(store: LocalStore, repeats: int) -> float:
    """The shard function's own duration (one shard: the whole update), best of ``repeats``."""
    config = AggregateConfig(shards=1, window_bytes=WINDOW_BYTES)
    times = []
    for _ in range(repeats):
        result = aggregate_round(store, 0, InlineExecutor(), config)
        times.append(result.reports[0].duration_s)
    return min(times)


def bare_seconds(store: LocalStore, layout: ModelLayout, clients: int, repeats: int) -> float:
    """Read the same windows of every client and add them: no digest, no output."""
    window = WINDOW_BYTES // 4
    buf = np.empty(window, np.float32)
    acc = np.zeros(window, np.float32)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        readers = [open_update(store, update_key(0, f"c{i}"), f"c{i}", layout) for i in range(clients)]
        for lo in range(0, layout.numel, window):
            hi = min(lo + window, layout.numel)
            acc[: hi - lo] = 0
            for reader in readers:
                reader.read(lo, hi, buf[: hi - lo])
                np.add(acc[: hi - lo], buf[: hi - lo], out=acc[: hi - lo])
        for reader in readers:
            reader.close()
        times.append(time.perf_counter() - started)
    return min(times)


def validation_seconds(store: LocalStore, require: bool, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        manifest = prepare_round(store, 0, require_signatures=require)
        times.append(time.perf_counter() - started)
        assert not manifest.rejected, manifest.rejected
    return min(times)


def bare_verify_seconds(store: LocalStore, layout: ModelLayout, clients: int, repeats: int) -> float:
    """N Ed25519 verifications of the signed messages alone (keys already parsed)."""
    items = []
    registry = KeyRegistry(store)
    for i in range(clients):
        with open_update(store, update_key(0, f"c{i}"), f"c{i}", layout) as upd:
            key = registry.lookup(upd.client, upd.meta.signer)
            items.append((key, bytes.fromhex(upd.meta.signature),
                          signed_message(upd.meta, upd.header_digest, upd.meta.signer)))
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for key, signature, message in items:
            key.verify(signature, message)
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=64, help="shard size per client, MiB of float32")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tmp", type=Path, default=None, help="directory for the stores [default: system temp]")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "out" / "verify.json")
    args = parser.parse_args()
    setup_logging()
    layout = ModelLayout([TensorSpec("w", (args.mib * MIB // 4,), "float32")])
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for digest in ("xxh3_64", "blake3", "sha256"):
            root = Path(tmp) / digest
            store = write_round(root, layout, args.clients, digest, signed=digest != "xxh3_64")  # type: ignore[arg-type]
            rows[digest] = {"shard_s": shard_seconds(store, args.repeats)}
            if digest == "xxh3_64":
                rows["bare read+add"] = {"shard_s": bare_seconds(store, layout, args.clients, args.repeats)}
            if digest == "blake3":
                rows["validation"] = {"unsigned_s": validation_seconds(store, False, args.repeats),
                                      "signed_s": validation_seconds(store, True, args.repeats),
                                      "ed25519_verify_s": bare_verify_seconds(store, layout, args.clients,
                                                                              args.repeats)}
            shutil.rmtree(root)
    plain = rows["xxh3_64"]["shard_s"]
    data_mib = args.mib * args.clients
    print(f"one shard of {args.mib} MiB x {args.clients} clients ({data_mib} MiB read), LocalStore (page cache), "
          f"one core, windows of {WINDOW_BYTES // MIB} MiB, best of {args.repeats}")
    print(f"  {'':30s} {'seconds':>8s} {'MB/s':>8s} {'vs xxh3':>8s} {'vs bare':>8s}")
    bare = rows["bare read+add"]["shard_s"]
    for name in ("bare read+add", "xxh3_64", "blake3", "sha256"):
        s = rows[name]["shard_s"]
        label = name if name.startswith("bare") else f"shard reduce, {name} digests"
        print(f"  {label:30s} {s:8.3f} {data_mib * MIB / s / 1e6:8.0f} {s / plain:8.2f} {s / bare:8.2f}")
    v = rows["validation"]
    extra = v["signed_s"] - v["unsigned_s"]
    print(f"  validation of {args.clients} headers: {v['unsigned_s'] * 1e3:.1f} ms unsigned, "
          f"{v['signed_s'] * 1e3:.1f} ms requiring signatures (+{extra * 1e3:.1f} ms: registry lookups and "
          f"{args.clients} Ed25519 verifications, {v['ed25519_verify_s'] * 1e3:.2f} ms of them bare); "
          f"+{extra / plain:.4f} of the xxh3 shard reduction")
    write_section(args.out, "verify", {"mib": args.mib, "clients": args.clients, "repeats": args.repeats,
                                       "window_bytes": WINDOW_BYTES, **rows})


if __name__ == "__main__":
    main()
