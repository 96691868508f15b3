"""gradshard compare: prediction, the M choice, agreement, runs under a memory limit, output files and the CLI."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gradshard.aggregation.compare import (
    CompareResult,
    CompareRow,
    agreement,
    choose_shards,
    compare_round,
    measure_baseline,
)
from gradshard.cli.main import main
from gradshard.cli.plots import compare_png
from gradshard.core.reduce import fedavg, fedavg_weights
from gradshard.core.zoo import get_layout, synthetic
from gradshard.demo.synthetic import make_round
from gradshard.errors import PlanError
from gradshard.format.keys import aggregate_key, round_prefix
from gradshard.format.round import prepare_round
from gradshard.format.update import UpdateMeta, read_flat
from gradshard.format.writer import write_update
from gradshard.store import LocalStore, MemoryStore, Store

MIB = 1 << 20
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BIG = synthetic(1 << 22)  # 16 MiB per update: a tree node needs about 4 x 16 MiB, a shard function a window


def _assert_published_is_fedavg(store: Store, r: int) -> None:
    """The aggregate left in place is the FedAvg of the inputs, bit for bit."""
    manifest = prepare_round(store, r)
    layout = manifest.spec.model_layout()
    vectors = [read_flat(store, c.key, layout, c.client) for c in manifest.clients]
    expected = fedavg(vectors, fedavg_weights([c.examples for c in manifest.clients]))
    np.testing.assert_array_equal(read_flat(store, aggregate_key(r), layout), expected)


def _leftovers(store: LocalStore, r: int) -> list[str]:
    """Scratch a comparison must not leave behind: partials, the reference copy, unfinished uploads."""
    uploads = store.root / ".uploads"
    pending = [p.name for p in uploads.rglob("*") if p.is_file()] if uploads.exists() else []
    return store.list(f"{round_prefix(r)}/partials/") + store.list(f"{round_prefix(r)}/compare/") + pending


def test_choose_shards_takes_the_smallest_m_that_fits_and_4_without_a_limit() -> None:
    store = MemoryStore()
    make_round(store, 0, get_layout("synthetic-200000"), 3)
    manifest = prepare_round(store, 0)

    assert choose_shards(manifest, 512 << 10, None, 30 * MIB) == 4
    assert choose_shards(manifest, 512 << 10, 1 << 30, 30 * MIB) == 1
    assert choose_shards(manifest, 512 << 10, 31 * MIB, 30 * MIB) == 4  # nothing fits: the default, reported infeasible


def test_choose_shards_needs_more_shards_only_when_shards_get_shorter_than_a_window() -> None:
    store = MemoryStore()
    make_round(store, 0, get_layout("synthetic-200000"), 3)
    manifest = prepare_round(store, 0)
    whole_model_window = 1 << 30  # each shard function then holds its whole shard: its need falls with M

    m = choose_shards(manifest, whole_model_window, 30 * MIB + 9 * MIB, 30 * MIB)

    assert m > 1


def _write_aggregate(store: Store, key: str, values: np.ndarray) -> None:
    layout = synthetic(len(values))
    write_update(store, key, layout, values, UpdateMeta(client="aggregate", round=0, examples=1,
                                                        layout_digest=layout.digest(), chunk_elems=1024,
                                                        kind="aggregate"))


def test_agreement_is_exact_for_equal_bytes_and_measures_errors_window_by_window() -> None:
    store = MemoryStore()
    make_round(store, 0, synthetic(10_000), 2, chunk_elems=1024)
    manifest = prepare_round(store, 0)
    ref = np.linspace(-2.0, 4.0, 10_000, dtype=np.float32)
    off = ref.copy()
    off[7_777] += np.float32(0.5)
    _write_aggregate(store, "a/ref.safetensors", ref)
    _write_aggregate(store, "a/same.safetensors", ref.copy())
    _write_aggregate(store, "a/off.safetensors", off)

    same = agreement(store, "a/same.safetensors", "a/ref.safetensors", manifest, window_elems=3_000)
    differs = agreement(store, "a/off.safetensors", "a/ref.safetensors", manifest, window_elems=3_000)

    assert same == (True, 0.0, 0.0)
    exact, max_abs, max_rel = differs
    assert not exact
    assert max_abs == pytest.approx(0.5, rel=1e-6)
    assert max_rel == pytest.approx(0.5 / 4.0, rel=1e-6)


def _result() -> CompareResult:
    rows = [CompareRow("flat", False, "skipped", 1, 1, 72 * MIB, 102 * MIB, reason="too big"),
            CompareRow("sharded", True, "ok", 1, 1, 9 * MIB, 39 * MIB, shards=1, peak_rss_bytes=35 * MIB, wall_s=0.2,
                       reference=True, exact=True, max_abs_error=0.0, max_rel_error=0.0),
            CompareRow("lifl", False, "failed", 7, 3, 72 * MIB, 102 * MIB, branching=2, nodes=2,
                       error_type="MemoryLimitError", peak_rss_bytes=60 * MIB, wall_s=0.05)]
    return CompareResult(round=0, clients=6, model_bytes=16 * MIB, memory_limit_bytes=54 * MIB,
                         baseline_bytes=30 * MIB, reference="sharded", rows=rows)


def test_result_serialises_to_json_csv_and_a_png() -> None:
    result = _result()

    data = json.loads(result.to_json())
    lines = list(csv.DictReader(io.StringIO(result.to_csv())))
    png = compare_png(result)

    assert [r["architecture"] for r in data["rows"]] == ["flat", "sharded", "lifl"]
    assert data["rows"][1]["exact"] is True and data["memory_limit_bytes"] == 54 * MIB
    assert [line["status"] for line in lines] == ["skipped", "ok", "failed"]
    assert lines[0]["peak_rss_bytes"] == "" and lines[1]["shards"] == "1"
    assert png.startswith(PNG_MAGIC)
    assert [r.shape for r in result.rows] == ["single", "M=1", "b=2, 2 nodes"]


def test_unknown_architecture_is_refused_before_anything_runs(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    make_round(store, 0, get_layout("mlp"), 2)

    with pytest.raises(PlanError, match="unknown architecture"):
        compare_round(store, 0, architectures=("flat", "ring"))


@pytest.mark.integration
def test_compare_runs_every_architecture_on_the_same_round(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    make_round(store, 0, get_layout("synthetic-200000"), 6)
    events: list[str] = []

    result = compare_round(store, 0, on_event=lambda e: events.append(f"{e.kind}:{e.architecture}"))

    assert [r.architecture for r in result.rows] == ["flat", "sharded", "lambda-fl", "lifl"]
    assert all(r.status == "ok" and r.feasible and r.output_visible for r in result.rows)
    assert result.reference == "flat" and result.row("flat").reference
    sharded = result.row("sharded")
    assert sharded.exact and sharded.shards == 4 and sharded.max_abs_error == 0.0
    for tree in (result.row("lambda-fl"), result.row("lifl")):
        assert tree.max_rel_error is not None and tree.max_rel_error < 1e-6  # other summation order: not asserted exact
    lifl = result.row("lifl")
    assert lifl.levels == 3 and lifl.shm_handoffs and lifl.shm_bytes > 0 and lifl.branching == 2
    assert result.row("lambda-fl").group_size == 3 and result.row("lambda-fl").levels == 2
    assert all((r.peak_rss_bytes or 0) > result.baseline_bytes for r in result.rows)
    assert events.count("finished:lifl") == 1 and events.count("invocation:lifl") == 7
    _assert_published_is_fedavg(store, 0)
    assert _leftovers(store, 0) == []


@pytest.fixture(scope="module")
def big_round(tmp_path_factory: pytest.TempPathFactory) -> tuple[LocalStore, int]:
    """A round of 16 MiB updates and a limit of baseline + 24 MiB: only GradsSharding fits."""
    store = LocalStore(tmp_path_factory.mktemp("big") / "store")
    make_round(store, 0, BIG, 6)
    return store, measure_baseline(store) + 24 * MIB


@pytest.mark.integration
def test_under_a_limit_below_the_model_only_gradsharding_runs_and_it_is_correct(
        big_round: tuple[LocalStore, int]) -> None:
    store, limit = big_round

    result = compare_round(store, 0, memory_limit_bytes=limit, window_bytes=64 << 10)

    for name in ("flat", "lambda-fl", "lifl"):
        row = result.row(name)
        assert not row.feasible and row.status == "skipped" and row.peak_rss_bytes is None
        assert row.reason is not None and "infeasible" in row.reason and "needs" in row.reason
        assert row.predicted_peak_bytes > limit
    sharded = result.row("sharded")
    assert sharded.feasible and sharded.status == "ok" and sharded.shards == 1
    assert sharded.peak_rss_bytes is not None and sharded.peak_rss_bytes <= limit
    assert result.reference == "sharded" and "bit-identical to flat by construction" in sharded.note
    _assert_published_is_fedavg(store, 0)
    assert _leftovers(store, 0) == []


@pytest.mark.integration
def test_run_infeasible_makes_the_trees_fail_cleanly_under_the_cap(big_round: tuple[LocalStore, int]) -> None:
    store, limit = big_round

    result = compare_round(store, 0, memory_limit_bytes=limit, window_bytes=64 << 10, run_infeasible=True)

    for name in ("flat", "lambda-fl", "lifl"):
        row = result.row(name)
        assert not row.feasible and row.status == "failed"
        assert row.error_type == "MemoryLimitError" and row.error is not None and "memory cap" in row.error
        assert row.output_visible is False  # the failed run published nothing
        assert row.exact is None
    assert result.row("sharded").status == "ok" and result.row("sharded").reference
    _assert_published_is_fedavg(store, 0)
    assert _leftovers(store, 0) == []


@pytest.mark.integration
def test_cli_prints_one_table_and_writes_json_csv_png(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    make_round(store, 2, get_layout("synthetic-200000"), 4)
    out = tmp_path / "out"

    result = CliRunner().invoke(main, ["compare", "--store", str(store.root), "--round", "2", "--shards", "2",
                                       "--architectures", "flat,sharded,lambda-fl", "--out", str(out)])

    assert result.exit_code == 0, result.output
    assert "sharded (M=2)" in result.output and "exact" in result.output and "reference" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["compare.csv", "compare.json", "compare.png"]
    data = json.loads((out / "compare.json").read_text())
    assert [r["architecture"] for r in data["rows"]] == ["flat", "sharded", "lambda-fl"]
    assert len((out / "compare.csv").read_text().splitlines()) == 4
    assert (out / "compare.png").read_bytes().startswith(PNG_MAGIC)


def test_cli_refuses_an_unknown_architecture(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()

    result = CliRunner().invoke(main, ["compare", "--store", str(tmp_path / "store"), "--round", "0",
                                       "--architectures", "flat,ring"])

    assert result.exit_code == 2
    assert "ring" in result.output
