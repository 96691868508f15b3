"""nHSIC of the block-wise curriculum loss (issue 15), checked against a direct O(n²) computation with explicit loops
and against its known properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradshard.blockwise.hsic import gaussian_kernel, hsic, nhsic, nhsic_kernels, one_hot
from gradshard.errors import GradshardError


def reference_nhsic(a: np.ndarray, b: np.ndarray, sigma: float) -> float:
    """tr(KHLH) / sqrt(tr(KHKH) tr(LHLH)) with every sum written out: kernels, centring matrix, traces."""
    n = a.shape[0]

    def kernel(x: np.ndarray) -> list[list[float]]:
        return [[math.exp(-sum((x[i, f] - x[j, f]) ** 2 for f in range(x.shape[1])) / (2 * sigma * sigma))
                 for j in range(n)] for i in range(n)]

    h = [[(1.0 if i == j else 0.0) - 1.0 / n for j in range(n)] for i in range(n)]

    def matmul(p: list[list[float]], q: list[list[float]]) -> list[list[float]]:
        return [[sum(p[i][k] * q[k][j] for k in range(n)) for j in range(n)] for i in range(n)]

    def trace_hsic(k: list[list[float]], ell: list[list[float]]) -> float:
        product = matmul(matmul(matmul(k, h), ell), h)
        return sum(product[i][i] for i in range(n)) / (n - 1) ** 2

    k, ell = kernel(a), kernel(b)
    return trace_hsic(k, ell) / math.sqrt(trace_hsic(k, k) * trace_hsic(ell, ell))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(3, 9), p=st.integers(1, 4), q=st.integers(1, 4), sigma=st.floats(0.3, 6.0),
       seed=st.integers(0, 2**31 - 1))
def test_nhsic_equals_the_direct_quadratic_computation(n: int, p: int, q: int, sigma: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((n, p)), rng.standard_normal((n, q))
    got = float(nhsic(torch.tensor(a), torch.tensor(b), sigma))
    assert got == pytest.approx(reference_nhsic(a, b, sigma), rel=1e-9, abs=1e-12)


def test_hsic_is_the_trace_formula_divided_by_n_minus_one_squared() -> None:
    rng = np.random.default_rng(3)
    a, b = torch.tensor(rng.standard_normal((6, 2))), torch.tensor(rng.standard_normal((6, 3)))
    k, ell = gaussian_kernel(a, 2.0), gaussian_kernel(b, 2.0)
    h = torch.eye(6, dtype=torch.float64) - 1.0 / 6
    assert float(hsic(k, ell)) == pytest.approx(float(torch.trace(k @ h @ ell @ h)) / 25, rel=1e-12)


def test_identical_inputs_give_one_and_independent_ones_give_little() -> None:
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.standard_normal((64, 5)))
    assert float(nhsic(x, x)) == pytest.approx(1.0, abs=1e-12)
    assert float(nhsic(x, x.clone(), sigma=0.7)) == pytest.approx(1.0, abs=1e-12)
    independent = torch.tensor(rng.standard_normal((64, 5)))
    assert 0.0 <= float(nhsic(x, independent, sigma=2.0)) < 0.3
    assert float(nhsic(x, 3 * x + 1, sigma=None)) > 0.99  # a deterministic function of x: strongly dependent


def test_scaling_the_kernels_or_the_inputs_with_sigma_changes_nothing() -> None:
    rng = np.random.default_rng(1)
    a, b = torch.tensor(rng.standard_normal((20, 3))), torch.tensor(rng.standard_normal((20, 4)))
    b = b + 0.5 * a[:, :1]
    base = float(nhsic(a, b, 1.5))
    k, ell = gaussian_kernel(a, 1.5), gaussian_kernel(b, 1.5)
    assert float(nhsic_kernels(7.0 * k, 0.01 * ell)) == pytest.approx(base, rel=1e-12)
    assert float(nhsic(10.0 * a, 10.0 * b, 15.0)) == pytest.approx(base, rel=1e-12)
    assert float(nhsic(10.0 * a, 10.0 * b, sigma=None)) == pytest.approx(float(nhsic(a, b, sigma=None)), rel=1e-9)


def test_labels_enter_as_one_hot_and_the_loss_is_differentiable() -> None:
    torch.manual_seed(0)
    y = torch.tensor([0, 1, 2, 1, 0, 2, 2, 1])
    logits = torch.randn(8, 3, requires_grad=True)
    value = nhsic(logits, one_hot(y, 3))
    value.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert float(nhsic(one_hot(y, 3) * 4.0, one_hot(y, 3), sigma=None)) == pytest.approx(1.0, abs=1e-9)


def test_bad_batches_are_refused() -> None:
    with pytest.raises(GradshardError, match="at least 2 samples"):
        nhsic(torch.zeros(1, 3), torch.zeros(1, 3))
    with pytest.raises(GradshardError, match="pairs samples"):
        nhsic(torch.zeros(4, 3), torch.zeros(5, 3))
    with pytest.raises(GradshardError, match="sigma must be > 0"):
        gaussian_kernel(torch.zeros(4, 3), 0.0)
