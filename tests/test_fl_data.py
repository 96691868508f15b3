"""Tests of gradshard.fl.data: the Dataset type, bundled and synthetic data, user data and client partitions."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradshard.errors import GradshardError
from gradshard.fl.data import (
    DataError,
    Dataset,
    check_partition,
    client_datasets,
    from_arrays,
    from_torch_dataset,
    label_counts,
    load_digits,
    make_synthetic,
    partition_dirichlet,
    partition_iid,
    stratified_split,
)


def _labelled(labels: list[int] | np.ndarray, num_classes: int | None = None) -> Dataset:
    """A data set whose only interesting part is its labels (one zero feature per example)."""
    y = np.asarray(labels, dtype=np.int64)
    return Dataset(np.zeros((len(y), 1), np.float32), y, num_classes or int(y.max()) + 1)


def _distinct_labels_per_client(dataset: Dataset, partition: list[np.ndarray]) -> float:
    return float((label_counts(dataset, partition) > 0).sum(axis=1).mean())


@pytest.fixture(scope="module")
def digits() -> tuple[Dataset, Dataset]:
    return load_digits()


def test_importing_the_data_module_loads_neither_torch_nor_sklearn() -> None:
    # Prepare
    probe = "import sys, gradshard.fl.data; print(sorted({'torch', 'sklearn'} & set(sys.modules)))"

    # Execute
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout

    # Assert
    assert out.strip() == "[]"


# --- digits ------------------------------------------------------------------------------------------------
def test_digits_have_the_documented_shapes_types_and_range(digits: tuple[Dataset, Dataset]) -> None:
    # Prepare / Execute
    train, test = digits

    # Assert
    assert (len(train), len(test)) == (1438, 359)  # 1797 examples, round(0.2 * 1797) = 359 for testing
    assert train.x.shape == (1438, 64) and train.x.dtype == np.float32 and train.y.dtype == np.int64
    assert train.num_classes == test.num_classes == 10
    for part in (train, test):
        assert part.x.min() == 0.0 and part.x.max() == 1.0
        assert set(np.unique(part.y)) == set(range(10))


def test_digits_split_is_stratified_and_disjoint(digits: tuple[Dataset, Dataset]) -> None:
    # Prepare
    train, test = digits
    whole = train.class_counts() + test.class_counts()

    # Execute
    train_idx, test_idx = stratified_split(np.repeat(np.arange(10), whole), 0.2, seed=0)

    # Assert: every class gives the test part its share to within one example
    assert np.abs(test.class_counts() - whole * 359 / 1797).max() < 1.0
    assert np.intersect1d(train_idx, test_idx).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train_idx, test_idx])), np.arange(1797))


def test_digits_are_seeded_and_images_hold_the_same_pixels(digits: tuple[Dataset, Dataset]) -> None:
    # Prepare
    train, _ = digits

    # Execute
    again, _ = load_digits(seed=0)
    other, _ = load_digits(seed=1)
    images, _ = load_digits(images=True)

    # Assert
    np.testing.assert_array_equal(again.x, train.x)
    np.testing.assert_array_equal(again.y, train.y)
    assert not np.array_equal(other.x, train.x)
    assert images.sample_shape == (1, 8, 8)
    np.testing.assert_array_equal(images.x.reshape(len(images), 64), train.x)
    np.testing.assert_array_equal(images.flattened().x, train.x)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, 0.0001])
def test_split_refuses_fractions_that_leave_a_part_empty(fraction: float) -> None:
    with pytest.raises(DataError, match="test_fraction"):
        stratified_split(np.arange(100) % 3, fraction, seed=0)


@given(
    labels=st.lists(st.integers(0, 4), min_size=2, max_size=120),
    fraction=st.floats(0.05, 0.95),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=40, deadline=None)
def test_split_property_exact_size_cover_and_class_shares(labels: list[int], fraction: float, seed: int) -> None:
    # Prepare
    y = np.asarray(labels)
    n_test = round(len(y) * fraction)
    if not 0 < n_test < len(y):
        return

    # Execute
    train, test = stratified_split(y, fraction, seed)

    # Assert
    assert len(test) == n_test
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(len(y)))
    share = np.bincount(y, minlength=5) * n_test / len(y)
    assert np.abs(np.bincount(y[test], minlength=5) - share).max() < 1.0


# --- synthetic ---------------------------------------------------------------------------------------------
def test_synthetic_data_is_deterministic_balanced_and_learnable() -> None:
    # Prepare / Execute
    train, test = make_synthetic(n=1000, features=16, classes=4, seed=3)
    again, _ = make_synthetic(n=1000, features=16, classes=4, seed=3)
    other, _ = make_synthetic(n=1000, features=16, classes=4, seed=4)

    # Assert
    assert (len(train), len(test), train.sample_shape, train.num_classes) == (800, 200, (16,), 4)
    np.testing.assert_array_equal(again.x, train.x)
    assert not np.array_equal(other.x, train.x)
    np.testing.assert_array_equal(train.class_counts(), [200] * 4)
    centroids = np.stack([train.x[train.y == c].mean(axis=0) for c in range(4)])
    predicted = np.argmin(((test.x[:, None, :] - centroids[None]) ** 2).sum(axis=2), axis=1)
    assert (predicted == test.y).mean() > 0.9  # nearest centroid: the classes are separable


def test_synthetic_defaults_have_the_digits_shapes() -> None:
    train, test = make_synthetic()

    assert (train.sample_shape, train.num_classes, len(train) + len(test)) == ((64,), 10, 2000)


@pytest.mark.parametrize(
    "kwargs",
    [{"n": 1}, {"features": 0}, {"classes": 1}, {"separation": -1.0}, {"separation": float("nan")}],
)
def test_synthetic_refuses_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(DataError):
        make_synthetic(**kwargs)


# --- the Dataset type ---------------------------------------------------------------------------------------
_X3 = np.zeros((3, 2), np.float32)
_Y3 = np.array([0, 1, 2], np.int64)


@pytest.mark.parametrize(
    ("x", "y", "num_classes", "message"),
    [
        (_X3, np.array([0, 1], np.int64), 3, "3 examples but y has 2"),
        (_X3, np.array([0, 1, 3], np.int64), 3, r"outside \[0, 3\): first y\[2\] = 3"),
        (_X3, np.array([0, -1, 2], np.int64), 3, r"first y\[1\] = -1"),
        (np.array([[0, 0], [np.nan, 0], [0, np.inf]], np.float32), _Y3, 3, "non-finite .* 2 example.*index 1"),
        (_X3.astype(np.float64), _Y3, 3, "x must be float32"),
        (_X3, _Y3.astype(np.int32), 3, "1-D int64"),
        (np.zeros(3, np.float32), _Y3, 3, r"shape \(n, features"),
        ([[0.0, 0.0]] * 3, _Y3, 3, "numpy array"),
        (_X3, _Y3, 0, "num_classes must be a positive integer"),
        (_X3, _Y3, True, "num_classes must be a positive integer"),
    ],
    ids=["lengths", "label-high", "label-negative", "non-finite", "x-dtype", "y-dtype", "x-1d", "x-list",
         "no-classes", "bool-classes"],
)
def test_dataset_validation_names_the_problem(x: Any, y: Any, num_classes: Any, message: str) -> None:
    with pytest.raises(DataError, match=message) as caught:
        Dataset(x, y, num_classes)

    assert isinstance(caught.value, GradshardError) and isinstance(caught.value, ValueError)


def test_subset_takes_positions_or_masks_and_copies() -> None:
    # Prepare
    data = Dataset(np.arange(10, dtype=np.float32).reshape(5, 2), np.array([0, 1, 0, 1, 2], np.int64), 3)

    # Execute
    picked = data.subset([4, 0])
    masked = data.subset(data.y == 1)
    empty = data.subset([])
    picked.x[0, 0] = -1.0

    # Assert
    np.testing.assert_array_equal(picked.y, [2, 0])
    np.testing.assert_array_equal(masked.x, [[2, 3], [6, 7]])
    assert len(empty) == 0 and empty.num_classes == 3
    assert data.x[4, 0] == 8.0
    assert repr(data) == "Dataset(n=5, sample_shape=(2,), num_classes=3)"


@pytest.mark.parametrize(
    ("indices", "message"),
    [([5], r"\[0, 5\)"), ([-1], r"\[0, 5\)"), ([0.5], "integer"), ([[0, 1]], "1-D"), ([True, False], "mask")],
)
def test_subset_refuses_bad_indices(indices: Any, message: str) -> None:
    data = _labelled([0, 1, 0, 1, 0])

    with pytest.raises(DataError, match=message):
        data.subset(indices)


@pytest.mark.parametrize(("features", "channels"), [(10, 1), (64, 3), (64, 0)])
def test_as_images_needs_square_channels(features: int, channels: int) -> None:
    data = Dataset(np.zeros((2, features), np.float32), np.zeros(2, np.int64), 1)

    with pytest.raises(DataError, match="square"):
        data.as_images(channels)


# --- user data ----------------------------------------------------------------------------------------------
def test_from_arrays_converts_copies_and_infers_classes() -> None:
    # Prepare
    x = np.arange(6, dtype=np.float64).reshape(3, 2)
    y = np.array([[0.0], [2.0], [1.0]])

    # Execute
    data = from_arrays(x, y)
    listed = from_arrays([[1, 2], [3, 4]], [1, 0], num_classes=5)
    x[0, 0] = 99.0

    # Assert
    assert data.x.dtype == np.float32 and data.y.dtype == np.int64 and data.num_classes == 3
    np.testing.assert_array_equal(data.y, [0, 2, 1])
    assert data.x[0, 0] == 0.0
    assert listed.num_classes == 5 and listed.x.dtype == np.float32


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        ([[1, 2], [3]], [0, 1], "rectangular"),
        ([["a"], ["b"]], [0, 1], "numeric"),
        ([[1], [2]], [0.5, 1.0], "whole numbers"),
        ([[1], [2]], [0, -1], "non-negative"),
        ([[1], [2]], ["a", "b"], "integers"),
        (np.zeros((0, 2)), np.zeros(0, np.int64), "cannot be inferred"),
        ([[1], [2]], [[0, 1], [1, 0]], "1-D"),
    ],
    ids=["ragged", "strings", "fractional-label", "negative-label", "string-label", "empty", "one-hot"],
)
def test_from_arrays_refuses_what_is_not_a_classification_set(x: Any, y: Any, message: str) -> None:
    with pytest.raises(DataError, match=message):
        from_arrays(x, y)


class _PairDataset(torch.utils.data.Dataset[tuple[torch.Tensor, Any]]):
    """A user's map-style data set: a list of (tensor, label) pairs."""

    def __init__(self, items: list[tuple[torch.Tensor, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        return self.items[index]


def test_from_torch_dataset_round_trips_through_torch() -> None:
    # Prepare
    original, _ = make_synthetic(n=40, features=4, classes=3, seed=1)
    pairs: list[tuple[torch.Tensor, Any]] = [
        (torch.from_numpy(x.copy()), int(y)) for x, y in zip(original.x, original.y, strict=True)
    ]
    pairs[0] = (pairs[0][0], torch.tensor(pairs[0][1]))  # a 0-d tensor label is a scalar too

    # Execute
    from_pairs = from_torch_dataset(_PairDataset(pairs), num_classes=3)
    tensors = torch.utils.data.TensorDataset(torch.from_numpy(original.x), torch.from_numpy(original.y))
    from_tensors = from_torch_dataset(tensors)

    # Assert
    for data in (from_pairs, from_tensors):
        np.testing.assert_array_equal(data.x, original.x)
        np.testing.assert_array_equal(data.y, original.y)
        assert data.num_classes == 3


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([(torch.zeros(2),)], "not a \\(features, label\\) pair"),
        ([(torch.zeros(2), 0), (torch.zeros(3), 1)], "different shapes"),
        ([(torch.zeros(2), torch.tensor([0, 1]))], "must be a scalar"),
        ([(torch.zeros(2), 0.5)], "whole numbers"),
    ],
    ids=["not-a-pair", "ragged", "vector-label", "fractional-label"],
)
def test_from_torch_dataset_refuses_bad_items(items: list[Any], message: str) -> None:
    with pytest.raises(DataError, match=message):
        from_torch_dataset(_PairDataset(items))


# --- partitions ---------------------------------------------------------------------------------------------
@given(
    labels=st.lists(st.integers(0, 4), min_size=1, max_size=150),
    clients=st.integers(1, 12),
    alpha=st.floats(0.01, 100.0),
    min_size=st.integers(0, 5),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=60, deadline=None)
def test_partitions_cover_every_index_once_honour_min_size_and_repeat_per_seed(
    labels: list[int], clients: int, alpha: float, min_size: int, seed: int
) -> None:
    # Prepare
    data = _labelled(labels)
    clients = min(clients, len(data))
    min_size = min(min_size, len(data) // clients)

    # Execute
    iid = partition_iid(data, clients, seed)
    skewed = partition_dirichlet(data, clients, alpha, seed, min_size=min_size)
    again = partition_dirichlet(data, clients, alpha, seed, min_size=min_size)

    # Assert
    for partition in (iid, skewed):
        assert len(partition) == clients
        check_partition(partition, len(data))
        assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in partition)
    sizes = [len(p) for p in iid]
    assert max(sizes) - min(sizes) <= 1
    assert min(len(p) for p in skewed) >= min_size
    assert all(np.array_equal(a, b) for a, b in zip(skewed, again, strict=True))


def test_small_alpha_skews_labels_and_large_alpha_approaches_iid(digits: tuple[Dataset, Dataset]) -> None:
    # Prepare
    train, _ = digits

    # Execute
    iid = _distinct_labels_per_client(train, partition_iid(train, 10, seed=0))
    skewed = _distinct_labels_per_client(train, partition_dirichlet(train, 10, alpha=0.1, seed=0))
    mild = _distinct_labels_per_client(train, partition_dirichlet(train, 10, alpha=1000.0, seed=0))

    # Assert
    assert iid == 10.0 and mild == 10.0
    assert skewed < 6.0


def test_dirichlet_differs_across_seeds_and_rebalances_when_draws_keep_failing(
    digits: tuple[Dataset, Dataset],
) -> None:
    # Prepare
    train, _ = digits

    # Execute
    first = partition_dirichlet(train, 10, alpha=0.5, seed=0)
    second = partition_dirichlet(train, 10, alpha=0.5, seed=1)
    forced = partition_dirichlet(train, 10, alpha=0.001, seed=0, min_size=140)  # 10 x 140 of 1438: only rebalancing

    # Assert
    assert not all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert min(len(p) for p in forced) >= 140
    check_partition(forced, len(train))


@pytest.mark.parametrize(
    ("clients", "alpha", "min_size", "message"),
    [
        (0, 1.0, 1, "positive integer"),
        (11, 1.0, 1, "more clients than examples"),
        (2, 0.0, 1, "alpha must be"),
        (2, -1.0, 1, "alpha must be"),
        (2, float("inf"), 1, "alpha must be"),
        (3, 1.0, 4, "min_size"),
        (3, 1.0, -1, "min_size"),
    ],
)
def test_partitions_refuse_bad_arguments(clients: int, alpha: float, min_size: int, message: str) -> None:
    data = _labelled(list(range(10)))

    with pytest.raises(DataError, match=message):
        partition_dirichlet(data, clients, alpha, seed=0, min_size=min_size)
    if "clients" in message or "positive" in message:
        with pytest.raises(DataError, match=message):
            partition_iid(data, clients, seed=0)


def test_client_datasets_follow_the_partition(digits: tuple[Dataset, Dataset]) -> None:
    # Prepare
    train, _ = digits
    partition = partition_dirichlet(train, 5, alpha=0.3, seed=2)

    # Execute
    parts = client_datasets(train, partition)
    table = label_counts(train, partition)

    # Assert
    assert [len(p) for p in parts] == [len(i) for i in partition]
    for part, indices in zip(parts, partition, strict=True):
        np.testing.assert_array_equal(part.y, train.y[indices])
    np.testing.assert_array_equal(table.sum(axis=0), train.class_counts())


@pytest.mark.parametrize(
    ("partition", "message"),
    [([np.array([0, 1]), np.array([1, 2])], "1 index.* missing, 1 repeated"), ([], "at least one client")],
)
def test_check_partition_finds_gaps_and_repeats(partition: list[np.ndarray], message: str) -> None:
    with pytest.raises(DataError, match=message):
        check_partition(partition, 4)
