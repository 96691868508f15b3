"""The outputs of a training run: ``metrics.json``, ``metrics.csv`` and ``accuracy.png``.

The input is the list of per-round metrics dictionaries that :meth:`gradshard.fl.driver.Trainer.run` returns (and
that the driver stores as ``metrics/<r>.json``); each function here is pure and returns bytes or text, and
:func:`write_outputs` writes all three files atomically (a temporary file renamed over the old one), so they can be
rewritten after every round and a reader never sees half a file.

:func:`recompute_flat` is the demo's bit-identity check: it redoes one round with the flat topology and an
unsharded server step in a scratch store and compares the bytes with the run's own; :func:`save_flat_check` records
the result in the run's store (``gradshard report`` shows it).

matplotlib is imported inside :func:`accuracy_png` and draws on an explicit Agg canvas (no pyplot, no global
backend switch): importing this module stays cheap and the figure renders headless.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradshard.extras import require_extra

if TYPE_CHECKING:
    from gradshard.fl.config import TrainConfig
    from gradshard.runtime.executor import Executor
    from gradshard.store import Store

METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
ACCURACY_PNG = "accuracy.png"

#: Columns of ``metrics.csv``, one row per round. ``aggregated``, ``rejected`` and ``failed`` are client counts
#: (``metrics.json`` has the client lists and the reasons).
CSV_COLUMNS = ("round", "test_accuracy", "test_loss", "client_loss", "aggregated", "rejected", "failed",
               "client_seconds", "aggregate_seconds", "server_seconds", "wall_seconds")

Metrics = Sequence[Mapping[str, Any]]


def csv_row(m: Mapping[str, Any]) -> dict[str, Any]:
    """One round's CSV row: the numbers as they are, the client collections as counts, a missing loss empty."""
    row: dict[str, Any] = {}
    for column in CSV_COLUMNS:
        value = m.get(column)
        if column in ("aggregated", "rejected", "failed"):
            value = len(value or ())
        row[column] = "" if value is None else value
    return row


def metrics_csv(metrics: Metrics) -> str:
    """``metrics.csv``: a header and one row per round (see :data:`CSV_COLUMNS`)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_row(m) for m in metrics)
    return buf.getvalue()


def summary(metrics: Metrics) -> dict[str, Any]:
    """Rounds done, final and best test accuracy, and time totals (all ``None``/0 before the first round)."""
    accuracies = [float(m["test_accuracy"]) for m in metrics]
    walls = [float(m["wall_seconds"]) for m in metrics]
    best = max(range(len(accuracies)), key=lambda i: accuracies[i]) if accuracies else None
    return {
        "rounds": len(metrics),
        "final_test_accuracy": accuracies[-1] if accuracies else None,
        "final_test_loss": float(metrics[-1]["test_loss"]) if metrics else None,
        "best_test_accuracy": accuracies[best] if best is not None else None,
        "best_round": int(metrics[best]["round"]) if best is not None else None,
        "total_wall_seconds": math.fsum(walls),
        "mean_round_seconds": math.fsum(walls) / len(walls) if walls else None,
        "client_seconds": math.fsum(float(m["client_seconds"]) for m in metrics),
        "aggregate_seconds": math.fsum(float(m["aggregate_seconds"]) for m in metrics),
        "server_seconds": math.fsum(float(m["server_seconds"]) for m in metrics),
    }


def metrics_json(metrics: Metrics, config: Mapping[str, Any] | None = None) -> str:
    """``metrics.json``: ``{"config": ..., "summary": ..., "rounds": [...]}`` with every round's full metrics."""
    doc = {"config": dict(config) if config is not None else None, "summary": summary(metrics),
           "rounds": [dict(m) for m in metrics]}
    return json.dumps(doc, indent=1) + "\n"


def accuracy_png(metrics: Metrics, title: str = "test accuracy per round") -> bytes:
    """Test accuracy (left axis) and test loss (right axis) after every round, as PNG bytes."""
    require_extra("plots", "the accuracy plot (accuracy.png)")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rounds = [int(m["round"]) for m in metrics]  # the model after round r (0-based, as in the store)
    accuracy = [float(m["test_accuracy"]) for m in metrics]
    loss = [float(m["test_loss"]) for m in metrics]
    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(rounds, accuracy, marker="o", markersize=3, color="#4c72b0", label="test accuracy")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0.0, 1.0)
    ax.grid(True, alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if rounds:
        ax.set_xlim(min(rounds) - 0.5, max(rounds) + 0.5)
        ax.annotate(f"{accuracy[-1]:.4f}", (rounds[-1], accuracy[-1]), xytext=(-4, -14), textcoords="offset points",
                    ha="right", fontsize=8, color="#4c72b0")
    twin = ax.twinx()
    twin.plot(rounds, loss, linestyle="--", color="#c44e52", linewidth=1, label="test loss")
    twin.set_ylabel("test loss")
    twin.set_ylim(bottom=0.0)
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="center right", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path`` and rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def write_outputs(out_dir: Path | str, metrics: Metrics, config: Mapping[str, Any] | None = None,
                  title: str = "test accuracy per round", png: bool = True) -> list[Path]:
    """Write ``metrics.json``, ``metrics.csv`` and (if ``png``) ``accuracy.png`` into ``out_dir``; their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {METRICS_JSON: metrics_json(metrics, config).encode(), METRICS_CSV: metrics_csv(metrics).encode()}
    if png:
        files[ACCURACY_PNG] = accuracy_png(metrics, title)
    for name, data in files.items():
        write_atomic(out / name, data)
    return [out / name for name in files]


# --- the bit-identity check of the demo --------------------------------------------------------------------------
@dataclass(frozen=True)
class FlatCheck:
    """sha256 of a round's aggregate and of the global model after it: as trained, and recomputed flat."""

    round: int
    sharded_aggregate: str
    flat_aggregate: str
    sharded_model: str
    flat_model: str

    @property
    def identical(self) -> bool:
        return self.sharded_aggregate == self.flat_aggregate and self.sharded_model == self.flat_model

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "identical": self.identical}


def save_flat_check(store: Store, check: FlatCheck) -> str:
    """Record ``check`` in the run's store (``rounds/<r>/flat_check.json``, one atomic put); returns the key."""
    from gradshard.format.keys import flat_check_key

    key = flat_check_key(check.round)
    store.put(key, (json.dumps(check.to_dict(), indent=1) + "\n").encode())
    return key


def recompute_flat(store: Store, config: TrainConfig, r: int, executor: Executor) -> FlatCheck:
    """Redo round ``r``'s aggregation with one flat aggregator and its server step unsharded, in a scratch store.

    The scratch store gets copies of the round's inputs only — its spec, the updates the clients wrote, the global
    model and server-optimizer state before the round, the kept buffers and the test set — and a spec whose cohort
    is the clients that wrote an update, so no client trains again there (a client that failed or was late in the
    real run stays out). The trainer then runs the round with ``aggregation.topology = "flat"``; the result compares
    the aggregate and the new global model with the run's own, byte for byte.
    """
    import tempfile

    from gradshard.fl.driver import Trainer
    from gradshard.format.keys import (
        KEPT_KEY,
        TEST_DATA_KEY,
        UPDATE_SUFFIX,
        aggregate_key,
        model_key,
        round_prefix,
        state_key,
    )
    from gradshard.format.round import load_spec, open_round
    from gradshard.store import LocalStore

    spec = load_spec(store, r)
    updates = store.list(f"{round_prefix(r)}/updates/")
    present = sorted(k.rsplit("/", 1)[-1].removesuffix(UPDATE_SUFFIX) for k in updates)
    inputs = [*updates, model_key(r), TEST_DATA_KEY, *(state_key(r, s) for s in config.server.slots if r > 0)]
    if store.exists(KEPT_KEY):
        inputs.append(KEPT_KEY)
    flat_config = config.model_copy(update={"aggregation": config.aggregation.model_copy(update={"topology": "flat"})})
    with tempfile.TemporaryDirectory(prefix="gradshard-flat-check-") as tmp:
        scratch = LocalStore(tmp, fsync=False)
        for key in inputs:
            scratch.put(key, store.get(key))
        open_round(scratch, spec.model_copy(update={"cohort": present}))
        Trainer(scratch, flat_config, executor).run_round(r)
        return FlatCheck(round=r, sharded_aggregate=_sha256(store, aggregate_key(r)),
                         flat_aggregate=_sha256(scratch, aggregate_key(r)),
                         sharded_model=_sha256(store, model_key(r + 1)), flat_model=_sha256(scratch, model_key(r + 1)))


def _sha256(store: Store, key: str) -> str:
    import hashlib

    return hashlib.sha256(store.get(key)).hexdigest()
