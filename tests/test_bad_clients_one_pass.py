"""Issue 11 item 10: k bad clients cost one rerun of the round, not k + 1 (every bad client found in one pass)."""

from __future__ import annotations

import numpy as np
import pytest

from gradshard import AggregateConfig, InlineExecutor, MemoryStore, ModelLayout, TensorSpec, aggregate_round
from gradshard.core.reduce import fedavg, fedavg_weights
from gradshard.format.keys import aggregate_key, update_key
from gradshard.format.round import RoundSpec, open_round
from gradshard.format.update import UpdateMeta, read_flat
from gradshard.format.writer import write_update

LAYOUT = ModelLayout([TensorSpec("w", (40, 10), "float32")])
CHUNK = 16


def corrupt_payload(store: MemoryStore, key: str, element: int) -> None:
    blob = bytearray(store.get(key))
    blob[len(blob) - 4 * (LAYOUT.numel - element)] ^= 0x10  # flip one bit of that element's bytes
    store.put(key, bytes(blob))


@pytest.mark.parametrize("reducer", ["mean", "median"])
def test_twenty_bad_clients_are_rejected_in_one_rerun(reducer: str) -> None:
    # Prepare: 30 clients; 10 corrupted (digest), 10 with NaN, spread over the shards
    rng = np.random.default_rng(0)
    store = MemoryStore()
    open_round(store, RoundSpec.create(0, LAYOUT, chunk_elems=CHUNK))
    good: dict[str, np.ndarray] = {}
    for i in range(30):
        client = f"c{i:02d}"
        values = rng.standard_normal(LAYOUT.numel).astype(np.float32)
        if 10 <= i < 20:
            values[(37 * i) % LAYOUT.numel] = np.nan
        write_update(store, update_key(0, client), LAYOUT, values, UpdateMeta(
            client=client, round=0, examples=i + 1, layout_digest=LAYOUT.digest(), chunk_elems=CHUNK))
        if i < 10:
            corrupt_payload(store, update_key(0, client), (53 * i) % LAYOUT.numel)
        elif i >= 20:
            good[client] = values

    # Execute
    result = aggregate_round(store, 0, InlineExecutor(), AggregateConfig(shards=4, reducer=reducer))

    # Assert: two runs of 4 invocations, all 20 named with their reason, the 10 good ones aggregated exactly
    assert result.runs == 2
    assert len(result.all_reports) == 8
    assert sorted(result.manifest.rejected) == [f"c{i:02d}" for i in range(20)]
    assert all("checksum mismatch" in result.manifest.rejected[f"c{i:02d}"] for i in range(10))
    assert all("non-finite" in result.manifest.rejected[f"c{i:02d}"] for i in range(10, 20))
    order = sorted(good)
    if reducer == "mean":
        expected = fedavg([good[c] for c in order], fedavg_weights([int(c[1:]) + 1 for c in order]))
    else:
        expected = np.median(np.stack([good[c] for c in order]), axis=0)
    np.testing.assert_array_equal(read_flat(store, aggregate_key(0), LAYOUT), expected)
