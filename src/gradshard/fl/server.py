"""The server update, applied shard by shard: θ ← θ + step(Δ) with optimizer state sharded in the store.

``Δ`` is the round's aggregated client delta. Optimizers (Reddi et al., "Adaptive Federated Optimization"):

- ``fedavg``:  θ' = θ + η·Δ
- ``fedavgm``: v' = β·v + Δ;  θ' = θ + η·v'
- ``fedadam``: m' = β₁·m + (1−β₁)·Δ;  v' = β₂·v + (1−β₂)·Δ²;  θ' = θ + η·m' / (√v' + τ)

Each ``server_step`` invocation reads its element range of θ, Δ and the state in windows and writes its range of
θ' and of the new state, so the server step never holds the whole model either. Every operation is element-wise
in float32, so the new model is the same bytes for every number of shards.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from gradshard.aggregation.contracts import OutputTarget
from gradshard.core.layout import ModelLayout
from gradshard.errors import GradshardError
from gradshard.format.keys import round_of_key
from gradshard.format.update import UpdateReader, VerifiedStream, open_update
from gradshard.format.writer import RangeWriter
from gradshard.runtime.registry import register
from gradshard.store import Store

Optimizer = Literal["fedavg", "fedavgm", "fedadam"]
STATE_SLOTS: dict[str, tuple[str, ...]] = {"fedavg": (), "fedavgm": ("v",), "fedadam": ("m", "v")}


class ServerOptimizer(BaseModel):
    """Server optimizer and its hyper-parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Optimizer = "fedavg"
    lr: float = Field(default=1.0, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)  # fedavgm's β
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.99, ge=0, lt=1)
    tau: float = Field(default=1e-3, gt=0)  # fedadam's adaptivity ε

    @property
    def slots(self) -> tuple[str, ...]:
        return STATE_SLOTS[self.name]


class ServerStepArgs(BaseModel):
    """Arguments of one ``server_step`` invocation over elements ``[start, stop)``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layout: list[list[Any]]
    start: int
    stop: int
    window_elems: int = Field(default=1 << 17, ge=1)
    optimizer: ServerOptimizer
    model_key: str
    delta_key: str
    state_keys: dict[str, str] = {}  # slot -> previous state object ("" for the first round: zeros)
    model_out: OutputTarget
    state_out: dict[str, OutputTarget] = {}


class ServerStepResult(BaseModel):
    """The digests of the chunks each output (``model`` and every state slot) received."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    checksums: dict[str, dict[int, str]]


def apply_window(opt: ServerOptimizer, theta: npt.NDArray[np.float32], delta: npt.NDArray[np.float32],
                 state: dict[str, npt.NDArray[np.float32]]) -> None:
    """One window of the update, in place: ``theta`` becomes θ', each state array its new value."""
    f = np.float32
    if opt.name == "fedavg":
        # where the delta is 0 the value is kept as it is: θ + 0 would turn a -0.0 into +0.0, and an element no
        # client trained (a frozen block, an uncovered subnetwork element) must stay bit for bit
        np.add(theta, f(opt.lr) * delta, out=theta, where=delta != 0)
    elif opt.name == "fedavgm":
        v = state["v"]
        v *= f(opt.momentum)
        v += delta
        theta += f(opt.lr) * v
    else:
        m, v = state["m"], state["v"]
        m *= f(opt.beta1)
        m += f(1 - opt.beta1) * delta
        v *= f(opt.beta2)
        v += f(1 - opt.beta2) * (delta * delta)
        theta += f(opt.lr) * m / (np.sqrt(v) + f(opt.tau))


def _open(store: Store, key: str, layout: ModelLayout, what: str) -> UpdateReader:
    return open_update(store, key, what, layout)


def server_step(args: ServerStepArgs, store: Store) -> ServerStepResult:
    """Apply the server optimizer to elements ``[start, stop)``; returns the checksums of every output's chunks."""
    layout = ModelLayout.from_json(args.layout)
    if layout.flat_dtype != "float32":
        raise GradshardError(f"the server step works on float32 models, got {layout.flat_dtype}")
    readers = {"model": _open(store, args.model_key, layout, "global model"),
               "delta": _open(store, args.delta_key, layout, "aggregate")}
    readers.update({slot: _open(store, key, layout, f"server state {slot}")
                    for slot, key in args.state_keys.items() if key})
    try:
        streams: dict[str, VerifiedStream] = {name: r.stream(args.start, args.stop) for name, r in readers.items()}
        window = min(args.window_elems, args.stop - args.start)
        chunk = readers["model"].grid.chunk_elems
        outputs = {"model": args.model_out, **args.state_out}
        writers = {name: RangeWriter(store, t.output_key, t.upload_id, t.data_start, args.start, layout, chunk,
                                     t.digest, window, "float32") for name, t in outputs.items()}
        buffers = {name: np.empty(window, dtype=np.float32) for name in ["model", "delta", *args.optimizer.slots]}
        for a in range(args.start, args.stop, window):
            n = min(window, args.stop - a)
            views = {name: buf[:n] for name, buf in buffers.items()}
            for name, view in views.items():
                if name in streams:
                    streams[name].read_next(view)
                else:
                    view.fill(0)  # no state yet: the optimizer starts from zeros
            apply_window(args.optimizer, views["model"], views["delta"],
                         {slot: views[slot] for slot in args.optimizer.slots})
            for name, writer in writers.items():
                writer.write(views[name])
    finally:
        for reader in readers.values():
            reader.close()
    return ServerStepResult(checksums={name: w.finish() for name, w in writers.items()})


register("server_step", server_step, args=ServerStepArgs, result=ServerStepResult,
         scope=lambda a: {"round": round_of_key(a.delta_key), "range": [a.start, a.stop]})
