"""Layouts from a user's own torch model: layouts from modules and states, updates written by plain safetensors
(kept integer buffers included), float16 and bfloat16 models, and the metadata helper's round trip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradshard.aggregation.driver import AggregateConfig, aggregate_round
from gradshard.core import bfloat16
from gradshard.core.layout import ModelLayout, TensorSpec
from gradshard.errors import LayoutError, UpdateError
from gradshard.format.keys import aggregate_key, update_key
from gradshard.format.round import RoundSpec, open_round, prepare_round
from gradshard.format.update import UpdateMeta, open_update, read_flat
from gradshard.format.writer import update_metadata, with_header_digest, write_update
from gradshard.runtime import InlineExecutor
from gradshard.store import LocalStore, MemoryStore

torch = pytest.importorskip("torch")
import safetensors.torch  # noqa: E402 - after torch is known to be there

CHUNK = 16
EXAMPLES = {"alice": 3, "bob": 9, "carol": 7}


class BNNet(torch.nn.Module):
    """A conv + BatchNorm + linear model with a bool buffer: floating parameters, an int64 and a bool buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, 3)
        self.bn = torch.nn.BatchNorm2d(3)
        self.fc = torch.nn.Linear(12, 4)
        self.register_buffer("mask", torch.tensor([True, False, True, True]))


def _client_states(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, dict[str, Any]]:
    """Per client, the model's state with its floating tensors perturbed (a distinct seed each) in ``dtype``."""
    states = {}
    for seed, client in enumerate(EXAMPLES):
        gen = torch.Generator().manual_seed(seed)
        states[client] = {k: (v + torch.randn(v.shape, generator=gen)).to(dtype).contiguous()
                          if v.is_floating_point() else v.clone() + seed
                          for k, v in model.state_dict().items()}
    return states


def _expected_mean(vectors: dict[str, npt.NDArray[Any]]) -> npt.NDArray[np.float32]:
    """The documented FedAvg arithmetic, restated: w_i = n_i / Σn in float64 rounded to float32, clients by id,
    acc = w_0·x_0, then acc += w_i·x_i, every step in float32."""
    total = float(sum(EXAMPLES.values()))
    acc: npt.NDArray[np.float32] | None = None
    for client in sorted(vectors):
        term = np.float32(EXAMPLES[client] / total) * vectors[client].astype(np.float32)
        acc = term if acc is None else (acc + term).astype(np.float32)
    assert acc is not None
    return acc


def _aggregates(store: LocalStore, shards: tuple[int, ...] = (1, 2, 3)) -> dict[int, bytes]:
    out = {}
    for m in shards:
        aggregate_round(store, 0, InlineExecutor(), AggregateConfig(topology="sharded", shards=m, window_bytes=40))
        out[m] = store.get(aggregate_key(0))
    return out


def _save_plain(store: LocalStore, layout: ModelLayout, client: str, tensors: dict[str, Any]) -> None:
    path = store.root / update_key(0, client)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, path, metadata=update_metadata(
        layout, tensors, client=client, round=0, examples=EXAMPLES[client], chunk_elems=CHUNK))


# --- 1. layouts from modules and states --------------------------------------------------------------------------
def test_from_module_equals_from_state_dict_and_numpy_arrays_give_the_same_layout() -> None:
    # Prepare
    model = BNNet()
    state = model.state_dict()

    # Execute
    from_module = ModelLayout.from_module(model)
    from_torch = ModelLayout.from_state_dict(state)
    from_numpy = ModelLayout.from_state_dict({k: v.numpy() for k, v in state.items()})

    # Assert
    assert from_module == from_torch == from_numpy
    assert [t.name for t in from_module] == list(state)
    assert {t.name: t.dtype for t in from_module.kept()} == {"bn.num_batches_tracked": "int64", "mask": "bool"}
    assert from_module.aggregated().numel == sum(v.numel() for v in state.values() if v.is_floating_point())


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "bfloat16", "int8", "uint8", "int32", "int64",
                                   "bool"])
def test_from_state_dict_records_every_stored_dtype_of_torch_tensors(dtype: str) -> None:
    state = {"t": torch.zeros(2, 3, dtype=getattr(torch, dtype))}

    layout = ModelLayout.from_state_dict(state)

    assert layout.tensors == (TensorSpec("t", (2, 3), dtype),)
    assert layout.nbytes == state["t"].element_size() * 6
    assert [t.name for t in layout.aggregated()] == (["t"] if state["t"].is_floating_point() else [])


def test_layouts_refuse_what_they_cannot_hold_naming_the_tensor() -> None:
    with pytest.raises(LayoutError, match=r"tensor 'z': .*complex64"):
        ModelLayout.from_state_dict({"z": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(LayoutError, match=r"expected a torch.nn.Module .* got dict"):
        ModelLayout.from_module({})


def test_import_gradshard_and_its_layout_modules_never_imports_torch() -> None:
    code = ("import sys, gradshard, gradshard.core.layout, gradshard.format.writer, gradshard.format.layouts; "
            "from gradshard import ModelLayout; print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


# --- 2 and 3. plain safetensors updates with kept buffers aggregate like the writer's ---------------------------
def test_torch_save_file_round_with_batchnorm_buffers_equals_the_writers_round_bit_for_bit(tmp_path: Path) -> None:
    # Prepare: store "plain" gets full state dicts (int64 and bool buffers included) from safetensors.torch,
    # store "ours" gets the same floating parts from write_update
    model = BNNet()
    layout = ModelLayout.from_module(model).aggregated()
    states = _client_states(model)
    flats = {c: _flat(layout, s) for c, s in states.items()}
    plain, ours = LocalStore(tmp_path / "plain"), LocalStore(tmp_path / "ours")
    for store in (plain, ours):
        open_round(store, RoundSpec.create(0, layout, chunk_elems=CHUNK))
    for client, state in states.items():
        _save_plain(plain, layout, client, state)
        write_update(ours, update_key(0, client), layout, flats[client],
                     UpdateMeta(client=client, round=0, examples=EXAMPLES[client], layout_digest=layout.digest(),
                                chunk_elems=CHUNK))

    # Execute
    manifest = prepare_round(plain, 0)
    with open_update(plain, update_key(0, "bob"), "bob", layout) as upd:
        plain_contiguous = upd.contiguous
    plain_out, our_out = _aggregates(plain), _aggregates(ours)

    # Assert: the plain file holds the kept buffers and another tensor order, yet aggregates to the same bytes
    with safetensors.safe_open(plain.root / update_key(0, "bob"), "np") as f:
        assert {"bn.num_batches_tracked", "mask"} <= set(f.keys())
    assert not plain_contiguous
    assert manifest.rejected == {}
    assert [c.client for c in manifest.clients] == sorted(EXAMPLES)
    assert len(set(plain_out.values()) | set(our_out.values())) == 1
    expected = _expected_mean(flats)
    np.testing.assert_array_equal(read_flat(plain, aggregate_key(0), layout).view(np.uint32),
                                  expected.view(np.uint32))


def _flat(layout: ModelLayout, state: dict[str, Any]) -> npt.NDArray[Any]:
    return layout.flatten({t.name: state[t.name] for t in layout})


def test_numpy_save_file_with_kept_buffers_is_accepted_and_reads_back_exactly() -> None:
    # Prepare
    model = BNNet()
    layout = ModelLayout.from_module(model).aggregated()
    state = {k: v.numpy() for k, v in _client_states(model)["alice"].items()}
    store = MemoryStore()
    open_round(store, RoundSpec.create(0, layout, chunk_elems=CHUNK))
    md = update_metadata(layout, state, client="alice", round=0, examples=3, chunk_elems=CHUNK)
    store.put(update_key(0, "alice"), safetensors.numpy.save(state, metadata=md))

    # Execute
    manifest = prepare_round(store, 0)
    flat = read_flat(store, update_key(0, "alice"), layout)

    # Assert
    assert [c.client for c in manifest.clients] == ["alice"]
    np.testing.assert_array_equal(flat.view(np.uint32), _flat(layout, state).view(np.uint32))


def test_a_floating_tensor_outside_the_layout_is_refused_by_the_helper_and_by_the_reader() -> None:
    # Prepare
    layout = ModelLayout([TensorSpec("w", (4,), "float32")])
    tensors = {"w": np.arange(4, dtype=np.float32), "stray": np.ones(2, np.float32)}
    md = update_metadata(layout, tensors["w"], client="c1", round=0, examples=1, chunk_elems=CHUNK)
    md = with_header_digest(ModelLayout([*layout, TensorSpec("stray", (2,), "float32")]), md)
    store = MemoryStore()
    store.put("u", safetensors.numpy.save(tensors, metadata=md))

    # Execute / Assert
    with pytest.raises(LayoutError, match=r"floating tensors \['stray'\] are not in the layout"):
        update_metadata(layout, tensors, client="c1", round=0, examples=1)
    with pytest.raises(UpdateError, match=r"unexpected tensors \['stray'\]"):
        open_update(store, "u", "c1", layout)


def test_the_helper_names_a_tensor_of_the_wrong_dtype_or_missing() -> None:
    layout = ModelLayout([TensorSpec("w", (4,), "float32")])

    with pytest.raises(LayoutError, match=r"tensor 'w' is float64 \(4,\), the layout says float32 \(4,\)"):
        update_metadata(layout, {"w": np.zeros(4)}, client="c1", round=0, examples=1)
    with pytest.raises(LayoutError, match="'w' of the layout is missing"):
        update_metadata(layout, {"v": np.zeros(4, np.float32)}, client="c1", round=0, examples=1)


# --- 4. float16 and bfloat16 models ----------------------------------------------------------------------------
def test_float16_model_aggregates_in_float32_to_a_float16_aggregate_identical_for_every_m(tmp_path: Path) -> None:
    # Prepare: a float16 model, its updates saved as float16 by safetensors.torch
    model = BNNet().half()
    layout = ModelLayout.from_module(model).aggregated("float16")
    states = _client_states(model, torch.float16)
    store = LocalStore(tmp_path)
    open_round(store, RoundSpec.create(0, layout, chunk_elems=CHUNK))
    for client, state in states.items():
        _save_plain(store, layout, client, state)

    # Execute
    outputs = _aggregates(store)
    aggregate = read_flat(store, aggregate_key(0), layout)

    # Assert: float32 arithmetic, rounded once to float16
    assert len(set(outputs.values())) == 1
    assert aggregate.dtype == np.float16
    expected = _expected_mean({c: _flat(layout, s) for c, s in states.items()}).astype(np.float16)
    np.testing.assert_array_equal(aggregate.view(np.uint16), expected.view(np.uint16))


def test_bfloat16_model_travels_as_float32_and_narrows_back_as_torch_does(tmp_path: Path) -> None:
    # Prepare: a bfloat16 model; its updates are its tensors widened to float32 (exact)
    model = BNNet().to(torch.bfloat16)
    model_layout = ModelLayout.from_module(model)
    layout = model_layout.aggregated()
    states = _client_states(model, torch.bfloat16)
    store = LocalStore(tmp_path)
    open_round(store, RoundSpec.create(0, layout, chunk_elems=CHUNK))
    for client, state in states.items():
        _save_plain(store, layout, client, {k: v.float() if v.is_floating_point() else v for k, v in state.items()})

    # Execute
    outputs = _aggregates(store)
    aggregate = read_flat(store, aggregate_key(0), layout)
    narrowed = bfloat16.from_float32(aggregate)

    # Assert: identical for every M; the float32 aggregate is the documented mean of the exact widenings; our
    # narrowing is torch's, and loading the aggregate into the bfloat16 model gives those bits
    from gradshard.fl.models import load_numpy_state

    assert len(set(outputs.values())) == 1
    widened = {c: _flat(layout, s) for c, s in states.items()}
    np.testing.assert_array_equal(aggregate.view(np.uint32), _expected_mean(widened).view(np.uint32))
    by_torch = torch.from_numpy(aggregate).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(narrowed, by_torch)
    _, kept = model_layout.split_state(model.state_dict())
    load_numpy_state(model, model_layout.assemble(layout.unflatten(aggregate), {k: v.numpy() for k, v in
                                                                                 kept.items()}))
    loaded = _flat(layout, {k: v for k, v in model.state_dict().items()})
    np.testing.assert_array_equal(bfloat16.from_float32(loaded), by_torch)


def test_bfloat16_conversions_match_torch_on_every_bit_pattern_and_on_random_floats() -> None:
    # Prepare: all 65,536 bfloat16 patterns; float32 values over the whole exponent range plus the edge cases
    patterns = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    rng = np.random.default_rng(0)
    values = (rng.standard_normal(50_000) * 10.0 ** rng.integers(-44, 38, 50_000)).astype(np.float32)
    values = np.concatenate([values, np.array([0.0, -0.0, np.inf, -np.inf, 3.4e38, -3.4e38, 1e-45, 1.00390625,
                                               1.01171875], np.float32)])

    # Execute
    widened = bfloat16.to_float32(patterns)
    narrowed = bfloat16.from_float32(values)

    # Assert: widening bit-exact (NaN patterns included); narrowing equal wherever torch gives a number, NaN
    # stays NaN
    by_torch = torch.from_numpy(patterns.view(np.int16)).view(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(widened.view(np.uint32), by_torch.view(np.uint32))
    torch_bits = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(narrowed, torch_bits)
    nan = bfloat16.from_float32(np.array([np.nan, -np.nan], np.float32))
    assert np.isnan(bfloat16.to_float32(nan)).all()


def test_bfloat16_on_the_wire_is_refused_in_one_line_naming_the_dtype() -> None:
    # Prepare: a file whose tensor is bfloat16, with format-1 metadata (no header digest) for a float32 layout
    layout = ModelLayout([TensorSpec("w", (4,), "float32")])
    md = update_metadata(layout, np.zeros(4, np.float32), client="c1", round=0, examples=1, chunk_elems=CHUNK)
    md["gradshard.format"] = "1"
    del md["gradshard.header_digest"]
    store = MemoryStore()
    store.put("u", safetensors.torch.save({"w": torch.zeros(4, dtype=torch.bfloat16)}, metadata=md))

    # Execute / Assert
    with pytest.raises(LayoutError, match=r"tensor 'w' is bfloat16 .*tensor.float\(\)"):
        update_metadata(layout, {"w": torch.zeros(4, dtype=torch.bfloat16)}, client="c1", round=0, examples=1)
    with pytest.raises(UpdateError, match=r"'BF16' \(bfloat16\) is not supported in updates: write bfloat16 "
                                          r"tensors as float32") as info:
        open_update(store, "u", "c1", layout)
    assert "\n" not in str(info.value)


# --- 6. the metadata helper's round trip ---------------------------------------------------------------------
_FLOATS = st.sampled_from(["float16", "float32", "float64"])
_KEPT = st.sampled_from(["int8", "int64", "uint8", "bool"])
_NAMES = st.text(alphabet="abcXYZ._09", min_size=1, max_size=8)


@st.composite
def _update(draw: st.DrawFn) -> tuple[ModelLayout, dict[str, npt.NDArray[Any]], int, str]:
    names = draw(st.lists(_NAMES, min_size=1, max_size=7, unique=True))
    split = draw(st.integers(1, len(names)))
    dtype = draw(_FLOATS)
    shapes = [tuple(draw(st.lists(st.integers(0, 5), max_size=3))) for _ in names]
    layout = ModelLayout(TensorSpec(n, s, dtype) for n, s in zip(names[:split], shapes[:split], strict=True))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    tensors = {t.name: rng.standard_normal(t.shape).astype(dtype) for t in layout}
    for name, shape in zip(names[split:], shapes[split:], strict=True):
        tensors[name] = rng.integers(0, 2, shape).astype(draw(_KEPT))
    order = draw(st.permutations(list(tensors)))
    return layout, {k: tensors[k] for k in order}, draw(st.integers(1, 50)), draw(st.sampled_from(
        ["xxh3_64", "blake3", "sha256"]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_update(), st.integers(1, 10**12), st.integers(0, 10**6))
def test_update_metadata_round_trips_through_plain_safetensors(
        case: tuple[ModelLayout, dict[str, npt.NDArray[Any]], int, str], examples: int, round_: int) -> None:
    layout, tensors, chunk, digest = case
    md = update_metadata(layout, tensors, client="c-1", round=round_, examples=examples, chunk_elems=chunk,
                         digest=digest)  # type: ignore[arg-type]
    store = MemoryStore()
    store.put("u", safetensors.numpy.save(tensors, metadata=md))

    with open_update(store, "u", "c-1", layout) as upd:
        flat = np.empty(layout.numel, layout.flat_dtype)
        if layout.numel:
            upd.read_verified(0, layout.numel, flat)
        meta, verified = upd.meta, upd.header_verified

    assert verified
    assert (meta.client, meta.round, meta.examples, meta.chunk_elems, meta.digest, meta.layout_digest) == (
        "c-1", round_, examples, chunk, digest, layout.digest())
    expected = np.concatenate([tensors[t.name].reshape(-1) for t in layout]) if layout.numel else flat
    np.testing.assert_array_equal(flat.view(np.uint8), expected.view(np.uint8))


# --- the documentation's example -----------------------------------------------------------------------------
def test_the_example_in_docs_layouts_md_runs(tmp_path: Path) -> None:
    doc = (Path(__file__).parents[1] / "docs" / "layouts.md").read_text()
    example = doc.split("```python\n", 1)[1].split("```", 1)[0]

    done = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['0.bias', '0.weight'] {}"
