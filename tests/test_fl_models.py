"""Tests of gradshard.fl.models: layouts equal to the zoo's, the numpy state bridge, determinism, a real fit."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from gradshard.core import zoo
from gradshard.errors import LayoutError
from gradshard.fl.data import Dataset, load_digits
from gradshard.fl.models import (
    MLP,
    MODELS,
    VGG16,
    ResNet18,
    SmallCNN,
    build_model,
    deterministic_torch,
    layout_of,
    load_numpy_state,
    seed_everything,
    state_to_numpy,
)


@pytest.fixture(scope="module")
def digits() -> tuple[Dataset, Dataset]:
    return load_digits()


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """These models are tiny: extra intra-op threads only add contention (and are slow on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train_sgd_one_epoch(train: Dataset, seed: int) -> dict[str, np.ndarray]:
    """One epoch of shuffled mini-batch SGD on a fresh MLP; everything random comes from ``seed``."""
    seed_everything(seed)
    model = MLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    order = torch.randperm(len(train))
    for start in range(0, len(train), 32):
        batch = order[start : start + 32]
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    return state_to_numpy(model)


def _accuracy(model: nn.Module, data: Dataset) -> float:
    with torch.no_grad():
        predicted = model(torch.from_numpy(data.x)).argmax(dim=1).numpy()
    return float((predicted == data.y).mean())


# --- layouts ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes", [(64, 128, 10), (64, 32, 16, 10), (20, 4)])
def test_mlp_layout_equals_the_zoo(sizes: tuple[int, ...]) -> None:
    # Prepare / Execute
    layout = layout_of(MLP(sizes))

    # Assert
    assert layout == zoo.mlp(sizes=sizes)
    assert [t.name for t in layout][:2] == ["layers.0.weight", "layers.0.bias"]


@pytest.mark.parametrize("num_classes", [10, 100])
def test_resnet18_layout_equals_the_zoo_including_int64_counters(num_classes: int) -> None:
    # Prepare / Execute
    layout = layout_of(ResNet18(num_classes=num_classes))

    # Assert
    assert layout == zoo.resnet18_cifar(num_classes=num_classes)
    assert layout.slot("layer2.0.downsample.1.num_batches_tracked").spec.dtype == "int64"
    assert len(layout.kept()) == 20


def test_vgg16_layout_equals_the_zoo() -> None:
    # Prepare: on the meta device the 134 M parameters get shapes and dtypes but no memory and no init time
    with torch.device("meta"):
        model = VGG16()

    # Execute
    layout = layout_of(model)

    # Assert
    assert layout == zoo.vgg16()
    assert layout.numel == 134_301_514


def test_models_run_forward_on_their_inputs() -> None:
    # Prepare
    seed_everything(0)
    images = torch.rand(3, 1, 8, 8)
    cnn = SmallCNN()

    # Execute
    flat_out = cnn(images.reshape(3, 64))
    image_out = cnn(images)
    mlp_out = MLP()(images)
    resnet_out = ResNet18(num_classes=7).eval()(torch.rand(2, 3, 32, 32))  # CIFAR-sized

    # Assert
    torch.testing.assert_close(flat_out, image_out)
    assert flat_out.shape == mlp_out.shape == (3, 10)
    assert resnet_out.shape == (2, 7)
    assert 20_000 <= sum(p.numel() for p in cnn.parameters()) <= 40_000


def test_build_model_knows_every_name_and_forwards_options() -> None:
    # Prepare / Execute
    mlp = build_model("mlp", 4, in_features=20)
    cnn = build_model("cnn", 3)
    resnet = build_model("resnet18")

    # Assert
    assert sorted(MODELS) == ["cnn", "convnet", "mlp", "resnet18", "vgg16"]
    assert layout_of(mlp) == zoo.mlp(sizes=(20, 128, 4))
    assert cnn(torch.zeros(1, 64)).shape == (1, 3)
    assert layout_of(resnet) == zoo.get_layout("resnet18")


def test_unknown_names_and_bad_sizes_raise_layout_errors() -> None:
    with pytest.raises(LayoutError, match="unknown model 'lenet'; known: cnn, convnet, mlp, resnet18, vgg16"):
        build_model("lenet")
    with pytest.raises(LayoutError, match="two positive layer sizes"):
        MLP((64,))
    with pytest.raises(LayoutError, match="even image_size"):
        SmallCNN(image_size=7)


# --- the numpy bridge -----------------------------------------------------------------------------------------
def test_state_round_trips_through_the_flat_vector_exactly() -> None:
    # Prepare: a ResNet whose BN buffers (float stats, int64 counters) have moved away from their initial values
    seed_everything(1)
    source = ResNet18()
    source(torch.rand(2, 3, 16, 16))
    state = state_to_numpy(source)
    layout = layout_of(source)
    floating, kept = layout.split_state(state)
    averaged = layout.aggregated()
    flat = averaged.flatten(floating)
    flat.setflags(write=False)  # what a verified read may hand back
    seed_everything(2)
    target = ResNet18()

    # Execute
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.from_numpy would warn about a read-only array
        load_numpy_state(target, layout.assemble(averaged.unflatten(flat), kept))

    # Assert
    loaded = state_to_numpy(target)
    assert list(loaded) == list(state)
    for name, value in state.items():
        np.testing.assert_array_equal(loaded[name], value)
    assert int(loaded["bn1.num_batches_tracked"]) == 1


def test_state_to_numpy_is_a_snapshot_and_float64_loads_cast() -> None:
    # Prepare
    seed_everything(0)
    model = MLP((4, 3))
    snapshot = state_to_numpy(model)
    before = snapshot["layers.0.weight"].copy()

    # Execute
    weight = model.get_parameter("layers.0.weight")
    with torch.no_grad():
        weight.add_(1.0)
    load_numpy_state(model, {k: v.astype(np.float64) for k, v in snapshot.items()})

    # Assert
    np.testing.assert_array_equal(snapshot["layers.0.weight"], before)
    assert weight.dtype == torch.float32
    np.testing.assert_array_equal(weight.detach().numpy(), before)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.pop("layers.1.bias"), r"missing \['layers.1.bias'\]"),
        (lambda s: s.update(extra=np.zeros(1, np.float32)), r"unexpected \['extra'\]"),
        (lambda s: s.update({"layers.0.weight": np.zeros((3, 5), np.float32)}), "'layers.0.weight' has shape"),
    ],
    ids=["missing", "extra", "shape"],
)
def test_load_numpy_state_is_strict_and_changes_nothing_on_error(change: Any, message: str) -> None:
    # Prepare
    model = MLP((4, 3, 2))
    before = state_to_numpy(model)
    arrays = {k: v + 1.0 for k, v in before.items()}
    change(arrays)

    # Execute / Assert
    with pytest.raises(LayoutError, match=message):
        load_numpy_state(model, arrays)
    for name, value in state_to_numpy(model).items():
        np.testing.assert_array_equal(value, before[name])


def test_load_numpy_state_refuses_floats_for_integer_buffers() -> None:
    # Prepare
    model = nn.BatchNorm1d(2)
    arrays = state_to_numpy(model)
    arrays["num_batches_tracked"] = np.array(1.5)

    # Execute / Assert
    with pytest.raises(LayoutError, match="'num_batches_tracked' is float64 but the model holds int64"):
        load_numpy_state(model, arrays)


# --- determinism and a real fit ------------------------------------------------------------------------------
def test_same_seed_gives_bit_identical_training(digits: tuple[Dataset, Dataset]) -> None:
    # Prepare
    train, _ = digits

    # Execute
    with deterministic_torch():
        first = _train_sgd_one_epoch(train, seed=7)
        second = _train_sgd_one_epoch(train, seed=7)
        other = _train_sgd_one_epoch(train, seed=8)

    # Assert
    for name, value in first.items():
        np.testing.assert_array_equal(second[name], value)
    assert not np.array_equal(other["layers.0.weight"], first["layers.0.weight"])


def test_deterministic_torch_restores_the_previous_settings() -> None:
    # Prepare
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())

    # Execute
    with deterministic_torch(threads=2):
        inside = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())

    # Assert
    assert inside == (2, True)
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == before


def test_mlp_learns_digits_full_batch(digits: tuple[Dataset, Dataset]) -> None:
    # Prepare
    train, test = digits
    seed_everything(0)
    model = MLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)

    # Execute
    for _ in range(30):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()  # type: ignore[no-untyped-call]
        optimizer.step()

    # Assert
    assert _accuracy(model, test) > 0.9
