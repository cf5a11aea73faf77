"""Linear algebra shared by every fit: the ridge, whitening, batched least squares and errors.

Every fit minimises ``E||W x - B x||^2 = tr((W - B) C (W - B)^T)`` with ``C = E[x x^T]`` measured
on calibration data (``C = I`` without it), plus a ridge ``lambda ||W - B||^2`` that pulls the
fit toward the dense weights (:func:`ridge_lambda`).
"""

from __future__ import annotations

import torch

DEFAULT_RIDGE = 0.1  # see GPConvConfig.ridge


def ridge_lambda(cov: torch.Tensor, ridge: float) -> torch.Tensor:
    """The ridge ``lambda = ridge * mean(diag C)``: one scale for every fit of a layer."""
    return ridge * cov.diagonal().mean().clamp_min(1e-12)


def solve_rows(target: torch.Tensor, cov: torch.Tensor | None, support: torch.Tensor, ridge: float) -> torch.Tensor:
    """Least-squares rows on ``support``: ``argmin_B tr((T - B)(C + lambda I)(T - B)^T)``, ``B``
    zero off support. ``target`` (rows, in); returns (rows, len(support)).

    The ``lambda I`` term is a prior toward the dense weights, not toward zero: in directions the
    calibration data rarely excites, the block keeps what the dense layer did there, so inputs
    that drift (because earlier layers are approximations too) are not amplified. ``lambda`` ->
    infinity gives ``project``; ``cov=None`` (C = I) is ``project`` too: a slice of T.
    """
    if cov is None:
        return target[:, support]
    return solve_groups(target[None], cov, support[None], ridge)[0]  # one group


def solve_groups(w: torch.Tensor, cov: torch.Tensor, supports: torch.Tensor, ridge: float) -> torch.Tensor:
    """:func:`solve_rows` for ``g`` groups whose supports have one size ``k``: ``w`` (g, oc, in),
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
    return solve_batched(css, rhs.transpose(1, 2)).transpose(1, 2)  # B css = rhs <=> css B^T = rhs^T (css symmetric)


def batched(t: torch.Tensor) -> bool:
    """Solve stacked systems in one call? On a GPU, yes: one call per small system costs a launch
    and a synchronisation each (a hybrid SmolLM2 surgery had not finished after 330 s on an H200
    that way). On the CPU, one at a time: torch's batched CPU solve runs its batch in parallel
    around LAPACK and stalled for minutes on a busy 2-core machine (seen in the test suite)."""
    return not t.is_cpu


def solve_batched(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``X`` with ``a[j] X[j] = b[j]`` for stacked ``a`` (g, k, k) and ``b`` (g, k, m): one call
    where :func:`batched` says so, else one system at a time."""
    if batched(a):
        return torch.linalg.solve(a, b)
    return torch.stack([torch.linalg.solve(a[j], b[j]) for j in range(a.shape[0])])


def whitener(cov: torch.Tensor | None, n: int, ridge: float, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(L, L^-1)`` with ``C + lambda I = L L^T``, or None for ``C = I``."""
    if cov is None:
        return None
    c = cov.to(torch.float64)
    c = c + ridge_lambda(c, ridge) * torch.eye(n, dtype=c.dtype, device=c.device)
    chol = torch.linalg.cholesky(c)
    inv = torch.linalg.solve_triangular(chol, torch.eye(n, dtype=c.dtype, device=c.device), upper=False)
    return chol.to(device), inv.to(device)


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


def token_relative_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per token ``|pred - target|^2 / |target|^2`` over the last axis, in fp32: ``(..., H) -> (...)``.

    Relative token by token because pretrained LMs carry "massive activations": in SmolLM2-135M
    the first token's hidden state has a mean square of ~8.5e5 from layer 12 on, the other
    tokens' 30-800, so any error summed over tokens before normalising is that one token's.
    """
    t = target.float()
    return (pred.float() - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-12)
