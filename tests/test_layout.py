"""Model layouts: from numpy and PyTorch states, flatten / unflatten, averaged versus kept tensors."""

from __future__ import annotations

import numpy as np
import pytest

from gradshard.core.layout import ModelLayout, TensorSpec
from gradshard.errors import LayoutError

torch = pytest.importorskip("torch")


def _small_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 10))


def test_layout_from_torch_state_dict_keeps_order_shapes_and_dtypes() -> None:
    # Prepare
    state = _small_cnn().state_dict()

    # Execute
    layout = ModelLayout.from_state_dict(state)

    # Assert
    assert [t.name for t in layout] == list(state)
    assert layout.slot("0.weight").spec.shape == (4, 1, 3, 3)
    assert layout.slot("1.num_batches_tracked").spec.dtype == "int64"
    assert layout.numel == sum(v.numel() for v in state.values())


def test_aggregated_part_excludes_integer_buffers_and_kept_part_is_exactly_them() -> None:
    layout = ModelLayout.from_state_dict(_small_cnn().state_dict())

    aggregated, kept = layout.aggregated(), layout.kept()

    assert "1.num_batches_tracked" not in [t.name for t in aggregated]
    assert [t.name for t in kept] == ["1.num_batches_tracked"]
    assert "1.running_mean" in [t.name for t in aggregated]
    assert aggregated.flat_dtype == "float32"


def test_flatten_unflatten_round_trip_of_a_torch_state_is_exact() -> None:
    state = {k: v.numpy() for k, v in _small_cnn().state_dict().items()}
    layout = ModelLayout.from_arrays(state)
    floating, kept = layout.split_state(state)
    agg = layout.aggregated()

    flat = agg.flatten(floating)
    back = agg.unflatten(flat)
    full = layout.assemble(back, kept)

    assert flat.shape == (agg.numel,)
    assert list(full) == list(state)
    for name, value in state.items():
        np.testing.assert_array_equal(full[name], value)


def test_unflatten_returns_views_not_copies() -> None:
    layout = ModelLayout([TensorSpec("a", (2, 3), "float32"), TensorSpec("b", (4,), "float32")])
    flat = np.arange(10, dtype=np.float32)

    views = layout.unflatten(flat)
    flat[0] = 42.0

    assert views["a"][0, 0] == 42.0
    np.testing.assert_array_equal(views["b"], [6, 7, 8, 9])


def test_mixed_dtypes_have_no_flat_vector() -> None:
    layout = ModelLayout([TensorSpec("w", (3,), "float32"), TensorSpec("n", (), "int64")])

    with pytest.raises(LayoutError, match="one dtype"):
        layout.flatten({"w": np.zeros(3, np.float32), "n": np.array(1)})


@pytest.mark.parametrize(("arrays", "message"), [
    ({"a": np.zeros(3, np.float32)}, "missing"),
    ({"a": np.zeros(3, np.float32), "b": np.zeros(2, np.float32), "c": np.zeros(1, np.float32)}, "unexpected"),
    ({"a": np.zeros(4, np.float32), "b": np.zeros(2, np.float32)}, "shape"),
])
def test_flatten_names_the_tensor_that_does_not_fit(arrays: dict[str, np.ndarray], message: str) -> None:
    layout = ModelLayout([TensorSpec("a", (3,), "float32"), TensorSpec("b", (2,), "float32")])

    with pytest.raises(LayoutError, match=message):
        layout.flatten(arrays)


def test_layout_rejects_duplicates_and_bad_dtypes_and_round_trips_json() -> None:
    with pytest.raises(LayoutError, match="duplicate"):
        ModelLayout([TensorSpec("a", (1,), "float32"), TensorSpec("a", (2,), "float32")])
    with pytest.raises(LayoutError, match="cannot be stored"):
        TensorSpec("a", (1,), "complex64")
    layout = ModelLayout([TensorSpec("x", (2, 2), "float16")])
    assert ModelLayout.from_json(layout.to_json()) == layout
    assert ModelLayout.from_json(layout.to_json()).digest() == layout.digest()
    with pytest.raises(LayoutError, match="malformed"):
        ModelLayout.from_json([["x", "not-a-shape", "float32"]])


def test_bfloat16_state_is_recorded_and_carried_as_float32_never_as_a_flat_bfloat16_vector() -> None:
    state = {"w": torch.zeros(2, dtype=torch.bfloat16)}

    layout = ModelLayout.from_state_dict(state)

    assert layout.tensors == (TensorSpec("w", (2,), "bfloat16"),)
    assert layout.nbytes == 4
    assert layout.aggregated().tensors == (TensorSpec("w", (2,), "float32"),)
    with pytest.raises(LayoutError, match=r"cannot be bfloat16 .* use layout.aggregated\(\)"):
        layout.flat_dtype  # noqa: B018
