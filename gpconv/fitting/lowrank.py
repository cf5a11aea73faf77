"""Low-rank factorisations: the whitened-SVD baseline and the low-rank half of the hybrid block.

Activation-aware ("whitened") truncated SVD: with ``C = E[x x^T] = L L^T``, the rank-``r``
``B A`` minimising ``E||W x - B A x||^2 = ||(W - B A) L||_F^2`` is the truncated SVD of ``W L``
mapped back through ``L^{-1}`` (Eckart-Young in the whitened space). Without calibration data
(``C = I``) it is the plain truncated SVD.

The hybrid ``G(x) + B(A(x))`` is fitted by alternating the two exact sub-problems: ``B A`` =
whitened SVD of ``W - G``, then ``G`` = io least squares on ``W - B A``. Each step can only lower
the objective, and starting from ``G = 0`` the first step *is* the SVD baseline, so the hybrid
never starts worse than plain low-rank of the same rank.
"""

from __future__ import annotations

import torch

from ..layers import LowRankLinear, io_dense
from .grouped import fit_io_weight
from . import linalg
from .linalg import DEFAULT_RIDGE


@torch.no_grad()
def whitened_svd(weight: torch.Tensor, rank: int, cov: torch.Tensor | None = None, ridge: float = DEFAULT_RIDGE,
                 whitener=False):
    """Rank-``rank`` factors ``(B (out, r), A (r, in))`` of ``weight`` (out, in), float64.

    ``whitener``: a precomputed :func:`gpconv.fitting.linalg.whitener` of ``cov`` (callers that factor many matrices
    against one covariance pass it to skip the Cholesky); by default it is computed here.
    """
    w = weight.detach().to(torch.float64)
    wh = linalg.whitener(cov, w.shape[1], ridge, w.device) if whitener is False else whitener
    m = w if wh is None else w @ wh[0]
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return svd_factors(u, s, vh, rank, wh)


def svd_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int, wh=None):
    """``(B, A)`` of :func:`whitened_svd` from the SVD ``u, s, vh`` of the whitened weight (callers
    that already hold that SVD, e.g. for several ranks, skip computing it again)."""
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    b = u[:, :r] * root  # (out, r)
    a = root[:, None] * vh[:r]  # (r, in), whitened coordinates
    if wh is not None:
        a = a @ wh[1]
    if r < rank:  # rank above min(out, in): pad with zeros so shapes match the spec
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], 1)
        a = torch.cat([a, a.new_zeros(rank - r, a.shape[1])], 0)
    return b, a


@torch.no_grad()
def fit_hybrid(weight: torch.Tensor, groups: int, rank: int, gather_index: torch.Tensor,
               cov: torch.Tensor | None = None, ridge: float = DEFAULT_RIDGE, rounds: int = 4, whitener=False,
               first=None):
    """The hybrid's parts, float64: io weights ``(g, out/g, 2*in/g)`` and factors ``B``, ``A``.

    Alternates exact fits: ``B A`` = whitened SVD of ``W - G``, then ``G`` = io least squares on
    ``W - B A`` (round one starts from ``G = 0``, i.e. from the SVD baseline). ``whitener``: as in
    :func:`whitened_svd`. ``first``: round one's ``(B, A)``, i.e. ``whitened_svd(W, rank, cov,
    ridge)``, when the caller already computed it (the same numbers, one SVD fewer).
    """
    w = weight.detach().to(torch.float64)
    wh = linalg.whitener(cov, w.shape[1], ridge, w.device) if whitener is False else whitener  # one for every round
    idx = gather_index.to(w.device)
    gd = torch.zeros_like(w)
    for i in range(rounds):
        b, a = first if (i == 0 and first is not None) else whitened_svd(w - gd, rank, cov, ridge, whitener=wh)
        g = fit_io_weight(w - b @ a, groups, idx, cov, ridge)
        gd = io_dense(g, idx, w.shape[1])
    return g, b, a


@torch.no_grad()
def init_lowrank_(module, weight: torch.Tensor, cov: torch.Tensor | None = None, ridge: float = DEFAULT_RIDGE, rounds: int = 4,
                  first=None):
    """Initialise a :class:`~gpconv.layers.LowRankLinear` or a hybrid block from ``weight``.
    ``first``: ``whitened_svd(weight, rank, cov, ridge)`` if the caller has it (see :func:`fit_hybrid`)."""
    w = weight.detach().to(torch.float64)
    if isinstance(module, LowRankLinear):
        b, a = first if first is not None else whitened_svd(w, module.rank, cov, ridge)
        module.lowrank_b.copy_(b)
        module.lowrank_a.copy_(a)
        return
    g, b, a = fit_hybrid(w, module.groups, module.rank, module.gather_index(w.device), cov, ridge, rounds, first=first)
    module.weight.copy_(g)
    module.lowrank_b.copy_(b)
    module.lowrank_a.copy_(a)

