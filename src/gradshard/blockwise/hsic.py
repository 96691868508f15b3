"""The normalised Hilbert-Schmidt independence criterion (nHSIC) of the curriculum mentor's stage loss.

For n samples with feature rows A (n × p) and B (n × q), Gaussian kernels ``K_ij = exp(−‖a_i − a_j‖² / (2σ²))``
(likewise L for B) and the centring matrix ``H = I − 11ᵀ/n``::

    HSIC(A, B)  = tr(K H L H) / (n − 1)²
    nHSIC(A, B) = HSIC(A, B) / sqrt(HSIC(A, A) · HSIC(B, B))

computed as ``⟨K̃, L̃⟩_F`` with K̃ = HKH (double centring), which needs the two n × n kernels and nothing larger:
O(n²·(p + q)) time, O(n²) memory for a batch of n. nHSIC is 1 for identical inputs, lies in [0, 1] (the kernels are
positive semi-definite, so this is a cosine between centred kernels), and does not change when either kernel is
multiplied by a positive constant. A Gaussian kernel sees distances relative to σ, so scaling the inputs by c and σ
by c changes nothing (``sigma=None`` uses the median pairwise distance, which makes nHSIC invariant to scaling the
inputs). Differentiable (torch), for the loss CE − λ₁·nHSIC(z, x) − λ₂·nHSIC(logits, y).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gradshard.errors import GradshardError

if TYPE_CHECKING:
    from torch import Tensor

DEFAULT_SIGMA = 5.0
_EPS = 1e-12


def _rows(x: Tensor) -> Tensor:
    """The samples as rows of floats: (n, ...) → (n, features)."""
    if x.dim() == 0 or x.shape[0] < 2:
        raise GradshardError(f"nHSIC needs a batch of at least 2 samples, got shape {tuple(x.shape)}")
    rows = x.reshape(x.shape[0], -1)
    return rows if rows.is_floating_point() else rows.float()


def one_hot(y: Tensor, classes: int) -> Tensor:
    """Class labels as one-hot rows (how the labels enter nHSIC(logits, Y))."""
    import torch

    return torch.nn.functional.one_hot(y.long(), classes).float()


def gaussian_kernel(x: Tensor, sigma: float | None = DEFAULT_SIGMA) -> Tensor:
    """``exp(−‖x_i − x_j‖² / (2σ²))`` over the rows of ``x``; ``sigma=None``: σ = the median pairwise distance."""
    import torch

    rows = _rows(x)
    # ‖xᵢ‖² + ‖xⱼ‖² − 2xᵢ·xⱼ from the n × n Gram matrix: autograd keeps only the rows (alive anyway) and n × n
    # products, where torch.cdist's backward keeps copies of the n × features rows (+40 MiB at a 32×32×32 block)
    gram = rows @ rows.T
    norms = gram.diagonal()
    squared = (norms[:, None] + norms[None, :] - 2.0 * gram).clamp_min(0.0)
    if sigma is None:
        n = rows.shape[0]
        off = squared[~torch.eye(n, dtype=torch.bool, device=rows.device)]
        sigma = float(off.detach().sqrt().median())
        if sigma <= 0:
            sigma = 1.0  # all samples equal: every kernel entry is 1 whatever σ
    elif not sigma > 0:
        raise GradshardError(f"the kernel width sigma must be > 0, got {sigma}")
    return torch.exp(-squared / (2.0 * sigma * sigma))


def centred(k: Tensor) -> Tensor:
    """``H K H``: subtract row and column means, add back the grand mean."""
    return k - k.mean(dim=0, keepdim=True) - k.mean(dim=1, keepdim=True) + k.mean()


def hsic(k: Tensor, lk: Tensor) -> Tensor:
    """``tr(K H L H) / (n − 1)²`` of two n × n kernel matrices."""
    n = k.shape[0]
    if k.shape != (n, n) or lk.shape != (n, n):
        raise GradshardError(f"HSIC needs two n × n kernels of the same n, got {tuple(k.shape)}, {tuple(lk.shape)}")
    return (centred(k) * centred(lk)).sum() / float((n - 1) ** 2)


def nhsic_kernels(k: Tensor, lk: Tensor) -> Tensor:
    """nHSIC of two kernel matrices (0 when either is constant: nothing to be dependent on)."""
    kc, lc = centred(k), centred(lk)
    return (kc * lc).sum() / ((kc * kc).sum() * (lc * lc).sum()).clamp_min(_EPS).sqrt()


def nhsic(a: Tensor, b: Tensor, sigma: float | None = DEFAULT_SIGMA, sigma_b: float | None = None) -> Tensor:
    """nHSIC(A, B) with Gaussian kernels of width ``sigma`` (``sigma_b`` for B; default: the same)."""
    if a.shape[0] != b.shape[0]:
        raise GradshardError(f"nHSIC pairs samples: {a.shape[0]} rows of A, {b.shape[0]} of B")
    return nhsic_kernels(gaussian_kernel(a, sigma), gaussian_kernel(b, sigma if sigma_b is None else sigma_b))
