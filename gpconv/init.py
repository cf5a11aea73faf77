"""Initialising a replacement block from the dense layer it replaces.

* ``random``  - the paper's: fresh weights at nn.Linear's scale (training from scratch).
* ``project`` - the block closest to the dense ``W`` in Frobenius norm.
* ``fit``     - the block closest to ``W`` on the layer's inputs: minimises
  ``E||W x - B x||^2 = tr((W - B) C (W - B)^T)`` with ``C = E[x x^T]`` measured on calibration
  data (see :mod:`gpconv.calibrate`). ``project`` is ``fit`` with ``C = I``.

For the io block every output group ``j`` reads a fixed set ``S_j`` of input channels (its own
group and its interleaved group), so the problem splits into one ridge regression per output
group: ``B_j[:, S_j] = W_j C[:, S_j] (C[S_j, S_j] + lambda I)^-1``. Where the two halves of the
block reach the same input channel, the coefficient is split evenly between G1 and G2 (the
minimum-norm choice; the product is the same).
"""

from __future__ import annotations

import torch

INITS = ("random", "project", "fit")


def _solve_rows(target: torch.Tensor, cov: torch.Tensor | None, support: torch.Tensor, ridge: float) -> torch.Tensor:
    """Least-squares rows on ``support``: ``argmin_B tr((T - B) C (T - B)^T)``, ``B`` zero off support.

    ``target`` (rows, in); returns (rows, len(support)). With ``cov=None`` (C = I) this is a slice.
    """
    if cov is None:
        return target[:, support]
    css = cov[support][:, support]
    lam = ridge * css.diagonal().mean().clamp_min(1e-12)
    css = css + lam * torch.eye(len(support), dtype=cov.dtype, device=cov.device)
    rhs = target @ cov[:, support]  # (rows, |S|)
    # B css = rhs  <=>  css B^T = rhs^T (css is symmetric)
    return torch.linalg.solve(css, rhs.t()).t()


@torch.no_grad()
def fit_io_weight(
    weight: torch.Tensor,
    groups: int,
    gather_index: torch.Tensor,
    cov: torch.Tensor | None = None,
    ridge: float = 1e-2,
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
    result = torch.empty(groups, oc, idx.shape[1], dtype=torch.float64, device=w.device)
    for j in range(groups):
        rows = w[j * oc:(j + 1) * oc]
        support, slot_to_support, mult = torch.unique(idx[j], return_inverse=True, return_counts=True)
        b = _solve_rows(rows, c64, support, ridge)  # (oc, |S|)
        # a channel reached by both G1 and G2 gets half the coefficient in each
        result[j] = b[:, slot_to_support] / mult[slot_to_support].to(b.dtype)
    return result.to(weight.dtype)


@torch.no_grad()
def fit_grouped_weight(weight: torch.Tensor, groups: int, cov: torch.Tensor | None = None, ridge: float = 1e-2):
    """Block-diagonal ``(groups, out/g, in/g)`` closest to ``weight`` (out, in) under ``C``."""
    w = weight.detach().to(torch.float64)
    c64 = None if cov is None else cov.to(torch.float64)
    out_f, in_f = w.shape
    oc, c = out_f // groups, in_f // groups
    res = torch.empty(groups, oc, c, dtype=torch.float64, device=w.device)
    for j in range(groups):
        support = torch.arange(j * c, (j + 1) * c, device=w.device)
        res[j] = _solve_rows(w[j * oc:(j + 1) * oc], c64, support, ridge)
    return res.to(weight.dtype)


@torch.no_grad()
def init_block_(module, weight: torch.Tensor, bias: torch.Tensor | None, method: str, cov=None, ridge=1e-2):
    """Set ``module`` (a fresh gpconv block) from the dense ``weight`` (out, in) and ``bias``.

    ``method`` is one of :data:`INITS`; ``fit`` needs ``cov`` (in, in). Hybrid and low-rank blocks
    are initialised in :mod:`gpconv.lowrank`.
    """
    from .layers import GroupedPointwiseBlock

    if method == "random":
        module.reset_parameters()
    else:
        if method == "project":
            cov = None
        elif cov is None:
            raise ValueError("init='fit' needs calibration statistics (cov)")
        if isinstance(module, GroupedPointwiseBlock) and module.variant == "io" and not module.rank:
            idx = module.gather_index(weight.device)
            module.weight.copy_(fit_io_weight(weight, module.groups, idx, cov, ridge))
        elif isinstance(module, GroupedPointwiseBlock) and module.variant == "chained":
            _fit_chained_(module, weight, cov, ridge)
        else:
            from .lowrank import init_lowrank_

            init_lowrank_(module, weight, cov, ridge)
    if module.bias is not None:
        if bias is not None:
            module.bias.copy_(bias.to(module.bias.dtype))
        else:
            module.bias.zero_()


def _fit_chained_(module, weight, cov, ridge):
    """Chained block ``(I + G2 P) G1``: G1 = best block-diagonal fit of W, then G2 by least
    squares on what G1 leaves, seen through G1 (a product has no closed-form joint optimum)."""
    from .grouping import interleave_index

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
        a = mj @ mj.t() if c64 is None else mj @ c64 @ mj.t()
        rhs = rj @ mj.t() if c64 is None else rj @ c64 @ mj.t()
        lam = ridge * a.diagonal().mean().clamp_min(1e-12)
        g2[j] = torch.linalg.solve(a + lam * torch.eye(oc, dtype=a.dtype, device=a.device), rhs.t()).t()
    module.g2.weight.copy_(g2.to(module.g2.weight.dtype))
