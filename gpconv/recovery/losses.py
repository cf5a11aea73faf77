"""Losses of recovery training, as *sums* over the tokens that count.

Sums, not means: a step's loss is divided once by the number of counted tokens in the whole
step (all micro-batches on all processes), so gradient accumulation and several processes give
the same gradient as one big batch, whatever the response-only mask leaves in each piece.

Position ``t`` predicts token ``t+1``: logits ``[:, :-1]`` meet labels ``[:, 1:]``; a position
counts when its target label is not -100. Hidden states are compared at the same positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GPConvError
from ..fitting import token_relative_error
from ..hfutil import is_transformers, unwrap


def model_outputs(model: nn.Module, input_ids: torch.Tensor, hidden: bool = False):
    """``(logits, hidden_states or None)`` of a transformers model or any module returning logits.

    ``hidden_states`` is the tuple a transformers model returns with ``output_hidden_states``:
    the embeddings first, then one entry per decoder layer.
    """
    if is_transformers(model):
        out = model(input_ids=input_ids, use_cache=False, output_hidden_states=hidden)
        return out.logits, (out.hidden_states if hidden else None)
    if hidden:
        raise GPConvError(f"the hidden-state loss needs a transformers model; {type(unwrap(model)).__name__} returns logits only")
    out = model(input_ids)
    if isinstance(out, torch.Tensor):
        return out, None
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        logits = out[0]
    if logits is None:
        raise GPConvError(f"{type(unwrap(model)).__name__} returned {type(out).__name__}; expected logits or an output with .logits")
    return logits, None


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` targets: position ``t`` predicts label ``t+1``; the last position predicts nothing.

    Padding the labels (rather than slicing the logits) keeps the logits a free ``view``.
    """
    return F.pad(labels[:, 1:], (0, 1), value=-100)


@dataclass
class Positions:
    """Which of the ``B*T`` positions count, and how their rows are picked.

    With few counted positions (response-only data) the others are dropped before any softmax
    (``sparse``); otherwise every row is computed and the sums are masked, which saves copying
    the ``(B*T, V)`` logits.
    """

    targets: torch.Tensor  # (B*T,), -100 where nothing is predicted
    keep: torch.Tensor  # (B*T,) bool

    @classmethod
    def of(cls, labels: torch.Tensor) -> "Positions":
        targets = next_token_targets(labels).reshape(-1)
        return cls(targets, targets != -100)

    @property
    def sparse(self) -> bool:
        return int(self.keep.sum()) * 2 < self.keep.numel()

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """``(B*T, D)`` -> the rows the sums use."""
        return x[self.keep] if self.sparse else x

    def total(self, per_row: torch.Tensor) -> torch.Tensor:
        """Sum of a per-row quantity over counted positions."""
        return per_row.sum() if self.sparse else (per_row * self.keep.to(per_row.dtype)).sum()

    def row_targets(self) -> torch.Tensor:
        return self.targets[self.keep] if self.sparse else self.targets.clamp(min=0)  # -100 rows are masked anyway


@dataclass
class TeacherTargets:
    """The teacher's side of the KL: its probabilities at the counted rows and ``sum q log q``."""

    q: torch.Tensor  # (N, V)
    neg_entropy: torch.Tensor  # (N,)
    temperature: float


@dataclass
class TopKTargets:
    """The teacher's side of the top-``k`` KL at the counted rows (see :func:`gpconv.losses.loss_sums`)."""

    index: torch.Tensor  # (N, k) long: the teacher's k most likely next tokens
    logq: torch.Tensor  # (N, k) fp32: their log-probabilities at the temperature
    log_rest: torch.Tensor  # (N,) fp32: log of the teacher's mass outside them (-inf: none)
    temperature: float
    vocab_size: int

    @property
    def neg_entropy(self) -> torch.Tensor:
        """``sum q log q`` over the k + 1 buckets, per row."""
        q = self.logq.exp()
        rest = self.log_rest.exp()
        return (q * self.logq).sum(-1) + torch.where(rest > 0, rest * self.log_rest, torch.zeros_like(rest))


@torch.no_grad()
def top_k_of(logits: torch.Tensor, k: int, temperature: float = 1.0):
    """``(..., V)`` teacher logits -> ``(index (..., k) int32, logq (..., k) fp32, log_rest (...,) fp32)``."""
    logq = F.log_softmax(logits.float() / temperature, dim=-1)  # (..., V)
    k = min(k, logq.shape[-1])
    top, idx = logq.topk(k, dim=-1, sorted=True)  # (..., k)
    if k == logq.shape[-1]:
        rest = torch.full(top.shape[:-1], float("-inf"), device=top.device)
    else:  # the exact log-mass of the others: a masked logsumexp, stable where 1 - sum(top) is not
        rest = torch.logsumexp(logq.scatter(-1, idx, float("-inf")), dim=-1)
    return idx.to(torch.int32), top, rest


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product ``(N, V), (N, V) -> (N,)`` as a batched matmul: no ``(N, V)`` temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)  # (N, 1, V) @ (N, V, 1) -> (N, 1, 1)


@torch.no_grad()
def teacher_targets(teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> TeacherTargets:
    """Teacher probabilities at temperature ``T`` (computed once per batch, never differentiated)."""
    pos = Positions.of(labels)
    V = teacher_logits.shape[-1]
    t = pos.rows(teacher_logits.reshape(-1, V).float())  # (N, V)
    logq = F.log_softmax(t if temperature == 1 else t / temperature, dim=-1)
    q = logq.exp()
    return TeacherTargets(q, _rowdot(q, logq), temperature)


# Below this student mass outside the teacher's top k, ``log(1 - sum p_i)`` in fp32 loses more
# than ~0.1% of relative precision, and the rest mass is taken by a logsumexp over the other tokens.
_DIRECT_REST = 1e-3


def _topk_cross(teacher: TopKTargets, logp: torch.Tensor) -> torch.Tensor:
    """Per row ``sum_i q_i log p_i + q_rest log p_rest`` over the teacher's top-k + rest buckets.

    ``p_rest`` (the student's mass outside the teacher's top k) is ``1 - sum p_i`` where that is
    accurate; rows where it is tiny take an exact logsumexp over the other tokens instead (an
    ``(N, V)`` pass that would cost as much as a second softmax if done for every row).
    """
    lp_top = logp.gather(1, teacher.index)  # (N, k)
    cross = (teacher.logq.exp() * lp_top).sum(-1)  # (N,)
    if teacher.index.shape[-1] >= logp.shape[-1]:
        return cross  # k = V: no rest bucket (its logsumexp would be -inf)
    direct = 1 - lp_top.exp().sum(-1)  # (N,)
    ok = direct > _DIRECT_REST
    log_p_rest = torch.log(direct.clamp_min(_DIRECT_REST))
    if not bool(ok.all()):
        rows = (~ok).nonzero().squeeze(1)
        exact = torch.logsumexp(logp[rows].scatter(1, teacher.index[rows], float("-inf")), dim=-1)  # (n,)
        log_p_rest = log_p_rest.index_put((rows,), exact)
    return cross + teacher.log_rest.exp() * log_p_rest


@dataclass
class LossSums:
    """Per-step sums over counted positions (divide by their number for per-token values)."""

    ce: torch.Tensor
    kl: torch.Tensor
    hidden: torch.Tensor
    """Relative hidden-state error ``|h_s - h_t|^2 / |h_t|^2`` per token, mean over decoder layers."""
    correct: torch.Tensor | None = None


def loss_sums(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher: TeacherTargets | TopKTargets | None = None,
    hidden: tuple | None = None,
    teacher_hidden: tuple | None = None,
    accuracy: bool = False,
) -> LossSums:
    """Summed cross-entropy, KL(teacher || student) and relative hidden-state error of the student.

    The ``(N, V)`` softmax dominates a small model's step (SmolLM2: V = 49,152), so the student's
    is computed once: with a teacher, the cross-entropy is read off its log-probabilities, and
    KL = sum q log q (from :func:`teacher_targets`) - sum q log p.
    """
    V = logits.shape[-1]
    pos = Positions.of(labels)
    flat = logits.reshape(-1, V).float()  # (B, T, V) -> (B*T, V), a view; fp32 softmax even under autocast
    zero = flat.new_zeros(())
    kl = zero
    if teacher is None:
        ce = F.cross_entropy(flat, pos.targets, ignore_index=-100, reduction="sum")
    else:
        t_vocab = teacher.vocab_size if isinstance(teacher, TopKTargets) else teacher.q.shape[-1]
        if t_vocab is not None and t_vocab != V:
            raise GPConvError(f"teacher has {t_vocab} output logits, the student {V}: vocabularies differ")
        T = teacher.temperature
        s = pos.rows(flat)
        logp = F.log_softmax(s if T == 1 else s / T, dim=-1)  # (N, V)
        if isinstance(teacher, TopKTargets):
            cross = _topk_cross(teacher, logp)
        else:
            cross = _rowdot(teacher.q, logp)
        # T^2 keeps the gradient scale independent of T (Hinton et al., 2015)
        kl = pos.total(teacher.neg_entropy - cross) * (T * T)
        if T == 1:
            ce = -pos.total(logp.gather(1, pos.row_targets()[:, None]).squeeze(1))
        else:
            ce = F.cross_entropy(flat, pos.targets, ignore_index=-100, reduction="sum")
    rel = zero
    if hidden is not None:
        if len(hidden) != len(teacher_hidden):
            raise GPConvError(f"student has {len(hidden) - 1} decoder layers, the teacher {len(teacher_hidden) - 1}: no layer-wise hidden loss")
        pairs = list(zip(hidden[1:], teacher_hidden[1:]))  # skip the embeddings: one term per decoder layer
        for hs, ht in pairs:
            if hs.shape[-1] != ht.shape[-1]:
                raise GPConvError(f"hidden sizes differ (student {hs.shape[-1]}, teacher {ht.shape[-1]}): no hidden-state loss")
            err = token_relative_error(hs.reshape(-1, hs.shape[-1]), ht.reshape(-1, ht.shape[-1]))  # (B*T,)
            rel = rel + pos.total(pos.rows(err))
        rel = rel / len(pairs)
    correct = None
    if accuracy:
        with torch.no_grad():
            correct = (flat[pos.keep].argmax(-1) == pos.targets[pos.keep]).sum()
    return LossSums(ce, kl, rel, correct)
