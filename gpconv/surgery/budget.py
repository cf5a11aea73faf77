"""The budget solver: which block each layer gets so the model lands at a parameter target.

Every replaceable layer has a menu of options (its dense self, io blocks at several group
counts, low-rank factors at several ranks, hybrids of both), each with an exact parameter count
and an estimated error. Choosing one option per layer to minimise the summed error under a
parameter budget is a multiple-choice knapsack; we solve its Lagrangian relaxation greedily:
every layer starts at its largest option and we repeatedly take the step down (along the lower
convex hull of that layer's options) that saves parameters at the least error per parameter,
until the model fits. This lands at or just under the target.

Errors are relative squared reconstruction errors of the fitted option on the layer's inputs
(``tr(D C D^T) / tr(W C W^T)``, ``C = E[x x^T]`` from calibration, or ``C = I`` without data).
Low-rank errors for every rank come from one (whitened) SVD; hybrid errors are estimated by
fitting the grouped part first and reading the residual's singular values, and only the chosen
hybrid is then fitted properly (alternating, see :mod:`gpconv.fitting.lowrank`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..errors import GPConvError
from ..fitting import (DEFAULT_RIDGE, choose_permutation, fit_grouped_weight, fit_hybrid, fit_io_weight, fit_layer,
                       svd_factors, whitener)
from ..layers import BlockSpec, GroupedPointwiseBlock, divisors, io_dense

# Per-layer budget levels (fractions of the dense parameters) offered to low-rank and hybrid.
LEVELS = (0.5, 0.375, 0.25, 0.1875, 0.125, 0.09375, 0.0625, 0.03125)
# Group counts tried for grouped options: a geometric ladder keeps the menu short.
GROUP_LADDER = (4, 8, 16, 32, 64)
# Narrowest group the grouped part of a hybrid split may use when ``min_channels_per_group`` only
# sets the layer's budget (``variant="hybrid"`` without ``rank`` or ``target_params``). A grouped
# part pays, if at all, as a small share (2/g of the layer, g = 32-64) next to the low-rank term
# (docs/quality.md); limiting it to the budget's own group count left the split a choice between
# a pure io block and pure low-rank only. 8 channels keep each group's GEMM a real matrix product.
HYBRID_MIN_CHANNELS = 8


@dataclass
class Option:
    spec: BlockSpec | None  # None: keep the dense layer
    params: int  # weight parameters (bias excluded: it is the same for every option)
    error: float  # relative squared reconstruction error


def _group_choices(n_in: int, n_out: int, min_channels_per_group: int) -> list[int]:
    ok = [d for d in divisors(math.gcd(n_in, n_out)) if 3 <= d <= n_in // min_channels_per_group]
    if not ok:
        return []
    picked = []
    for target in GROUP_LADDER:  # the allowed count nearest each rung
        best = min(ok, key=lambda d: (abs(d - target), d))
        if best not in picked:
            picked.append(best)
    return sorted(picked)


@torch.no_grad()
def layer_options(family: str, n_in: int, n_out: int, bias: bool, source: str, weight: torch.Tensor,
                  cov: torch.Tensor | None, min_channels_per_group: int, ridge: float = DEFAULT_RIDGE,
                  cov_eval: torch.Tensor | None = None) -> list[Option]:
    """The menu of one layer for ``family`` in {'io', 'chained', 'lowrank', 'hybrid'}.

    For 'hybrid' the menu holds the pure options (low-rank ranks and io blocks); the solver
    allocates each layer a budget from them, and :func:`best_split` then divides that budget
    between a grouped and a low-rank part by measured error.
    """
    dense = n_in * n_out
    if weight is None:  # meta device: no weights to measure; a size-only proxy keeps choices even
        return _size_only_options(family, n_in, n_out, bias, source, min_channels_per_group)
    # fitted on cov, scored on held-out tokens when given (see best_split)
    w, c, wh, total, err_of = _error_metric(weight, cov, ridge, cov_eval)
    opts = [Option(None, dense, 0.0)]

    def tail_errors(m: torch.Tensor) -> torch.Tensor:
        """err(r) for r = 0..k: energy of m outside its best rank-r part, whitened (in-sample only)."""
        mw = m if wh is None else m @ wh[0]
        s2 = torch.linalg.svdvals(mw).square()
        tails = torch.cat([s2.flip(0).cumsum(0).flip(0), s2.new_zeros(1)])  # tails[r] = sum_{i>=r} s_i^2
        return tails / total

    groups = _group_choices(n_in, n_out, min_channels_per_group)
    if family in ("lowrank", "hybrid"):
        ranks = [r for r in (int(f * dense // (n_in + n_out)) for f in LEVELS) if r >= 1]
        if cov_eval is None:  # in-sample: every rank's error from one set of singular values
            tails = tail_errors(w)
            errs = [float(tails[min(r, len(tails) - 1)]) for r in ranks]
        else:
            svd = _whitened_factors(w, wh)
            errs = [err_of(w - svd(r)) for r in ranks]
        for r, e in zip(ranks, errs):
            opts.append(Option(BlockSpec(n_in, n_out, "lowrank", 1, r, bias, source), r * (n_in + n_out), e))
    for g in groups:
        if family in ("io", "hybrid"):
            probe = GroupedPointwiseBlock(n_in, n_out, g, device="meta")
            idx = probe.gather_index(w.device)
            gw = fit_io_weight(w, g, idx, c, ridge)
            p_io = 2 * dense // g
            opts.append(Option(BlockSpec(n_in, n_out, "io", g, 0, bias, source), p_io, err_of(w - io_dense(gw, idx, n_in))))
        elif family == "chained":
            spec = BlockSpec(n_in, n_out, "chained", g, 0, bias, source)
            p = spec.num_params - (n_out if bias else 0)
            if p < dense:
                g1 = torch.block_diag(*fit_grouped_weight(w, g, c, ridge).unbind(0))
                opts.append(Option(spec, p, err_of(w - g1)))  # a pessimistic proxy: G1 alone
    return opts


def split_specs(n_in: int, n_out: int, budget: int, min_channels_per_group: int, bias: bool = False,
                source: str = "linear") -> list[BlockSpec]:
    """The ways :func:`best_split` can spend ``budget`` weights on one layer: all low-rank
    (rank = budget / (in + out)), then per allowed group count g an io block plus the rest of
    the budget as rank (a plain io block when no rank is left)."""
    specs = []
    r_max = budget // (n_in + n_out)
    if r_max >= 1:
        specs.append(BlockSpec(n_in, n_out, "lowrank", 1, r_max, bias, source))
    for g in _group_choices(n_in, n_out, min_channels_per_group):
        p_io = 2 * n_in * n_out // g
        if p_io > budget:
            continue
        r = (budget - p_io) // (n_in + n_out)
        specs.append(BlockSpec(n_in, n_out, "hybrid" if r >= 1 else "io", g, r if r >= 1 else 0, bias, source))
    return specs


@torch.no_grad()
def best_split(n_in: int, n_out: int, bias: bool, source: str, weight: torch.Tensor, cov: torch.Tensor | None,
               budget: int, min_channels_per_group: int, ridge: float = DEFAULT_RIDGE, permute: bool = False,
               cov_eval: torch.Tensor | None = None) -> Option:
    """The least-error block of at most ``budget`` weight parameters among: low-rank, io, and
    grouped + low-rank hybrids (one per group count, the rest of the budget as rank).

    Hybrid errors are first estimated low-rank first (the low-rank part takes the head of the
    spectrum, the grouped part is fitted to what is left). The hybrid with the lowest estimate is
    then scored as :func:`gpconv.fitting.init_lowrank_` will build it, by alternating the two
    fits (:func:`gpconv.fitting.fit_hybrid`), which can only lower its error: the one-pass
    estimate is loose by about the margins that decide between hybrid and low-rank (1-2% on
    SmolLM2, docs/quality.md), and refining only the leader keeps the cost at one alternated
    fit per layer. With ``permute`` every grouped option is also scored under
    :func:`gpconv.fitting.choose_permutation` (the order ``fit_layer`` would build), and the
    permuted spec wins where it is better.

    Every option is fitted on ``cov`` and scored on ``cov_eval`` (held-out tokens) when given.
    Scoring on the fitting tokens favours the grouped options: their least-squares fit of
    ``2*in/g`` inputs per group to the very tokens it is scored on has more room to overfit than
    the SVD's subspace (docs/quality.md measures the difference).
    """
    w, c, wh, _, err_of = _error_metric(weight, cov, ridge, cov_eval)
    svd = _whitened_factors(w, wh)
    best = None
    lead = None  # (estimate, spec, order) of the best hybrid, refined below
    for spec in split_specs(n_in, n_out, budget, min_channels_per_group, bias, source):
        g, r = spec.groups, spec.rank
        if spec.variant == "lowrank":
            candidates = [(spec, err_of(w - svd(r)))]
        else:
            idx = GroupedPointwiseBlock(n_in, n_out, g, device="meta").gather_index("cpu")
            resid = w - svd(r) if r >= 1 else w
            orders = [(False, idx)]
            if permute:
                perm = choose_permutation(resid, g, c).cpu()  # placed by what the grouped part fits
                orders.append((True, perm[idx]))  # block input x[..., perm]: slot s reads channel perm[s]
            candidates = []
            for permuted, order in orders:
                order = order.to(w.device)
                gw = fit_io_weight(resid, g, order, c, ridge)
                err = err_of(resid - io_dense(gw, order, n_in))
                if r >= 1:
                    if lead is None or err < lead[0]:
                        lead = (err, replace(spec, permuted=permuted), order)
                    continue
                candidates.append((replace(spec, permuted=permuted), err))
        for cand, err in candidates:
            if best is None or err < best.error:
                best = Option(cand, cand.num_params - (n_out if bias else 0), err)  # weights only
    if lead is not None:
        _, spec, order = lead
        gw, b, a = fit_hybrid(w, spec.groups, spec.rank, order, c, ridge, whitener=wh,  # _error_metric's
                              first=svd.factors(spec.rank))  # round one = the SVD already taken
        err = err_of(w - b @ a - io_dense(gw, order, n_in))
        if best is None or err < best.error:
            best = Option(spec, spec.num_params - (n_out if bias else 0), err)
    return best


def _error_metric(weight: torch.Tensor, cov: torch.Tensor | None, ridge: float,
                  cov_eval: torch.Tensor | None = None):
    """``(w, c, wh, total, err_of)`` in float64: the weight, the input second moment ``c`` the
    options are fitted on, its whitener, ``tr(W C W^T)`` and ``err_of(D) = tr(D C D^T) / tr(W C W^T)``
    (Frobenius when there is no second moment). With ``cov_eval`` (held-out tokens) ``total`` and
    ``err_of`` score on it instead of on ``cov``."""
    w = weight.detach().to(torch.float64)
    c = None if cov is None else cov.to(torch.float64)
    wh = whitener(c, w.shape[1], ridge, w.device)
    ce = c if cov_eval is None else cov_eval.to(torch.float64)
    total = float(w.square().sum()) if ce is None else float(((w @ ce) * w).sum())
    total = max(total, 1e-30)

    def err_of(d: torch.Tensor) -> float:
        return float(d.square().sum() / total) if ce is None else float(((d @ ce) * d).sum() / total)

    return w, c, wh, total, err_of


def _whitened_factors(w: torch.Tensor, wh):
    """``rank -> best rank-r approximation of w`` under the whitening ``wh`` (one SVD for all r)."""
    m = w if wh is None else w @ wh[0]
    u, s, vh = torch.linalg.svd(m, full_matrices=False)

    def approx(r: int) -> torch.Tensor:
        a = (u[:, :r] * s[:r]) @ vh[:r]
        return a if wh is None else a @ wh[1]

    approx.factors = lambda r: svd_factors(u, s, vh, r, wh)  # (B, A) exactly as whitened_svd gives them
    return approx


def _size_only_options(family, n_in, n_out, bias, source, min_channels_per_group) -> list[Option]:
    dense = n_in * n_out
    specs = []
    if family in ("lowrank", "hybrid"):
        specs += [BlockSpec(n_in, n_out, "lowrank", 1, int(f * dense // (n_in + n_out)), bias, source)
                  for f in LEVELS if int(f * dense // (n_in + n_out)) >= 1]
    for g in _group_choices(n_in, n_out, min_channels_per_group):
        if family in ("io", "hybrid", "chained"):
            specs.append(BlockSpec(n_in, n_out, "chained" if family == "chained" else "io", g, 0, bias, source))
    opts = [Option(None, dense, 0.0)]
    for sp in specs:
        p = sp.num_params - (n_out if bias else 0)
        if p < dense:
            opts.append(Option(sp, p, (1 - p / dense) ** 2))
    return opts


@torch.no_grad()
def option_errors(spec: BlockSpec, weight: torch.Tensor, stats, min_channels_per_group: int, ridge: float = DEFAULT_RIDGE) -> dict:
    """Held-out relative error of each kind of block at (up to) ``spec``'s size, for the report:
    io with the same groups (project and fit), low-rank with the same parameters, best hybrid."""
    n_in, n_out = spec.in_features, spec.out_features
    size = spec.num_params - (n_out if spec.bias else 0)
    out = {}
    g = spec.groups if spec.variant != "lowrank" else None
    if g is None:  # the io block closest to this size from below
        gs = [d for d in _group_choices(n_in, n_out, 1) if 2 * n_in * n_out // d <= size]
        g = gs[0] if gs else None
    if g is not None:
        io = BlockSpec(n_in, n_out, "io", g, 0, False, spec.source)
        out["io-project"] = fit_layer(io, weight, None, "project", stats, ridge)[1]
        if stats is not None:
            out["io-fit"] = fit_layer(io, weight, None, "fit", stats, ridge)[1]
    init = "fit" if stats is not None else "project"
    r = size // (n_in + n_out)
    if r >= 1:
        out["lowrank"] = fit_layer(BlockSpec(n_in, n_out, "lowrank", 1, r, False, spec.source), weight, None, init,
                                   stats, ridge)[1]
    best = best_split(n_in, n_out, False, spec.source, weight, None if stats is None else stats.fit, size,
                      min_channels_per_group, ridge, cov_eval=None if stats is None else stats.held_out)
    if best is not None:
        out["hybrid"] = fit_layer(best.spec, weight, None, init, stats, ridge)[1]
    return out


def _hull(opts: list[Option]) -> list[Option]:
    """Options on the lower convex hull of (params, error), largest params first.

    Along the hull each step down in parameters costs more error per parameter saved than the
    step before, which is what makes the greedy in :func:`solve` optimal for the relaxation.
    """
    pts = sorted(opts, key=lambda o: (-o.params, o.error))
    hull: list[Option] = []
    for o in pts:
        if hull and o.params == hull[-1].params:
            continue  # same size, no better (sorted by error within a size)
        while hull and hull[-1].error >= o.error:
            hull.pop()  # o is smaller and no worse: it dominates
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # slope a->b must not exceed slope b->o (error per parameter saved)
            if (b.error - a.error) * (b.params - o.params) >= (o.error - b.error) * (a.params - b.params):
                hull.pop()
            else:
                break
        hull.append(o)
    return hull


# How far one layer's kept fraction may stray from the average the target implies. Summed
# per-layer error alone is a poor guide at the extremes: during development on SmolLM2 an
# unbounded solver kept many layers dense and crushed the rest, and the model came out worse
# than uniform SVD at the same size (per-layer errors compound through depth; that run was not
# kept). Within [1/2, 2] x the average it can still reallocate.
SPREAD = 2.0


def bounded(menus: dict[str, list[Option]], budget: int, spread: float = SPREAD) -> dict[str, list[Option]]:
    """Each menu cut to options whose size is within ``[1/spread, spread]`` x the average kept
    fraction the budget implies (dense stays allowed only if that range reaches 100%)."""
    dense = sum(max(o.params for o in m) for m in menus.values())
    f = budget / dense if dense else 1.0
    lo, hi = f / spread, f * spread
    out = {}
    for k, m in menus.items():
        size = max(o.params for o in m)
        keep = [o for o in m if lo * size <= o.params <= hi * size]
        out[k] = keep or [min(m, key=lambda o: abs(o.params - f * size))]  # nothing in range: the closest
    return out


def check_reachable(menus: dict[str, list[Option]], budget: int, target=None) -> None:
    """Raise GPConvError when even the smallest option of every menu exceeds ``budget``.

    Option sizes depend on shapes alone, so the size-only menus of a plan give the same answer
    as the measured ones: shrink asks before calibration runs. ``target``: the user's value, quoted.
    """
    smallest = sum(min(o.params for o in v) for v in menus.values())
    if smallest > budget:
        asked = f"--target-params {target} is" if target is not None else "the target is"
        raise GPConvError(
            f"{asked} out of reach: even the smallest blocks keep {smallest:,} parameters in the "
            f"replaced layers, {smallest - budget:,} over the budget left for them; lower "
            f"--min-channels-per-group, target more layers, or truncate depth"
        )


def solve(menus: dict[str, list[Option]], budget: int) -> dict[str, Option]:
    """One option per key, total params <= ``budget`` if possible, least summed error (greedy).

    Raises GPConvError when even the smallest options do not fit.
    """
    check_reachable(menus, budget)
    hulls = {k: _hull(v) for k, v in menus.items()}
    pos = {k: 0 for k in hulls}
    total = sum(h[0].params for h in hulls.values())
    while total > budget:
        best_key, best_rate = None, None
        for k, h in hulls.items():
            i = pos[k]
            if i + 1 < len(h):
                saved = h[i].params - h[i + 1].params
                rate = (h[i + 1].error - h[i].error) / saved
                if best_rate is None or rate < best_rate:
                    best_key, best_rate = k, rate
        if best_key is None:
            break
        h = hulls[best_key]
        total -= h[pos[best_key]].params - h[pos[best_key] + 1].params
        pos[best_key] += 1
    return {k: hulls[k][pos[k]] for k in hulls}
