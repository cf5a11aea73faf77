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
from .linalg import DEFAULT_RIDGE, ridge_lambda, solve_batched, solve_groups, solve_rows


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
    equal = None if c64 is None else _equal_supports(idx)  # C = I solves row by row below
    if equal is not None:
        support, inv, mult = equal
        b = solve_groups(w.view(groups, oc, in_f), c64, support, ridge)
        # a channel reached by both G1 and G2 gets half the coefficient in each
        return (b.gather(2, inv[:, None, :].expand(groups, oc, -1)) / mult[:, None, :].to(b.dtype)).to(weight.dtype)
    # each group's support: the distinct input channels its G1 and G2 slots read
    parts = [torch.unique(idx[j], return_inverse=True, return_counts=True) for j in range(groups)]
    result = torch.empty(groups, oc, idx.shape[1], dtype=torch.float64, device=w.device)
    for j, (support, slot_to_support, mult) in enumerate(parts):  # supports of unequal size (or C = I)
        b = solve_rows(w[j * oc:(j + 1) * oc], c64, support, ridge)  # (oc, |S|)
        result[j] = b[:, slot_to_support] / mult[slot_to_support].to(b.dtype)
    return result.to(weight.dtype)


def _equal_supports(idx: torch.Tensor):
    """For a gather index (g, slots): ``(support (g, k), slot -> support position (g, slots), how
    many slots read each slot's channel (g, slots))`` when every group reads the same number k of
    distinct channels (the usual case), in a few batched ops; else None. Row by row this is
    ``torch.unique(idx[j], return_inverse=True, return_counts=True)``."""
    g, slots = idx.shape
    srt, _ = idx.sort(dim=1)
    first = torch.ones_like(srt, dtype=torch.bool)
    first[:, 1:] = srt[:, 1:] != srt[:, :-1]  # (g, slots): where a new channel starts
    k = first.sum(1)
    if bool((k != k[0]).any()):
        return None
    support = srt[first].view(g, int(k[0]))  # (g, k), ascending like torch.unique
    inv = torch.searchsorted(support, idx)  # (g, slots)
    counts = torch.zeros(g, support.shape[1], dtype=torch.long, device=idx.device).scatter_add_(
        1, inv, torch.ones_like(inv))  # (g, k)
    return support, inv, counts.gather(1, inv)


@torch.no_grad()
def fit_grouped_weight(weight: torch.Tensor, groups: int, cov: torch.Tensor | None = None, ridge: float = DEFAULT_RIDGE):
    """Block-diagonal ``(groups, out/g, in/g)`` closest to ``weight`` (out, in) under ``C``."""
    w = weight.detach().to(torch.float64)
    c64 = None if cov is None else cov.to(torch.float64)
    out_f, in_f = w.shape
    oc, c = out_f // groups, in_f // groups
    if c64 is None:  # C = I: the diagonal blocks of W themselves
        return w.view(groups, oc, groups, c).diagonal(dim1=0, dim2=2).permute(2, 0, 1).to(weight.dtype)
    supports = torch.arange(in_f, device=w.device).view(groups, c)  # group j reads channels j*c .. (j+1)*c - 1
    return solve_groups(w.view(groups, oc, in_f), c64, supports, ridge).to(weight.dtype)


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
    eye = torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
    m = eye if c64 is None else c64 + ridge_lambda(c64, ridge) * eye  # the metric C + lambda I, as in every fit
    mg = ph.view(g, oc, -1)  # inputs of G2's groups, as maps of x: (g, oc, in)
    mm = torch.matmul(mg, m)  # (g, oc, in)
    a = torch.bmm(mm, mg.transpose(1, 2))  # (g, oc, oc)
    rhs = torch.bmm(resid.view(g, oc, -1), mm.transpose(1, 2))  # (g, oc, oc)
    a = a + 1e-9 * a.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-12)[:, None, None] * torch.eye(
        oc, dtype=a.dtype, device=a.device)
    g2 = solve_batched(a, rhs.transpose(1, 2)).transpose(1, 2)  # G2_j a_j = rhs_j (a_j symmetric)
    module.g2.weight.copy_(g2.to(module.g2.weight.dtype))
