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
DEFAULT_RIDGE = 0.1  # see GPConvConfig.ridge


def ridge_lambda(cov: torch.Tensor, ridge: float) -> torch.Tensor:
    """The ridge ``lambda = ridge * mean(diag C)``: one scale for every fit of a layer."""
    return ridge * cov.diagonal().mean().clamp_min(1e-12)


def _solve_rows(target: torch.Tensor, cov: torch.Tensor | None, support: torch.Tensor, ridge: float) -> torch.Tensor:
    """Least-squares rows on ``support``: ``argmin_B tr((T - B)(C + lambda I)(T - B)^T)``, ``B``
    zero off support. ``target`` (rows, in); returns (rows, len(support)).

    The ``lambda I`` term is a prior toward the dense weights, not toward zero: in directions the
    calibration data rarely excites, the block keeps what the dense layer did there, so inputs
    that drift (because earlier layers are approximations too) are not amplified. ``lambda`` ->
    infinity gives ``project``; ``cov=None`` (C = I) is ``project`` too: a slice of T.
    """
    if cov is None:
        return target[:, support]
    return _solve_groups(target[None], cov, support[None], ridge)[0]  # one group


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
        b = _solve_groups(w.view(groups, oc, in_f), c64, torch.stack([p[0] for p in parts]), ridge)
        inv = torch.stack([p[1] for p in parts])  # (g, slots): slot -> position in the support
        mult = torch.stack([p[2] for p in parts]).gather(1, inv).to(b.dtype)  # (g, slots)
        # a channel reached by both G1 and G2 gets half the coefficient in each
        return (b.gather(2, inv[:, None, :].expand(groups, oc, -1)) / mult[:, None, :]).to(weight.dtype)
    result = torch.empty(groups, oc, idx.shape[1], dtype=torch.float64, device=w.device)
    for j, (support, slot_to_support, mult) in enumerate(parts):  # supports of unequal size
        b = _solve_rows(w[j * oc:(j + 1) * oc], c64, support, ridge)  # (oc, |S|)
        result[j] = b[:, slot_to_support] / mult[slot_to_support].to(b.dtype)
    return result.to(weight.dtype)


def _solve_groups(w: torch.Tensor, cov: torch.Tensor, supports: torch.Tensor, ridge: float) -> torch.Tensor:
    """:func:`_solve_rows` for ``g`` groups whose supports have one size ``k``: ``w`` (g, oc, in),
    ``supports`` (g, k) -> (g, oc, k). The systems are built batched (one gather and one ``bmm``
    instead of ``g`` of each) and solved one by one."""
    g, oc, _ = w.shape
    k = supports.shape[1]
    lam = ridge_lambda(cov, ridge)
    css = cov[supports[:, :, None], supports[:, None, :]]  # (g, k, k)
    css = css + lam * torch.eye(k, dtype=cov.dtype, device=cov.device)
    cols = cov[:, supports].permute(1, 0, 2)  # (in, g, k) -> (g, in, k): C[:, S_j]
    own = w.gather(2, supports[:, None, :].expand(g, oc, k))  # (g, oc, k): T[:, S_j]
    rhs = torch.bmm(w, cols) + lam * own  # T (C + lambda I)[:, S_j]
    # B css = rhs <=> css B^T = rhs^T (css is symmetric), one group at a time: torch's batched CPU solve runs its batch in parallel
    # around LAPACK and stalled for minutes on a busy 2-core machine (seen in the test suite)
    return torch.stack([torch.linalg.solve(css[j], rhs[j].t()).t() for j in range(g)])


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
        res[j] = _solve_rows(w[j * oc:(j + 1) * oc], c64, support, ridge)
    return res.to(weight.dtype)


@torch.no_grad()
def init_block_(module, weight: torch.Tensor, bias: torch.Tensor | None, method: str, cov=None, ridge=DEFAULT_RIDGE,
                lowrank_first=None):
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

            init_lowrank_(module, weight, cov, ridge, first=lowrank_first)
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
        m = torch.eye(w.shape[1], dtype=w.dtype, device=w.device) if c64 is None else (
            c64 + ridge_lambda(c64, ridge) * torch.eye(w.shape[1], dtype=w.dtype, device=w.device))
        a = mj @ m @ mj.t()  # the metric C + lambda I, as in every other fit
        rhs = rj @ m @ mj.t()
        a = a + 1e-9 * a.diagonal().mean().clamp_min(1e-12) * torch.eye(oc, dtype=a.dtype, device=a.device)
        g2[j] = torch.linalg.solve(a, rhs.t()).t()
    module.g2.weight.copy_(g2.to(module.g2.weight.dtype))


# --------------------------------------------------------------------------------------------
# Errors, channel order, and fitting one layer
# --------------------------------------------------------------------------------------------


def relative_error(weight: torch.Tensor, approx: torch.Tensor, cov: torch.Tensor | None = None) -> float:
    """``sqrt(E||(W - A) x||^2 / E||W x||^2)`` with ``E[x x^T] = cov`` (Frobenius when None)."""
    w = weight.detach().to(torch.float64)
    d = w - approx.detach().to(torch.float64)
    if cov is None:
        num, den = d.square().sum(), w.square().sum()
    else:
        c = cov.to(torch.float64)
        num, den = ((d @ c) * d).sum(), ((w @ c) * w).sum()
    return float((num / den.clamp_min(1e-30)).clamp_min(0).sqrt())


def _balanced_assign(score: torch.Tensor, capacity: torch.Tensor) -> torch.Tensor:
    """Greedy balanced assignment: item i -> bin b maximising score[b, i], bins of given capacity.

    Pairs are taken best-first; an item goes to its best bin that still has room.
    """
    n_bins, n_items = score.shape
    order = torch.argsort(score.flatten(), descending=True)
    assign = [-1] * n_items  # Python lists: this loop runs up to bins x items times per layer,
    room = capacity.tolist()  # and scalar tensor indexing cost ~10x more per step
    left = n_items
    for flat in order.tolist():
        b, i = divmod(flat, n_items)
        if assign[i] < 0 and room[b] > 0:
            assign[i] = b
            room[b] -= 1
            left -= 1
            if left == 0:
                break
    return torch.tensor(assign, dtype=torch.long)


@torch.no_grad()
def choose_permutation(weight: torch.Tensor, groups: int, cov: torch.Tensor | None = None, rank: int = 0,
                       ridge: float = DEFAULT_RIDGE, first=None) -> torch.Tensor:
    """An input channel order for the io block that keeps the most weight energy in its support.

    With ``rank >= 1`` (a hybrid block) the energy is that of what the grouped part will be fitted
    to: ``W`` minus its rank-``rank`` whitened SVD. The low-rank term takes the head of the
    spectrum, so the weight's own energy would place channels by what is no longer left to fit
    (on SmolLM2-135M it gave a higher held-out error in every hybrid measured, docs/quality.md).

    Output group ``j`` reads its own input group ``j`` (G1) and interleaved group ``j`` (G2).
    Dropping ``W[o, i]`` costs about ``C[i, i] W[o, i]^2``, so with
    ``E[j, i] = C[i, i] * sum_{o in group j} W[o, i]^2`` we (1) give every input group the
    ``c`` channels with the most energy towards its output group, then (2) order each group's
    channels so that the interleave sends each to the output group it matters most to next.
    Returns ``perm`` with block input = ``x[..., perm]``. ``first``: ``whitened_svd(weight, rank,
    cov, ridge)`` when the caller already has it.
    """
    w = weight.detach().to(torch.float64)
    if rank >= 1:
        from .lowrank import whitened_svd

        b, a = first if first is not None else whitened_svd(w, rank, cov, ridge)
        w = w - b @ a
    out_f, in_f = w.shape
    g, c, oc = groups, in_f // groups, out_f // groups
    diag = torch.ones(in_f, dtype=torch.float64) if cov is None else cov.diagonal().to(torch.float64).cpu()
    energy = (w.cpu().square().view(g, oc, in_f).sum(1)) * diag  # (g, in)
    # (1) G1 groups, c channels each
    g1 = _balanced_assign(energy, torch.full((g,), c))
    perm = torch.empty(in_f, dtype=torch.long)
    for j in range(g):
        members = torch.nonzero(g1 == j).flatten()  # channels of input group j
        slots = torch.arange(j * c, (j + 1) * c)
        residue = slots % g  # the interleaved group each slot feeds
        # (2) slot order: score by the energy towards the slot's interleaved output group;
        # a slot whose interleaved group is j itself adds nothing new
        e = energy[:, members].clone()  # (g, c)
        e[j] = -1.0
        cap = torch.bincount(residue, minlength=g)
        to_res = _balanced_assign(e, cap)  # member -> residue
        for r in range(g):
            perm[slots[residue == r]] = members[to_res == r]
    return perm.to(weight.device)


@torch.no_grad()
def fit_layer(spec, weight: torch.Tensor, bias: torch.Tensor | None, init: str, stats=None,
              ridge: float = DEFAULT_RIDGE, permute: bool = False):
    """Build the module ``spec`` describes, initialised from the dense ``weight`` (out, in).

    ``stats`` (:class:`gpconv.calibrate.LayerStats`) makes ``fit`` possible and errors honest:
    the error is measured on held-out tokens when there are some. With ``permute``, an io or
    hybrid block also tries :func:`choose_permutation` and keeps it only if the error drops.
    Returns ``(module, relative error or None)``.
    """
    from dataclasses import replace

    cov_fit = None if stats is None else stats.fit
    cov_eval = None if stats is None else (stats.held_out if stats.held_out is not None else stats.fit)
    method = init
    if init == "fit" and cov_fit is None:
        raise ValueError("init='fit' needs calibration statistics")

    first = None  # a hybrid's rank-r whitened SVD of W: the channel order and both fits start from it
    if spec.variant == "hybrid" and spec.rank >= 1 and method == "fit":
        from .lowrank import whitened_svd

        first = whitened_svd(weight, spec.rank, cov_fit, ridge)

    def build(s):
        m = s.build(device=weight.device, dtype=weight.dtype)
        if s.permuted:
            m.input_perm.copy_(choose_permutation(weight, s.groups, cov_fit, s.rank, ridge, first=first))
        init_block_(m, weight, bias, method, cov_fit, ridge, lowrank_first=first)
        err = None if method == "random" else relative_error(weight, m.to_dense(), cov_eval)
        return m, err

    candidates = [replace(spec, permuted=False)]
    if permute and method != "random" and spec.variant in ("io", "hybrid"):
        candidates.append(replace(spec, permuted=True))
    best = None
    for s in candidates:
        m, err = build(s)
        if best is None or (err is not None and best[1] is not None and err < best[1]):
            best = (m, err)
    return best
