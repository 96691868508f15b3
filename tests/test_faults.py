"""Bad updates: corrupted, truncated or non-finite updates are rejected by name, and nothing partial is published.

Most tests run in-process (LocalStore + InlineExecutor); one variant runs the functions as worker processes.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from gradshard.aggregation.driver import AggregateConfig, AggregateResult, aggregate_round
from gradshard.core.layout import ModelLayout
from gradshard.core.reduce import fedavg, fedavg_weights
from gradshard.core.zoo import synthetic
from gradshard.errors import RoundError
from gradshard.format.keys import aggregate_key, reports_key, update_key
from gradshard.format.round import RoundSpec, open_round
from gradshard.format.update import UpdateMeta, open_update, read_flat
from gradshard.format.writer import write_update
from gradshard.runtime import Executor, InlineExecutor, LocalExecutor
from gradshard.store import LocalStore

R = 3
NUMEL = 6 * 1024 + 100  # not a multiple of the chunk: the last chunk is short
CHUNK = 1024
EXAMPLES = {"alice": 10, "bob": 25, "carol": 7, "dave": 40}
SHARDED = AggregateConfig(shards=3, window_bytes=2048)  # several windows per shard
FLAT = AggregateConfig(topology="flat")


@dataclass
class Round:
    """A round in a LocalStore with the clients' vectors kept for the reference computation."""

    store: LocalStore
    layout: ModelLayout
    vectors: dict[str, npt.NDArray[np.float32]]

    def path(self, client: str) -> Path:
        return self.store.root / update_key(R, client)

    def data_offset(self, client: str) -> int:
        """Byte offset of the data section in the client's object."""
        with open(self.path(client), "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n

    def write(self, client: str, vector: npt.NDArray[np.float32]) -> None:
        self.vectors[client] = vector
        write_update(self.store, update_key(R, client), self.layout, vector,
                     UpdateMeta(client=client, round=R, examples=EXAMPLES[client], layout_digest=self.layout.digest(),
                                chunk_elems=CHUNK))

    def expected(self, *, without: tuple[str, ...] = ()) -> bytes:
        """FedAvg (by examples, float32) of every client but ``without``, in canonical (sorted) order."""
        clients = sorted(c for c in self.vectors if c not in without)
        weights = fedavg_weights([EXAMPLES[c] for c in clients])
        return fedavg([self.vectors[c] for c in clients], weights, "float32").tobytes()

    def aggregate(self) -> bytes:
        """The published aggregate's flat vector (every chunk's checksum verified)."""
        return read_flat(self.store, aggregate_key(R), self.layout, "aggregate").tobytes()

    def uploads_left(self) -> list[str]:
        uploads = self.store.root / ".uploads"
        return sorted(p.name for p in uploads.iterdir()) if uploads.exists() else []


def make_round(root: Path, *, min_clients: int = 1) -> Round:
    layout = synthetic(NUMEL, tensor_elems=2500)
    store = LocalStore(root, fsync=False)
    open_round(store, RoundSpec.create(R, layout, chunk_elems=CHUNK, min_clients=min_clients))
    rnd = Round(store, layout, {})
    rng = np.random.default_rng(42)
    for client in EXAMPLES:
        rnd.write(client, rng.standard_normal(NUMEL, dtype=np.float32))
    return rnd


@pytest.fixture
def rnd(tmp_path: Path) -> Round:
    return make_round(tmp_path / "store")


def corrupt(rnd: Round, client: str, element: int) -> None:
    """Flip the bits of one byte of ``element`` in the client's stored object (the header stays valid)."""
    offset = rnd.data_offset(client) + element * 4 + 1
    with open(rnd.path(client), "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0xFF]))


def truncate(rnd: Round, client: str, drop: int = 100) -> None:
    path = rnd.path(client)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - drop)


def run(rnd: Round, config: AggregateConfig = SHARDED, executor: Executor | None = None) -> AggregateResult:
    return aggregate_round(rnd.store, R, executor or InlineExecutor(), config)


# --- corrupted data --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [SHARDED, FLAT], ids=["sharded", "flat"])
def test_a_corrupted_update_is_rejected_and_the_rest_are_averaged(rnd: Round, config: AggregateConfig) -> None:
    # Prepare
    corrupt(rnd, "bob", element=4 * CHUNK + 17)  # inside the last shard

    # Execute
    result = run(rnd, config)

    # Assert
    assert list(result.manifest.rejected) == ["bob"]
    assert "checksum mismatch in chunk 4" in result.manifest.rejected["bob"]
    assert [c.client for c in result.manifest.clients] == ["alice", "carol", "dave"]
    assert result.runs == 2  # found while reducing, then run again without bob
    assert rnd.aggregate() == rnd.expected(without=("bob",))
    with open_update(rnd.store, aggregate_key(R), "aggregate", rnd.layout) as agg:
        assert agg.meta.extra["clients"] == "alice,carol,dave"
        assert agg.meta.examples == 10 + 7 + 40
    assert rnd.uploads_left() == []


def test_an_intact_round_averages_every_client(rnd: Round) -> None:
    # Prepare / Execute
    result = run(rnd)

    # Assert
    assert result.manifest.rejected == {}
    assert result.runs == 1
    assert rnd.aggregate() == rnd.expected()
    assert rnd.aggregate() != rnd.expected(without=("bob",))  # the reference is sensitive to a missing client


def test_the_failed_attempt_names_the_client_in_its_report(rnd: Round) -> None:
    # Prepare
    corrupt(rnd, "carol", element=10)

    # Execute
    result = run(rnd)

    # Assert
    failed = [r for r in result.all_reports if not r.ok]
    assert [(r.invocation, r.error_type, r.client, r.attempts) for r in failed] == [
        ("shard-0000", "UpdateError", "carol", 1)]
    assert failed[0].reason is not None and "checksum mismatch in chunk 0" in failed[0].reason
    assert len(result.all_reports) == 2 * len(result.plan.invocations)


@pytest.mark.integration
def test_a_corrupted_update_is_rejected_by_worker_processes(rnd: Round) -> None:
    # Prepare
    corrupt(rnd, "dave", element=2 * CHUNK + 5)

    # Execute
    with LocalExecutor(workers=2, retries=2) as executor:
        result = run(rnd, SHARDED, executor)

    # Assert
    assert list(result.manifest.rejected) == ["dave"]
    assert "checksum" in result.manifest.rejected["dave"]
    assert rnd.aggregate() == rnd.expected(without=("dave",))
    failed = [r for r in result.all_reports if not r.ok]
    assert [(r.error_type, r.client, r.attempts) for r in failed] == [("UpdateError", "dave", 1)]  # not retried
    assert all(r.ok and r.peak_rss_bytes for r in result.reports)
    assert rnd.uploads_left() == []


# --- truncated objects -----------------------------------------------------------------------------------------
def test_a_truncated_update_is_rejected_at_validation(rnd: Round, caplog: pytest.LogCaptureFixture) -> None:
    # Prepare
    truncate(rnd, "alice")

    # Execute
    with caplog.at_level(logging.WARNING, logger="gradshard"):
        result = run(rnd)

    # Assert
    reason = result.manifest.rejected["alice"]
    assert list(result.manifest.rejected) == ["alice"]
    assert "is truncated" in reason
    assert update_key(R, "alice") in reason
    assert result.runs == 1  # no function ever read it
    assert any("update of client 'alice' rejected" in m and "truncated" in m for m in caplog.messages)
    assert rnd.aggregate() == rnd.expected(without=("alice",))


def test_an_update_shorter_than_a_header_is_rejected(rnd: Round) -> None:
    # Prepare
    with open(rnd.path("carol"), "r+b") as f:
        f.truncate(5)

    # Execute
    result = run(rnd)

    # Assert
    assert result.manifest.rejected == {
        "carol": f"object {update_key(R, 'carol')!r} is truncated: 5 bytes, too short for a header"}
    assert rnd.aggregate() == rnd.expected(without=("carol",))


# --- non-finite values -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("config", [SHARDED, FLAT], ids=["sharded", "flat"])
def test_non_finite_values_are_rejected_naming_the_client(rnd: Round, value: float, config: AggregateConfig) -> None:
    # Prepare
    bad = rnd.vectors["bob"].copy()
    bad[3 * CHUNK + 9] = value
    rnd.write("bob", bad)  # a well-formed object with valid checksums: only the values are wrong

    # Execute
    result = run(rnd, config)

    # Assert
    assert list(result.manifest.rejected) == ["bob"]
    assert "non-finite values (NaN or inf)" in result.manifest.rejected["bob"]
    assert rnd.aggregate() == rnd.expected(without=("bob",))
    assert np.isfinite(np.frombuffer(rnd.aggregate(), dtype=np.float32)).all()


def test_non_finite_values_in_two_clients_reject_both(rnd: Round) -> None:
    # Prepare
    for client, element in (("alice", 0), ("dave", NUMEL - 1)):
        bad = rnd.vectors[client].copy()
        bad[element] = np.nan
        rnd.write(client, bad)

    # Execute
    result = run(rnd)

    # Assert
    assert sorted(result.manifest.rejected) == ["alice", "dave"]
    assert all("non-finite" in reason for reason in result.manifest.rejected.values())
    assert rnd.aggregate() == rnd.expected(without=("alice", "dave"))


# --- policy "fail" and too few clients -------------------------------------------------------------------------
@pytest.mark.parametrize("fault", ["corrupted", "truncated"])
def test_policy_fail_fails_the_round_naming_the_client(rnd: Round, fault: str) -> None:
    # Prepare
    if fault == "corrupted":
        corrupt(rnd, "carol", element=CHUNK)
    else:
        truncate(rnd, "carol")

    # Execute
    with pytest.raises(RoundError, match=r"carol") as excinfo:
        run(rnd, AggregateConfig(shards=3, window_bytes=2048, policy="fail"))

    # Assert
    assert ("checksum mismatch" if fault == "corrupted" else "truncated") in str(excinfo.value)
    assert not rnd.store.exists(aggregate_key(R))
    assert not rnd.store.exists(reports_key(R))
    assert rnd.uploads_left() == []


@pytest.mark.parametrize("fault", ["corrupted", "truncated"])
def test_too_few_valid_clients_fail_the_round(tmp_path: Path, fault: str) -> None:
    # Prepare
    rnd = make_round(tmp_path, min_clients=4)
    if fault == "corrupted":
        corrupt(rnd, "dave", element=0)
    else:
        truncate(rnd, "dave")

    # Execute
    with pytest.raises(RoundError) as excinfo:
        run(rnd)

    # Assert
    message = str(excinfo.value)
    assert f"round {R} has 3 valid updates, needs at least 4" in message
    assert "'dave'" in message  # the rejected clients are listed
    assert not rnd.store.exists(aggregate_key(R))
    assert rnd.uploads_left() == []


def test_exactly_min_clients_valid_is_enough(tmp_path: Path) -> None:
    # Prepare
    rnd = make_round(tmp_path, min_clients=3)
    corrupt(rnd, "dave", element=0)

    # Execute
    result = run(rnd)

    # Assert
    assert list(result.manifest.rejected) == ["dave"]
    assert rnd.aggregate() == rnd.expected(without=("dave",))


# --- an existing aggregate is only ever replaced by a complete one ---------------------------------------------
@pytest.mark.parametrize("failure", ["policy-fail", "too-few-clients"])
def test_a_failing_run_leaves_the_previous_aggregate_untouched(tmp_path: Path, failure: str) -> None:
    # Prepare
    rnd = make_round(tmp_path, min_clients=4 if failure == "too-few-clients" else 1)
    run(rnd)
    before = (rnd.store.root / aggregate_key(R)).read_bytes()
    reports_before = rnd.store.get(reports_key(R))
    corrupt(rnd, "bob", element=5 * CHUNK + 3)
    policy = "fail" if failure == "policy-fail" else "skip"

    # Execute
    with pytest.raises(RoundError, match="bob"):
        run(rnd, AggregateConfig(shards=3, window_bytes=2048, policy=policy))

    # Assert
    assert (rnd.store.root / aggregate_key(R)).read_bytes() == before
    assert rnd.aggregate() == rnd.expected()  # still the complete, verifiable aggregate of the good run
    assert rnd.store.get(reports_key(R)) == reports_before
    assert rnd.uploads_left() == []


def test_a_successful_rerun_replaces_the_aggregate_with_a_complete_one(rnd: Round) -> None:
    # Prepare
    run(rnd)
    assert rnd.aggregate() == rnd.expected()
    corrupt(rnd, "bob", element=2 * CHUNK)

    # Execute
    result = run(rnd)

    # Assert
    assert list(result.manifest.rejected) == ["bob"]
    assert rnd.aggregate() == rnd.expected(without=("bob",))
    assert rnd.uploads_left() == []


# --- reports.json ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("config", "ids"), [(SHARDED, ["shard-0000", "shard-0001", "shard-0002"]),
                                             (FLAT, ["flat-0000"])], ids=["sharded", "flat"])
def test_reports_json_lists_every_invocation(rnd: Round, config: AggregateConfig, ids: list[str]) -> None:
    # Prepare / Execute
    result = run(rnd, config)

    # Assert
    doc = json.loads(rnd.store.get(reports_key(R)))
    assert [r["invocation"] for r in doc["reports"]] == ids == [inv.id for inv in result.plan.invocations]
    assert all(r["ok"] for r in doc["reports"])
    assert doc["plan"]["topology"] == config.topology
    assert doc["summary"]["invocations"] == len(ids)
    assert doc["summary"]["clients"] == len(EXAMPLES)
    assert doc["summary"]["bytes_written"] == NUMEL * 4
    assert doc["reports"] == [r.model_dump(mode="json") for r in result.reports]


def test_reports_json_records_the_rejected_client(rnd: Round) -> None:
    # Prepare
    corrupt(rnd, "alice", element=7)

    # Execute
    result = run(rnd)

    # Assert
    doc = json.loads(rnd.store.get(reports_key(R)))
    assert doc["summary"]["rejected"] == result.manifest.rejected
    assert "checksum" in doc["summary"]["rejected"]["alice"]
    assert doc["summary"]["clients"] == 3
    assert doc["summary"]["runs"] == 2
    assert [r["invocation"] for r in doc["reports"]] == ["shard-0000", "shard-0001", "shard-0002"]
    assert all(r["ok"] for r in doc["reports"])
