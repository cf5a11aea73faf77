"""Initialising a replacement block from the dense layer it replaces: :func:`fit_layer` builds
the block a spec describes and sets it by ``random``, ``project`` or ``fit`` (closed-form fits in
:mod:`.grouped` and :mod:`.lowrank`, statistics from :mod:`gpconv.surgery.calibrate`), trying a
channel order (:mod:`.permutation`) where asked."""

from __future__ import annotations

from dataclasses import replace

import torch

from ..layers import GroupedPointwiseBlock
from .grouped import fit_chained_, fit_io_weight
from .linalg import DEFAULT_RIDGE, relative_error
from .lowrank import init_lowrank_, whitened_svd
from .permutation import choose_permutation

INITS = ("random", "project", "fit")


@torch.no_grad()
def init_block_(module, weight: torch.Tensor, bias: torch.Tensor | None, method: str, cov=None, ridge=DEFAULT_RIDGE,
                lowrank_first=None):
    """Set ``module`` (a fresh gpconv block) from the dense ``weight`` (out, in) and ``bias``.

    ``method`` is one of :data:`INITS`; ``fit`` needs ``cov`` (in, in). Hybrid and low-rank blocks
    are initialised in :mod:`gpconv.lowrank`.
    """
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
            fit_chained_(module, weight, cov, ridge)
        else:
            init_lowrank_(module, weight, cov, ridge, first=lowrank_first)
    if module.bias is not None:
        if bias is not None:
            module.bias.copy_(bias.to(module.bias.dtype))
        else:
            module.bias.zero_()


@torch.no_grad()
def fit_layer(spec, weight: torch.Tensor, bias: torch.Tensor | None, init: str, stats=None,
              ridge: float = DEFAULT_RIDGE, permute: bool = False):
    """Build the module ``spec`` describes, initialised from the dense ``weight`` (out, in).

    ``stats`` (:class:`gpconv.calibrate.LayerStats`) makes ``fit`` possible and errors honest:
    the error is measured on held-out tokens when there are some. With ``permute``, an io or
    hybrid block also tries :func:`choose_permutation` and keeps it only if the error drops.
    Returns ``(module, relative error or None)``.
    """
    cov_fit = None if stats is None else stats.fit
    cov_eval = None if stats is None else (stats.held_out if stats.held_out is not None else stats.fit)
    method = init
    if init == "fit" and cov_fit is None:
        raise ValueError("init='fit' needs calibration statistics")

    first = None  # a hybrid's rank-r whitened SVD of W: the channel order and both fits start from it
    if spec.variant == "hybrid" and spec.rank >= 1 and method == "fit":
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
