"""What scoped invocation tokens cost per invocation, on this machine, measured in one run.

1. The pieces, ``--repeats`` times each (medians): minting (Ed25519 sign), decoding (signature, issuer, audience,
   times), authorizing (scope, argument and store digests, one exclusive create of the ``jti`` in a LocalStore,
   fsync on and off).
2. One ``noop`` invocation through a ``LocalExecutor`` (a forked, capped worker) with and without tokens,
   ``--repeats`` times each, alternating: the end-to-end overhead of one invocation.
3. One synthetic sharded round (``--params`` elements, ``--clients`` clients, ``--shards`` functions) aggregated
   with and without tokens, alternating, ``--rounds`` times each; the aggregates are checked to be the same bytes.

Figures go to stdout and to ``bench/out/tokens.json``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from _common import BENCH_DIR, setup_logging, write_section

from gradshard.aggregation.driver import AggregateConfig, aggregate_round
from gradshard.core.zoo import synthetic
from gradshard.demo.synthetic import make_round
from gradshard.format.keys import aggregate_key
from gradshard.runtime import LocalExecutor
from gradshard.security.tokens import TokenIssuer
from gradshard.store import LocalStore
from gradshard.topology.base import Invocation, Plan


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def pieces(root: Path, repeats: int) -> dict[str, float]:
    issuer = TokenIssuer.generate()
    args = {"round": {"manifest_key": "rounds/000001/manifest.json", "manifest_sha256": "0" * 64},
            "start": 0, "stop": 1 << 20, "settings": {"window_bytes": 1 << 20}}
    scope = {"round": 1, "range": [0, 1 << 20]}
    out: dict[str, float] = {"mint_ms": median_ms(lambda: issuer.mint("shard_reduce", scope=scope, args=args),
                                                  repeats)}
    for fsync in (False, True):
        verifier = issuer.verifier(LocalStore(root / f"jti-{fsync}", fsync=fsync))
        minted = [issuer.mint("shard_reduce", scope=scope, args=args) for _ in range(repeats)]
        out["decode_ms"] = median_ms(partial(verifier.decode, minted[0], "shard_reduce"), repeats)
        claims = iter([verifier.decode(t, "shard_reduce") for t in minted])
        out[f"authorize_fsync_{'on' if fsync else 'off'}_ms"] = median_ms(
            lambda v=verifier, c=claims: v.authorize(next(c), scope=scope, args=args), repeats)
    return out


def noop(root: Path, repeats: int) -> dict[str, float]:
    store = LocalStore(root / "noop", fsync=False)
    plan = Plan("noop", (Invocation("only", "noop", {}, 0),))
    with LocalExecutor(workers=1, retries=0) as plain, \
            LocalExecutor(workers=1, retries=0, tokens=TokenIssuer.generate()) as secured:
        for executor in (plain, secured):  # start the zygotes
            executor.run(plan, store)
        a, b = [], []
        for _ in range(repeats):
            a.append(median_ms(lambda: plain.run(plan, store), 1))
            b.append(median_ms(lambda: secured.run(plan, store), 1))
    return {"noop_plain_ms": statistics.median(a), "noop_tokens_ms": statistics.median(b)}


def rounds(root: Path, params: int, clients: int, shards: int, repeats: int) -> dict[str, float]:
    layout = synthetic(params, tensor_elems=max(1, params // 8))
    config = AggregateConfig(shards=shards)
    times: dict[bool, list[float]] = {False: [], True: []}
    outputs: dict[bool, bytes] = {}
    with LocalExecutor(workers=2, retries=0) as plain, \
            LocalExecutor(workers=2, retries=0, tokens=TokenIssuer.generate()) as secured:
        for i in range(repeats + 1):
            for tokens, executor in ((False, plain), (True, secured)):
                store = LocalStore(root / f"round-{i}-{tokens}", fsync=False)
                make_round(store, 1, layout, clients, seed=1)
                started = time.perf_counter()
                aggregate_round(store, 1, executor, config)
                if i:  # the first of each starts its zygote
                    times[tokens].append(time.perf_counter() - started)
                outputs[tokens] = store.get(aggregate_key(1))
    assert outputs[True] == outputs[False], "the aggregate with tokens differs"
    return {"round_plain_ms": statistics.median(times[False]) * 1e3,
            "round_tokens_ms": statistics.median(times[True]) * 1e3, "shards": shards}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--shards", type=int, default=4)
    opts = parser.parse_args()
    setup_logging()
    with tempfile.TemporaryDirectory(prefix="gradshard-bench-tokens-") as tmp:
        root = Path(tmp)
        result: dict[str, Any] = {**pieces(root, opts.repeats), **noop(root, opts.repeats),
                                  **rounds(root, opts.params, opts.clients, opts.shards, opts.rounds)}
    per_token = result["mint_ms"] + result["decode_ms"]
    print(f"mint (sign)                          {result['mint_ms']:.3f} ms")
    print(f"decode (verify, claims)              {result['decode_ms']:.3f} ms")
    print(f"authorize + put_new, fsync off / on  {result['authorize_fsync_off_ms']:.3f} / "
          f"{result['authorize_fsync_on_ms']:.3f} ms")
    print(f"per invocation (mint+decode+authorize, fsync on)  "
          f"{per_token + result['authorize_fsync_on_ms']:.3f} ms")
    print(f"noop invocation, plain / tokens      {result['noop_plain_ms']:.2f} / {result['noop_tokens_ms']:.2f} ms "
          f"(+{result['noop_tokens_ms'] - result['noop_plain_ms']:.2f} ms)")
    print(f"sharded round ({opts.params} params, {opts.clients} clients, {opts.shards} shards), plain / tokens  "
          f"{result['round_plain_ms']:.1f} / {result['round_tokens_ms']:.1f} ms "
          f"(x{result['round_tokens_ms'] / result['round_plain_ms']:.3f}); aggregates identical")
    write_section(BENCH_DIR / "out" / "tokens.json", "tokens", result)


if __name__ == "__main__":
    main()
