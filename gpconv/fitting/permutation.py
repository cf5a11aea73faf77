"""An input channel order for the io block that keeps correlated inputs in one group (stored
as an index buffer and composed into the block's gather, free at run time)."""

from __future__ import annotations

import torch

from .linalg import DEFAULT_RIDGE
from .lowrank import whitened_svd


def balanced_assign(score: torch.Tensor, capacity: torch.Tensor) -> torch.Tensor:
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
        b, a = first if first is not None else whitened_svd(w, rank, cov, ridge)
        w = w - b @ a
    out_f, in_f = w.shape
    g, c, oc = groups, in_f // groups, out_f // groups
    diag = torch.ones(in_f, dtype=torch.float64) if cov is None else cov.diagonal().to(torch.float64).cpu()
    energy = (w.cpu().square().view(g, oc, in_f).sum(1)) * diag  # (g, in)
    # (1) G1 groups, c channels each
    g1 = balanced_assign(energy, torch.full((g,), c))
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
        to_res = balanced_assign(e, cap)  # member -> residue
        for r in range(g):
            perm[slots[residue == r]] = members[to_res == r]
    return perm.to(weight.device)
