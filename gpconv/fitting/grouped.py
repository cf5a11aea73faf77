"""Closed-form fits of the grouped blocks to a dense weight ``W`` (out, in).

For the io block every output group ``j`` reads a fixed set ``S_j`` of input channels (its own
group and its interleaved group), so the problem splits into one ridge regression per output
group: ``B_j[:, S_j] = W_j C[:, S_j] (C[S_j, S_j] + lambda I)^-1``. Where the two halves of the
block reach the same input channel, the coefficient is split evenly between G1 and G2 (the
minimum-norm choice; the product is the same).
"""

from __future__ import annotations

import torch

from ..layers import interleave_index
from .linalg import DEFAULT_RIDGE, ridge_lambda, solve_groups, solve_rows


@torch.no_grad()
def fit_io_weight(
    weight: torch.Tensor,
    groups: int,
    gather_index: torch.Tensor,
    cov: torch.Tensor | None = None,
    ridge: float = DEFAULT_RIDGE,
) -> torch.Tensor:
    """Weights ``(groups, out/groups, 2*in/groups)`` of the io block closest to ``weight`` (out, in).

    ``gather_index`` is the block's :meth:`~gpconv.layers.GroupedPointwiseBlock.gather_index`
    (it already includes any input permutation). Computed in float64 for a stable solve.
    """
    w = weight.detach().to(torch.float64)
    c64 = None if cov is None else cov.to(torch.float64)
    out_f, in_f = w.shape
    oc = out_f // groups
    idx = gather_index.to(w.device)
    # each group's support: the distinct input channels its G1 and G2 slots read
    parts = [torch.unique(idx[j], return_inverse=True, return_counts=True) for j in range(groups)]
    if c64 is not None and len({len(p[0]) for p in parts}) == 1:
        b = solve_groups(w.view(groups, oc, in_f), c64, torch.stack([p[0] for p in parts]), ridge)
        inv = torch.stack([p[1] for p in parts])  # (g, slots): slot -> position in the support
        mult = torch.stack([p[2] for p in parts]).gather(1, inv).to(b.dtype)  # (g, slots)
        # a channel reached by both G1 and G2 gets half the coefficient in each
        return (b.gather(2, inv[:, None, :].expand(groups, oc, -1)) / mult[:, None, :]).to(weight.dtype)
    result = torch.empty(groups, oc, idx.shape[1], dtype=torch.float64, device=w.device)
    for j, (support, slot_to_support, mult) in enumerate(parts):  # supports of unequal size
        b = solve_rows(w[j * oc:(j + 1) * oc], c64, support, ridge)  # (oc, |S|)
        result[j] = b[:, slot_to_support] / mult[slot_to_support].to(b.dtype)
    return result.to(weight.dtype)


@torch.no_grad()
def fit_grouped_weight(weight: torch.Tensor, groups: int, cov: torch.Tensor | None = None, ridge: float = DEFAULT_RIDGE):
    """Block-diagonal ``(groups, out/g, in/g)`` closest to ``weight`` (out, in) under ``C``."""
    w = weight.detach().to(torch.float64)
    c64 = None if cov is None else cov.to(torch.float64)
    out_f, in_f = w.shape
    oc, c = out_f // groups, in_f // groups
    res = torch.empty(groups, oc, c, dtype=torch.float64, device=w.device)
    for j in range(groups):
        support = torch.arange(j * c, (j + 1) * c, device=w.device)
        res[j] = solve_rows(w[j * oc:(j + 1) * oc], c64, support, ridge)
    return res.to(weight.dtype)


@torch.no_grad()
def fit_chained_(module, weight, cov, ridge):
    """Chained block ``(I + G2 P) G1``: G1 = best block-diagonal fit of W, then G2 by least
    squares on what G1 leaves, seen through G1 (a product has no closed-form joint optimum)."""
    g = module.groups
    w = weight.detach().to(torch.float64)
    g1 = fit_grouped_weight(w, g, cov, ridge)
    module.g1.weight.copy_(g1.to(module.g1.weight.dtype))
    m1 = torch.block_diag(*g1.unbind(0))  # (out, in)
    out_f = w.shape[0]
    oc = out_f // g
    ph = m1[interleave_index(out_f, g).to(w.device)]  # interleave(G1 x) = ph @ x, (out, in)
    resid = w - m1
    c64 = None if cov is None else cov.to(torch.float64)
    g2 = torch.empty(g, oc, oc, dtype=torch.float64, device=w.device)
    for j in range(g):
        mj = ph[j * oc:(j + 1) * oc]  # inputs of G2's group j, as maps of x: (oc, in)
        rj = resid[j * oc:(j + 1) * oc]
        m = torch.eye(w.shape[1], dtype=w.dtype, device=w.device) if c64 is None else (
            c64 + ridge_lambda(c64, ridge) * torch.eye(w.shape[1], dtype=w.dtype, device=w.device))
        a = mj @ m @ mj.t()  # the metric C + lambda I, as in every other fit
        rhs = rj @ m @ mj.t()
        a = a + 1e-9 * a.diagonal().mean().clamp_min(1e-12) * torch.eye(oc, dtype=a.dtype, device=a.device)
        g2[j] = torch.linalg.solve(a, rhs.t()).t()
    module.g2.weight.copy_(g2.to(module.g2.weight.dtype))
