"""Data sets and client partitions for federated training, in plain numpy.

A :class:`Dataset` is a validated pair of arrays (float32 features, int64 labels) plus the number of classes. It
comes from the digits set bundled with scikit-learn (:func:`load_digits`, no download), a seeded synthetic task
(:func:`make_synthetic`) or the user's own data (:func:`from_arrays`, :func:`from_torch_dataset`).

A *partition* is one sorted int64 index array per client; together they hold every example exactly once.
:func:`partition_iid` deals examples out evenly at random; :func:`partition_dirichlet` gives every client a label
mix drawn from Dirichlet(alpha), the standard way to simulate non-IID clients (small alpha: few labels per client).
Everything is deterministic from its seed, so a federated run can be repeated exactly.

Only numpy is imported here; scikit-learn and torch are imported by the functions that need them.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from gradshard.errors import GradshardError
from gradshard.extras import require_extra

FloatArray = npt.NDArray[np.float32]
LabelArray = npt.NDArray[np.int64]
IndexArray = npt.NDArray[np.int64]

DIGITS_CLASSES = 10
DIGITS_SIDE = 8
_DIGITS_MAX = 16.0  # digits pixels are counts 0..16
_DIRICHLET_TRIES = 100  # resamples before falling back to moving examples to small clients


class DataError(GradshardError, ValueError):
    """A data set, split or partition is invalid; the message names the argument and what is wrong."""


class MapDataset(Protocol):
    """What :func:`from_torch_dataset` needs: a map-style data set with a length (any ``torch`` one qualifies)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> Any: ...


# --- the data set -----------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """Examples ``x`` (float32, shape ``(n, ...)``), labels ``y`` (int64, shape ``(n,)``) in ``[0, num_classes)``.

    Validated on construction so that a bad array fails here, with a clear message, and not deep inside training.
    The arrays are not copied; treat them as read-only (``subset`` returns new arrays, ``as_images`` views).
    """

    x: FloatArray
    y: LabelArray
    num_classes: int

    def __post_init__(self) -> None:
        _check_features(self.x)
        _check_labels(self.y, self.num_classes)
        if self.x.shape[0] != self.y.shape[0]:
            raise DataError(f"x has {self.x.shape[0]} examples but y has {self.y.shape[0]} labels")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __repr__(self) -> str:
        return f"Dataset(n={len(self)}, sample_shape={self.sample_shape}, num_classes={self.num_classes})"

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one example, e.g. ``(64,)`` for flat digits or ``(1, 8, 8)`` as images."""
        return tuple(int(d) for d in self.x.shape[1:])

    @property
    def num_features(self) -> int:
        """Scalars per example (the input size of an MLP)."""
        return math.prod(self.sample_shape)

    def class_counts(self) -> npt.NDArray[np.int64]:
        """Examples per class, length ``num_classes`` (zeros for absent classes)."""
        return np.bincount(self.y, minlength=self.num_classes).astype(np.int64)

    def subset(self, indices: npt.ArrayLike) -> Dataset:
        """The examples at ``indices`` (integer positions or a boolean mask of length n), as new arrays."""
        idx = _as_indices(indices, len(self))
        return Dataset(self.x[idx], self.y[idx], self.num_classes)

    def as_images(self, channels: int = 1) -> Dataset:
        """The same examples shaped ``(n, channels, side, side)`` for CNNs (a view; needs square images)."""
        per_channel, rest = divmod(self.num_features, max(channels, 1))
        side = math.isqrt(per_channel)
        if channels < 1 or rest or side == 0 or side * side != per_channel:
            raise DataError(
                f"{self.num_features} features per example are not {channels} square channel(s); "
                f"cannot reshape {self.sample_shape} to images"
            )
        return Dataset(self.x.reshape(len(self), channels, side, side), self.y, self.num_classes)

    def flattened(self) -> Dataset:
        """The same examples shaped ``(n, num_features)`` (a view): the input of an MLP."""
        return Dataset(self.x.reshape(len(self), self.num_features), self.y, self.num_classes)


def _check_features(x: Any) -> None:
    """``x`` must be a finite float32 ndarray of shape ``(n, ...)`` with at least one feature axis."""
    if not isinstance(x, np.ndarray):
        raise DataError(f"x must be a numpy array, got {type(x).__name__}; use from_arrays() to convert")
    if x.dtype != np.float32:
        raise DataError(f"x must be float32, got {x.dtype}; use from_arrays() to convert")
    if x.ndim < 2:
        raise DataError(f"x must have shape (n, features...), got {x.shape}")
    finite = np.isfinite(x)
    if not finite.all():
        rows = np.flatnonzero(~finite.reshape(x.shape[0], -1).all(axis=1))
        raise DataError(f"x has non-finite values (NaN or inf) in {rows.size} example(s), first at index {rows[0]}")


def _check_labels(y: Any, num_classes: Any) -> None:
    """``y`` must be a 1-D int64 ndarray of labels in ``[0, num_classes)``; ``num_classes`` a positive int."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer) or num_classes < 1:
        raise DataError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not isinstance(y, np.ndarray):
        raise DataError(f"y must be a numpy array, got {type(y).__name__}; use from_arrays() to convert")
    if y.dtype != np.int64 or y.ndim != 1:
        raise DataError(f"y must be a 1-D int64 array, got {y.dtype} of shape {y.shape}; use from_arrays()")
    bad = np.flatnonzero((y < 0) | (y >= num_classes))
    if bad.size:
        first = int(bad[0])
        raise DataError(
            f"{bad.size} label(s) outside [0, {num_classes}): first y[{first}] = {int(y[first])}"
        )


def _as_indices(indices: npt.ArrayLike, n: int) -> IndexArray:
    """Integer positions in ``[0, n)`` (negative ones are refused: they would silently wrap) or a mask of length n."""
    idx = np.asarray(indices)
    if idx.dtype == np.bool_:
        if idx.shape != (n,):
            raise DataError(f"a boolean mask must have shape ({n},), got {idx.shape}")
        return np.flatnonzero(idx).astype(np.int64)
    if idx.size == 0:
        return np.empty(0, dtype=np.int64)
    if idx.dtype.kind not in "iu" or idx.ndim != 1:
        raise DataError(f"indices must be a 1-D integer array, got {idx.dtype} of shape {idx.shape}")
    if idx.min() < 0 or idx.max() >= n:
        raise DataError(f"indices must lie in [0, {n}), got values from {idx.min()} to {idx.max()}")
    return idx.astype(np.int64, copy=False)


# --- user data ----------------------------------------------------------------------------------------------
def from_arrays(x: npt.ArrayLike, y: npt.ArrayLike, num_classes: int | None = None) -> Dataset:
    """A :class:`Dataset` from any array-likes: ``x`` is copied as float32, ``y`` as int64.

    Float labels are accepted when they are whole numbers and a ``(n, 1)`` label column is flattened.
    ``num_classes`` defaults to ``max(y) + 1``.
    """
    try:
        xa, ya = np.asarray(x), np.asarray(y)
    except ValueError as exc:  # ragged nested lists
        raise DataError(f"x and y must be rectangular arrays: {exc}") from exc
    if xa.dtype.kind not in "biuf":
        raise DataError(f"x must be numeric, got dtype {xa.dtype}")
    labels = _labels_from(ya)
    if num_classes is None:
        if labels.size == 0:
            raise DataError("num_classes cannot be inferred from zero labels; pass it")
        num_classes = int(labels.max()) + 1
    return Dataset(np.array(xa, dtype=np.float32), labels, num_classes)


def _labels_from(ya: npt.NDArray[Any]) -> LabelArray:
    """Int64 labels from integer (or whole-number float) values; a ``(n, 1)`` column becomes ``(n,)``."""
    if ya.ndim == 2 and ya.shape[1] == 1:
        ya = ya.reshape(-1)
    if ya.ndim != 1:
        raise DataError(f"y must be a 1-D array of labels, got shape {ya.shape}")
    if ya.dtype.kind == "f":
        if not (np.isfinite(ya).all() and np.array_equal(ya, np.round(ya))):
            raise DataError("float labels must be whole numbers (class indices)")
    elif ya.dtype.kind not in "iu" and ya.size:
        raise DataError(f"labels must be integers, got dtype {ya.dtype}")
    labels = ya.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise DataError(f"labels must be non-negative class indices, got {int(labels.min())}")
    return labels


def from_torch_dataset(ds: MapDataset, num_classes: int | None = None) -> Dataset:
    """Materialise a map-style ``torch.utils.data.Dataset`` of ``(features, label)`` pairs as a :class:`Dataset`.

    Every item is read once (transforms run once); features must all have the same shape. A ``TensorDataset``
    of two tensors is converted directly, without iterating.
    """
    import torch

    if isinstance(ds, torch.utils.data.TensorDataset) and len(ds.tensors) == 2:
        features, labels = (t.detach().cpu().numpy() for t in ds.tensors)
        return from_arrays(features, labels, num_classes)
    try:
        n = len(ds)
    except TypeError as exc:
        raise DataError("from_torch_dataset needs a map-style data set with a length") from exc
    xs: list[npt.NDArray[Any]] = []
    ys: list[Any] = []
    for i in range(n):
        features, label = _torch_item(ds[i], i)
        xs.append(features)
        ys.append(label)
    shapes = sorted({x.shape for x in xs})
    if len(shapes) > 1:
        raise DataError(f"examples have different shapes {shapes[:4]}; resize them to one shape first")
    x = np.stack(xs) if xs else np.empty((0, 1), dtype=np.float32)
    return from_arrays(x, np.asarray(ys), num_classes)


def _torch_item(item: Any, i: int) -> tuple[npt.NDArray[Any], Any]:
    """One ``(features, label)`` item as (numpy features, Python scalar label)."""
    if not isinstance(item, Sequence) or len(item) != 2:
        raise DataError(f"item {i} is not a (features, label) pair: {type(item).__name__}")
    x, y = item
    features = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    if hasattr(y, "detach") or isinstance(y, np.ndarray):
        label = y.detach().cpu().numpy() if hasattr(y, "detach") else y
        if label.size != 1:
            raise DataError(f"the label of item {i} must be a scalar, got shape {tuple(label.shape)}")
        y = label.reshape(()).item()
    return features, y


# --- bundled and synthetic data ----------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """scikit-learn's bundled digits (1797 x 64 pixel counts 0..16, labels 0..9), read once, read-only."""
    require_extra("train", "the bundled digits data set (scikit-learn's)")
    from sklearn.datasets import load_digits as sk_load_digits  # type: ignore[import-untyped]

    x_raw, y_raw = sk_load_digits(return_X_y=True)
    x, y = np.asarray(x_raw, dtype=np.float64), np.asarray(y_raw, dtype=np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def load_digits(test_fraction: float = 0.2, seed: int = 0, *, images: bool = False) -> tuple[Dataset, Dataset]:
    """(train, test) of the 8x8 digits set bundled with scikit-learn: 1797 examples, 10 classes, no download.

    Pixels are scaled to [0, 1]; the split is stratified (every class keeps its share in both parts) and seeded.
    ``x`` is flat ``(n, 64)``; ``images=True`` gives ``(n, 1, 8, 8)`` for CNNs.
    """
    x, y = _digits_arrays()
    full = Dataset((x / _DIGITS_MAX).astype(np.float32), y.copy(), DIGITS_CLASSES)
    train_idx, test_idx = stratified_split(full.y, test_fraction, seed)
    train, test = full.subset(train_idx), full.subset(test_idx)
    return (train.as_images(), test.as_images()) if images else (train, test)


def make_synthetic(
    n: int = 2000,
    features: int = 64,
    classes: int = 10,
    seed: int = 0,
    *,
    test_fraction: float = 0.2,
    separation: float = 5.0,
) -> tuple[Dataset, Dataset]:
    """(train, test) of Gaussian blobs: examples are a class mean plus N(0, I) noise.

    ``separation`` is the typical distance between two class means in noise standard deviations (means are drawn
    from N(0, separation² / (2 features) I)), so the difficulty does not depend on ``features``: at 5 a linear
    model is right about 95% of the time with 10 classes. Balanced classes, a stratified split, and the same
    arrays for the same arguments. The defaults match the digits shapes (64 features = 8x8, 10 classes), so every
    digits model (``mlp``, ``cnn``) runs on it unchanged.
    """
    if n < 2 or features < 1 or classes < 2:
        raise DataError(f"need n >= 2, features >= 1 and classes >= 2, got n={n}, features={features}, "
                        f"classes={classes}")
    if not (math.isfinite(separation) and separation >= 0):
        raise DataError(f"separation must be a finite number >= 0, got {separation}")
    rng = np.random.default_rng(seed)
    means = rng.normal(0.0, separation / math.sqrt(2 * features), size=(classes, features))
    y = rng.permutation(np.arange(n, dtype=np.int64) % classes)
    x = (means[y] + rng.normal(size=(n, features))).astype(np.float32)
    full = Dataset(x, y, classes)
    train_idx, test_idx = stratified_split(y, test_fraction, seed)
    return full.subset(train_idx), full.subset(test_idx)


def stratified_split(labels: npt.ArrayLike, test_fraction: float, seed: int) -> tuple[IndexArray, IndexArray]:
    """Sorted (train, test) index arrays; the test part has ``round(n * test_fraction)`` examples.

    Each class gives the test part its proportional share (largest remainders settle the rounding), so both
    parts keep the class balance of the whole set. Deterministic from ``seed``.
    """
    if not (_is_real(test_fraction) and 0 < test_fraction < 1):
        raise DataError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction!r}")
    y = np.asarray(labels)
    n_test = round(len(y) * test_fraction)
    if not 0 < n_test < len(y):
        raise DataError(f"test_fraction={test_fraction} of {len(y)} examples leaves one part empty")
    _, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    quotas = _largest_remainder(counts, n_test)
    rng = np.random.default_rng(seed)
    test = np.concatenate([rng.permutation(np.flatnonzero(inverse == c))[:q] for c, q in enumerate(quotas)])
    in_test = np.zeros(len(y), dtype=bool)
    in_test[test] = True
    return np.flatnonzero(~in_test).astype(np.int64), np.flatnonzero(in_test).astype(np.int64)


def _is_real(value: object) -> bool:
    """A real number (Python or numpy), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _largest_remainder(counts: npt.NDArray[np.int64], total: int) -> npt.NDArray[np.int64]:
    """Integer shares of ``total`` proportional to ``counts`` that sum to ``total`` exactly (Hamilton's method)."""
    exact = counts * (total / int(counts.sum()))
    shares: npt.NDArray[np.int64] = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - shares), kind="stable")
    shares[order[: total - int(shares.sum())]] += 1
    return shares


# --- partitions ---------------------------------------------------------------------------------------------
def partition_iid(dataset: Dataset, clients: int, seed: int) -> list[IndexArray]:
    """Deal the examples out uniformly at random: client sizes differ by at most one."""
    _check_clients(clients, len(dataset))
    perm = np.random.default_rng(seed).permutation(len(dataset))
    return [np.sort(part).astype(np.int64) for part in np.array_split(perm, clients)]


def partition_dirichlet(
    dataset: Dataset, clients: int, alpha: float, seed: int, min_size: int = 1
) -> list[IndexArray]:
    """Non-IID label skew: each class is split among clients in proportions drawn from Dirichlet(alpha).

    Small ``alpha`` (0.1) gives each client a few dominant labels; large ``alpha`` (100) approaches IID. Draws
    are repeated until every client has at least ``min_size`` examples; if that keeps failing (tiny alpha, many
    clients), examples are moved one at a time from the largest client to the smallest. Deterministic from
    ``seed``; every index appears exactly once.
    """
    n = len(dataset)
    _check_clients(clients, n)
    if not (_is_real(alpha) and math.isfinite(alpha) and alpha > 0):
        raise DataError(f"alpha must be a finite number > 0, got {alpha!r}")
    if min_size < 0 or min_size * clients > n:
        raise DataError(f"min_size={min_size} for {clients} clients needs 0 <= min_size * clients <= {n} examples")
    rng = np.random.default_rng(seed)
    by_class = [rng.permutation(np.flatnonzero(dataset.y == c)) for c in range(dataset.num_classes)]
    for _ in range(_DIRICHLET_TRIES):
        parts = _dirichlet_draw(by_class, clients, alpha, rng)
        if min(len(p) for p in parts) >= min_size:
            break
    else:
        parts = _rebalance(parts, min_size)
    return [np.sort(p).astype(np.int64) for p in parts]


def _check_clients(clients: int, n: int) -> None:
    """A partition needs 1 <= clients <= n so that no client is necessarily empty."""
    if isinstance(clients, bool) or not isinstance(clients, int | np.integer) or clients < 1:
        raise DataError(f"clients must be a positive integer, got {clients!r}")
    if clients > n:
        raise DataError(f"cannot split {n} examples among {clients} clients: more clients than examples")


def _dirichlet_draw(
    by_class: list[IndexArray], clients: int, alpha: float, rng: np.random.Generator
) -> list[IndexArray]:
    """One draw: for every class, cut its (shuffled) members at the cumulative Dirichlet proportions."""
    chunks: list[list[IndexArray]] = [[] for _ in range(clients)]
    for members in by_class:
        proportions = _dirichlet(rng, clients, alpha)
        cuts = np.clip((np.cumsum(proportions)[:-1] * len(members)).astype(np.int64), 0, len(members))
        for client, chunk in enumerate(np.split(members, cuts)):
            chunks[client].append(chunk)
    return [np.concatenate(c) if c else np.empty(0, dtype=np.int64) for c in chunks]


def _dirichlet(rng: np.random.Generator, clients: int, alpha: float) -> npt.NDArray[np.float64]:
    """Dirichlet(alpha, ..., alpha) proportions; if a tiny alpha underflows to NaN, all mass goes to one client."""
    p = rng.dirichlet(np.full(clients, float(alpha)))
    if not np.isfinite(p).all():
        p = np.zeros(clients)
        p[rng.integers(clients)] = 1.0
    return p


def _rebalance(parts: list[IndexArray], min_size: int) -> list[IndexArray]:
    """Move examples from the largest client to the smallest until every client has ``min_size``.

    Terminates: while a client is short, the largest has more than ``min_size`` (``min_size * clients <= n``).
    """
    parts = list(parts)
    while True:
        sizes = [len(p) for p in parts]
        small, large = int(np.argmin(sizes)), int(np.argmax(sizes))
        if sizes[small] >= min_size:
            return parts
        parts[small] = np.append(parts[small], parts[large][-1])
        parts[large] = parts[large][:-1]


def check_partition(partition: Sequence[npt.ArrayLike], n: int) -> None:
    """Raise :class:`DataError` unless ``partition`` holds every index in ``[0, n)`` exactly once."""
    if not partition:
        raise DataError("a partition needs at least one client")
    flat = np.concatenate([_as_indices(p, n) for p in partition])
    counts = np.bincount(flat, minlength=n)
    missing, repeated = int((counts == 0).sum()), int((counts > 1).sum())
    if missing or repeated:
        raise DataError(f"partition is not exact: {missing} index(es) missing, {repeated} repeated")


def client_datasets(dataset: Dataset, partition: Sequence[npt.ArrayLike]) -> list[Dataset]:
    """One :class:`Dataset` per client from a partition of ``dataset`` (indices are range-checked)."""
    if not partition:
        raise DataError("a partition needs at least one client")
    return [dataset.subset(indices) for indices in partition]


def label_counts(dataset: Dataset, partition: Sequence[npt.ArrayLike]) -> npt.NDArray[np.int64]:
    """A ``(clients, num_classes)`` table of examples per label per client: how skewed a partition is."""
    return np.stack([part.class_counts() for part in client_datasets(dataset, partition)])
