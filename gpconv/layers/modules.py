"""Grouped pointwise layers: the kphi-3 block and its relatives.

Read top to bottom:

* :class:`GroupedLinear` - a block-diagonal linear map, ``groups`` independent dense maps run as
  one batched matmul.
* :class:`GroupedPointwiseBlock` - the paper's block. ``variant="io"`` (default) is
  ``y = G1(x) + G2(interleave(x))``; ``variant="chained"`` is ``h = G1(x); y = h + G2(interleave(h))``.
  With ``rank > 0`` the io block also carries a low-rank term ``B(A(x))`` (the "hybrid").
* :class:`LowRankLinear` - ``y = B(A(x))``, the low-rank baseline gpconv compares against.
* :class:`BlockSpec` - a small, JSON-able description of one replaced layer. Surgery produces
  specs, checkpoints store them, loading rebuilds modules from them.

All of them are linear maps, so each has an exact dense equivalent (:meth:`to_dense`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from .config import kernel_config
from .functional import grouped_forward, io_dense, io_forward
from .grouping import interleave, interleave_index
from .cuda import triton_route
from .ops import io_block_impl, io_reference, traced_gather_index

VARIANTS = ("io", "chained", "hybrid", "lowrank")


# --------------------------------------------------------------------------------------------
# Spec
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockSpec:
    """What one replaced layer is. Stored per module in a checkpoint's ``config.json``.

    ``source`` remembers the original layer type ("linear" or GPT-2's "conv1d") so that
    :func:`gpconv.densify` can put back exactly what the base architecture expects.
    ``permuted`` marks an io/hybrid block that reads its input through a learned channel order
    (an index buffer ``input_perm``, composed into the gather at no run-time cost).
    """

    in_features: int
    out_features: int
    variant: str = "io"
    groups: int = 1
    rank: int = 0
    bias: bool = False
    source: str = "linear"
    permuted: bool = False

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if self.variant != "lowrank" and (
            self.groups < 1 or self.in_features % self.groups or self.out_features % self.groups
        ):
            raise ValueError(f"{self.groups} groups do not divide {self.in_features} -> {self.out_features}")
        if self.variant in ("hybrid", "lowrank") and self.rank < 1:
            raise ValueError(f"variant {self.variant!r} needs rank >= 1")

    @property
    def num_params(self) -> int:
        """Exact parameter count of the module this spec builds."""
        i, o, g, r = self.in_features, self.out_features, self.groups, self.rank
        n = o if self.bias else 0
        if self.variant == "io":
            n += 2 * i * o // g
        elif self.variant == "chained":
            n += i * o // g + o * o // g
        elif self.variant == "hybrid":
            n += 2 * i * o // g + r * (i + o)
        else:  # lowrank
            n += r * (i + o)
        return n

    @property
    def dense_params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)

    def build(self, device=None, dtype=None) -> nn.Module:
        kw = dict(bias=self.bias, device=device, dtype=dtype)
        if self.variant == "lowrank":
            return LowRankLinear(self.in_features, self.out_features, self.rank, source=self.source, **kw)
        return GroupedPointwiseBlock(
            self.in_features,
            self.out_features,
            self.groups,
            variant="chained" if self.variant == "chained" else "io",
            rank=self.rank if self.variant == "hybrid" else 0,
            source=self.source,
            permuted=self.permuted,
            **kw,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BlockSpec":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown block fields {sorted(unknown)} (written by a newer gpconv?)")
        return cls(**d)


def _uniform_(t: torch.Tensor, fan_in: int) -> None:
    # The scale nn.Linear uses by default (kaiming_uniform with a=sqrt(5)): U(-1/sqrt(fan_in), +).
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        t.uniform_(-bound, bound)


# --------------------------------------------------------------------------------------------
# GroupedLinear
# --------------------------------------------------------------------------------------------


class GroupedLinear(nn.Module):
    """``groups`` independent dense maps, each ``in/groups -> out/groups``, as one batched matmul.

    ``weight`` has shape ``(groups, out/groups, in/groups)``: group ``j`` maps input channels
    ``[j*in/g, (j+1)*in/g)`` to output channels ``[j*out/g, (j+1)*out/g)``.
    """

    def __init__(self, in_features, out_features, groups, bias=False, device=None, dtype=None):
        super().__init__()
        if in_features % groups or out_features % groups:
            raise ValueError(f"{groups} groups do not divide {in_features} -> {out_features}")
        self.in_features, self.out_features, self.groups = in_features, out_features, groups
        self.weight = nn.Parameter(
            torch.empty(groups, out_features // groups, in_features // groups, device=device, dtype=dtype)
        )
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _uniform_(self.weight, self.in_features // self.groups)
        if self.bias is not None:
            _uniform_(self.bias, self.in_features // self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (..., in) -> (N, in)
        y = grouped_forward(x2, self.weight, self.bias, self.groups)  # (N, out)
        return y.view(*lead, self.out_features)

    @torch.no_grad()
    def to_dense(self) -> torch.Tensor:
        """The ``(out, in)`` block-diagonal matrix this layer applies."""
        return torch.block_diag(*self.weight.unbind(0))

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, groups={self.groups}, bias={self.bias is not None}"


# --------------------------------------------------------------------------------------------
# The kphi-3 block
# --------------------------------------------------------------------------------------------


class GroupedPointwiseBlock(nn.Module):
    """The kphi-3 grouped pointwise block, a drop-in replacement for ``nn.Linear(in, out)``.

    ``variant="io"`` (the report's default): ``y = G1(x) + G2(interleave(x))``, both grouped
    ``in -> out`` with ``groups`` groups. Output group ``j`` sees input group ``j`` (through G1)
    and interleaved group ``j`` (through G2: every ``groups``-th channel starting at ``j``), so
    the two maps share one output and run as a single batched matmul over a gathered input:

        weight: (groups, out/groups, 2*in/groups) = [G1 weight | G2 weight] per group

    ``variant="chained"``: ``h = G1(x)``; ``y = h + G2(interleave(h))`` with G2 grouped
    ``out -> out`` (the paper's ``GroupedPointwiseConvolutionBlock``).

    ``rank > 0`` (io only) adds ``lowrank_b @ lowrank_a @ x``: the grouped + low-rank hybrid.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        groups: int,
        bias: bool = False,
        variant: str = "io",
        rank: int = 0,
        source: str = "linear",
        permuted: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if variant not in ("io", "chained"):
            raise ValueError(f"GroupedPointwiseBlock variant must be 'io' or 'chained', got {variant!r}")
        if rank and variant != "io":
            raise ValueError("a low-rank term is only supported on the io variant")
        if permuted and variant != "io":
            raise ValueError("an input permutation is only supported on the io variant")
        if in_features % groups or out_features % groups:
            raise ValueError(f"{groups} groups do not divide {in_features} -> {out_features}")
        self.in_features, self.out_features, self.groups = in_features, out_features, groups
        self.variant, self.rank, self.source = variant, rank, source
        fk = dict(device=device, dtype=dtype)
        c, oc = in_features // groups, out_features // groups
        if variant == "io":
            self.weight = nn.Parameter(torch.empty(groups, oc, 2 * c, **fk))
        else:
            self.g1 = GroupedLinear(in_features, out_features, groups, **fk)
            self.g2 = GroupedLinear(out_features, out_features, groups, **fk)
        if rank:
            self.lowrank_a = nn.Parameter(torch.empty(rank, in_features, **fk))
            self.lowrank_b = nn.Parameter(torch.empty(out_features, rank, **fk))
        self.bias = nn.Parameter(torch.empty(out_features, **fk)) if bias else None
        if permuted:
            # A channel order of the input, saved with the weights. Identity until an init sets it.
            idx_device = device if device is not None and torch.device(device).type != "meta" else None
            self.register_buffer("input_perm", torch.arange(in_features, device=idx_device))
        else:
            self.input_perm = None
        self._gather_cache: dict = {}
        self.reset_parameters()

    @property
    def spec(self) -> BlockSpec:
        return BlockSpec(
            self.in_features,
            self.out_features,
            "chained" if self.variant == "chained" else ("hybrid" if self.rank else "io"),
            self.groups,
            self.rank,
            self.bias is not None,
            self.source,
            self.input_perm is not None,
        )

    def reset_parameters(self) -> None:
        """Random init at nn.Linear's scale (the paper trains these blocks from scratch)."""
        c = self.in_features // self.groups
        if self.variant == "io":
            _uniform_(self.weight, 2 * c)
        else:
            self.g1.reset_parameters()
            self.g2.reset_parameters()
        if self.rank:
            _uniform_(self.lowrank_a, self.in_features)
            with torch.no_grad():
                self.lowrank_b.zero_()  # the low-rank term starts silent, like a LoRA adapter
        if self.bias is not None:
            _uniform_(self.bias, self.in_features)

    # -- the gathered input ------------------------------------------------------------------

    def gather_index(self, device=None) -> torch.Tensor:
        """Input channels each output group reads, ``(groups, 2*in/groups)``: [own group | interleaved group].

        Cached per device and never saved (it follows from the shape, plus ``input_perm``).
        """
        perm = self.input_perm
        key = (device, None if perm is None else perm.data_ptr(), None if perm is None else perm._version)
        idx = self._gather_cache.get(key)
        if idx is None:
            idx = traced_gather_index(self.in_features, self.groups, None if perm is None else perm.detach().cpu())
            idx = idx.to(device)
            self._gather_cache.clear()
            self._gather_cache[key] = idx
        return idx

    # -- forward -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (..., in) -> (N, in)
        if self.variant == "io":
            # the gather index (a cached Python-side tensor) is passed as a function: only the
            # gather paths build it; the C kernels, the many-token paths and torch.compile read
            # input_perm (a buffer) directly. A 1-token decode call is ~30 us of Python around a
            # ~5 us kernel (SmolLM2 -m 64), so what it skips counts.
            lowrank = (self.lowrank_a, self.lowrank_b) if self.rank else None  # the hybrid's term
            if torch.compiler.is_compiling():  # torch.compile / torch.export: one op, or plain ops to export
                if kernel_config().custom_ops:
                    a, b = lowrank or (None, None)
                    y = torch.ops.gpconv.io_block(x2, self.weight, self.bias, self.input_perm, a, b)
                else:
                    y = io_reference(x2, self.weight, self.bias, self.input_perm, lowrank)
            elif (dtype := triton_route.eager_dtype(x2, self.weight)) is not None:  # eager CUDA: Triton
                y = self._triton(x2, lowrank, dtype)
            else:
                y = io_forward(x2, self.weight, self.bias, self.groups, lambda: self.gather_index(x2.device),
                               self.input_perm, lowrank)
        else:
            h = self.g1(x2)
            y = h + self.g2(interleave(h, self.groups))
            if self.bias is not None:
                y = y + self.bias
        return y.view(*lead, self.out_features)

    def _triton(self, x2: torch.Tensor, lowrank, dtype: torch.dtype) -> torch.Tensor:
        """An eager call on the Triton kernels, every operand in ``dtype`` (autocast's, if on).
        With autograd on it goes through ``gpconv::io_block``, whose registered autograd runs the
        Triton gradients; inference calls the op's implementation without the dispatcher hop."""
        def cast(t):  # autocast does not reach into a custom op: cast as it would for nn.Linear
            return t if t is None or t.dtype == dtype else t.to(dtype)

        a, b = lowrank or (None, None)
        args = (cast(x2), cast(self.weight), cast(self.bias), self.input_perm, cast(a), cast(b))
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
            return torch.ops.gpconv.io_block(*args)
        return io_block_impl(*args)

    # -- dense equivalent --------------------------------------------------------------------

    @torch.no_grad()
    def to_dense(self) -> torch.Tensor:
        """The exact ``(out, in)`` matrix this block applies (bias excluded)."""
        g, o, i = self.groups, self.out_features, self.in_features
        if self.variant == "io":
            dense = io_dense(self.weight, self.gather_index(self.weight.device), i)
        else:
            w1, w2 = self.g1.to_dense(), self.g2.to_dense()  # (out, in), (out, out)
            inv = torch.argsort(interleave_index(o, g)).to(w1.device)
            # interleave(h) = h[idx], so G2(interleave(h)) = w2[:, inv] @ h
            dense = w1 + w2[:, inv] @ w1
        if self.rank:
            dense = dense + self.lowrank_b @ self.lowrank_a
        return dense

    def extra_repr(self) -> str:
        s = f"{self.in_features} -> {self.out_features}, groups={self.groups}, variant={self.variant}"
        if self.rank:
            s += f", rank={self.rank}"
        if self.input_perm is not None:
            s += ", permuted"
        return s + f", bias={self.bias is not None}"


# --------------------------------------------------------------------------------------------
# Low-rank baseline
# --------------------------------------------------------------------------------------------


class LowRankLinear(nn.Module):
    """``y = B(A(x)) + bias`` with ``A: in -> rank`` and ``B: rank -> out``."""

    def __init__(self, in_features, out_features, rank, bias=False, source="linear", device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank, self.source = in_features, out_features, rank, source
        fk = dict(device=device, dtype=dtype)
        self.lowrank_a = nn.Parameter(torch.empty(rank, in_features, **fk))
        self.lowrank_b = nn.Parameter(torch.empty(out_features, rank, **fk))
        self.bias = nn.Parameter(torch.empty(out_features, **fk)) if bias else None
        self.reset_parameters()

    @property
    def spec(self) -> BlockSpec:
        return BlockSpec(
            self.in_features, self.out_features, "lowrank", 1, self.rank, self.bias is not None, self.source
        )

    def reset_parameters(self) -> None:
        _uniform_(self.lowrank_a, self.in_features)
        _uniform_(self.lowrank_b, self.rank)
        if self.bias is not None:
            _uniform_(self.bias, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x @ self.lowrank_a.t()) @ self.lowrank_b.t()  # (..., in) -> (..., r) -> (..., out)
        return y if self.bias is None else y + self.bias

    @torch.no_grad()
    def to_dense(self) -> torch.Tensor:
        return self.lowrank_b @ self.lowrank_a

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, rank={self.rank}, bias={self.bias is not None}"


GPCONV_MODULES = (GroupedPointwiseBlock, LowRankLinear)


def is_gpconv_module(module: nn.Module) -> bool:
    return isinstance(module, GPCONV_MODULES)
