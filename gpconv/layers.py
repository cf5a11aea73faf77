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
import os
import threading
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .grouping import interleave, interleave_index

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
            g, c = self.groups, self.in_features // self.groups
            own = torch.arange(self.in_features).view(g, c)
            mixed = interleave_index(self.in_features, g).view(g, c)
            idx = torch.cat([own, mixed], dim=1)  # (g, c) + (g, c) -> (g, 2c)
            if perm is not None:
                idx = perm.detach().cpu()[idx]
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
            y = io_forward(x2, self.weight, self.bias, self.groups, lambda: self.gather_index(x2.device),
                           self.input_perm, lowrank)
        else:
            h = self.g1(x2)
            y = h + self.g2(interleave(h, self.groups))
            if self.bias is not None:
                y = y + self.bias
        return y.view(*lead, self.out_features)

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


def io_dense(weight: torch.Tensor, gather_index: torch.Tensor, in_features: int) -> torch.Tensor:
    """Dense ``(out, in)`` matrix of io-block weights ``(g, out/g, 2c)`` read through ``gather_index`` ``(g, 2c)``."""
    g, oc, _ = weight.shape
    dense = torch.zeros(g, oc, in_features, device=weight.device, dtype=weight.dtype)
    # G1 and G2 reach the same input channel where a group meets its own interleaved group;
    # scatter_add sums both contributions there.
    dense.scatter_add_(2, gather_index.to(weight.device)[:, None, :].expand_as(weight), weight)
    return dense.reshape(g * oc, in_features)


# --------------------------------------------------------------------------------------------
# The grouped matmul behind both layers
# --------------------------------------------------------------------------------------------
#
# On a 2-D input x (N, in) with g groups of c = in/g channels and weight (g, oc, K):
#
#     y[:, group j] = x[:, group j] @ W[j, :, :c].T                      (K = c: GroupedLinear)
#                   + interleave(x)[:, group j] @ W[j, :, c:].T          (K = 2c: the io block)
#                   + bias
#
# Two CPU paths, chosen by the token count N (measurements in docs/speed.md):
#
# * N >= CONV_MIN_TOKENS, the io block: two batched GEMMs (MKL), one per half. The own half
#   reads x in place through the (g, N, c) view; the interleaved half costs one copy of x (a
#   reused buffer at inference; kept for backward in training). Single-threaded the GEMMs
#   write straight into the (N, out) result through a strided view; with several threads they
#   write a contiguous (g, N, oc) result plus one transposing copy, because bmm into a strided
#   output runs one multithreaded GEMM per group and each waits on every thread (3-20x slower
#   on a loaded machine). Training uses _IOBlockCPU's hand-written backward: four more batched
#   GEMMs through strided views and one un-interleaving add, instead of autograd's scatter and
#   transposing copies (forward+backward time/param on the Xeon VM: down_proj 3.30 -> 2.51,
#   o_proj 1.86 -> 1.43; docs/speed.md).
#   oneDNN's grouped 1x1 convolution, the previous path, re-packed its weight on every call and
#   measured slower on every Phi-3 shape; it remains for GroupedLinear (K = c: x (N, in)
#   row-major *is* a channels-last (1, in, N, 1) image, so it needs no copy at all) and for the
#   plain-ops route that torch.compile, autocast and other devices take.
# * small N (decode): index_select through the cached gather index + one bmm + a transpose -
#   three ops, the fewest fixed costs for a 1-token step.

CONV_MIN_TOKENS = 128
"""CPU: from this many tokens on, the many-token paths (batched GEMMs / grouped conv); below it, gather + bmm."""

# -- gpconv._native: C kernels for the io block on the CPU (float32) -----------------------------
#
# gpconv/_native.c, built by setup.py when a C compiler is there (docs/speed.md):
# * interleave / uninterleave_add: torch runs x.view(N, c, g).transpose(1, 2).contiguous() as a
#   strided elementwise copy, one scalar load per float at a stride of g floats, ~3x a plain copy
#   (8 ms against 2.5 ms for down_proj's 32 MB at 1024 tokens); the kernels transpose each token
#   in 16 x 16 (AVX-512) or 8 x 8 (AVX2) register tiles, near plain-copy speed. Also used as a
#   plain 2-D transpose.
# * io_forward (AVX-512 or AVX2 + FMA): the whole block fused, for groups of <=
#   FUSED_MAX_OUT_PER_GROUP outputs.
# * io_small (AVX-512 or AVX2 + FMA): inference of <= NATIVE_SMALL_MAX_TOKENS tokens (decode).
# Which of them a CPU runs is chosen when the extension loads (_native.isa(): the best it has).
# Every one has a torch path below that gives the same result (tests/test_native.py).

try:
    from . import _native
except ImportError:  # built without a C compiler: torch's copies below do the same work
    _native = None

NATIVE = _native is not None and os.environ.get("GPCONV_NATIVE", "1") != "0"
"""Use gpconv._native for the io block on CPU float32 (set False, or GPCONV_NATIVE=0, to opt out)."""

# Threads: setup.py builds the extension with -fopenmp where the compiler has it; loaded after
# torch, whose libgomp.so.1 is already in the process, its parallel regions then run on torch's
# own OpenMP pool, and the kernels get torch.get_num_threads() threads. A build without OpenMP
# (_native.openmp == 0) is used only when torch runs one thread: its pthreads beside torch's
# spinning OpenMP workers measured slower than torch alone (SmolLM2's prefill at two threads
# 1,155 -> 759 tokens/s, docs/speed.md).


def _threads() -> int:
    return torch.get_num_threads() if _native.openmp else 1


def native_status() -> str:
    """What the C kernels do in this process, in words (benchmarks print it next to their numbers)."""
    if _native is None:
        return "not built (torch paths)"
    if not NATIVE:
        return "off (torch paths)"
    kernels = {"avx512": "fused forward + copies (AVX-512)", "avx2": "fused forward + copies (AVX2)",
               "portable": "copies only (no AVX2)"}[_native.isa()]
    threads = "OpenMP, torch's threads" if _native.openmp else "no OpenMP, used at 1 thread only"
    if _native.isa() == "portable" or not FUSED_FORWARD:
        return f"on: {kernels}, {threads}"
    # the CPU-chosen routing limits, so that a benchmark's header says which paths its rows took
    return (f"on: {kernels}, {threads}, fused forward <= {FUSED_MAX_OUT_PER_GROUP} outputs/group, "
            f"decode kernel <= {NATIVE_SMALL_MAX_TOKENS} tokens")


def _native_ok(*ts: torch.Tensor) -> bool:
    if not (NATIVE and _native is not None and (torch.get_num_threads() == 1 or _native.openmp)  # see the note after NATIVE
            and not torch.compiler.is_compiling()):
        return False
    for t in ts:  # (a loop, not all(<generator>): this runs on every decode call of every block)
        if not t.is_cpu or t.dtype != torch.float32 or not t.is_contiguous():  # (is_cpu: 0.08 us, device.type 0.35)
            return False
    return True


def _interleave_into(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (N, g, c) <- the interleave of x (N, in): ``out[n, k, i] = x[n, i*g + k]``."""
    n, g, c = out.shape
    if _native_ok(x, out):
        _native.interleave(x.data_ptr(), out.data_ptr(), n, c, g, _threads())
        return out
    return out.copy_(x.view(n, c, g).transpose(1, 2))  # (N, in) -> (N, c, g) -> (N, g, c)


FUSED_FORWARD = True
"""CPU float32 with AVX-512 or AVX2: run the io block's forward as gpconv._native.io_forward, one fused
interleave + GEMM, instead of an interleaved copy and two MKL GEMMs (docs/speed.md). Only
consulted when :data:`NATIVE` is on."""

FUSED_BACKWARD = True
"""CPU float32 with AVX2 (AVX-512 CPUs run the same AVX2 code), groups of at most
:data:`FUSED_GRAD_MAX_OUT_PER_GROUP` outputs: compute the io block's gradients by two C kernels,
gpconv._native.io_dx (dx: one fused GEMM + un-interleave, instead of two MKL GEMMs, a (g, N, c)
intermediate and an un-interleaving add) and io_dw (dW: both halves from x and dY as they are,
instead of a transposed dY, an interleaved copy of x and two MKL GEMMs); docs/speed.md. Only
consulted when :data:`NATIVE` is on."""

def _cpu_vendor() -> str:
    """The CPU's vendor string ("AuthenticAMD", "GenuineIntel"), or "" where it cannot be read."""
    from .bench import cpu_field  # (gpconv.bench imports this module only inside functions)

    return cpu_field("vendor_id") or ""


def _amd_avx512() -> bool:
    """An AMD CPU running the AVX-512 kernels (Zen 4 and later), where some limits differ."""
    return _native is not None and _native.isa() == "avx512" and _cpu_vendor() == "AuthenticAMD"


_AMD_AVX512 = _amd_avx512()  # read once at import: both CPU-chosen limits below depend on it


def _default_fused_max_out(amd_avx512: bool) -> int:
    # AMD's AVX-512 (Zen 4) runs the fused forward faster than MKL's two GEMMs at every Phi-3 /
    # Llama group width measured: 1,024 tokens, one thread, 0.72-0.95x on 128-2048 outputs per
    # group, Llama-7B up_proj's 688 at 1.02; at two threads 0.71-1.00 (docs/speed.md). Intel's
    # (a Xeon with two 512-bit FMA units) ran MKL faster on wide groups, and AVX2 does everywhere
    # above ~192 (Zen 3; Zen 4: 1.21x on qkv_proj's 768).
    return 2048 if amd_avx512 else 192


FUSED_MAX_OUT_PER_GROUP = _default_fused_max_out(_AMD_AVX512)
"""The fused forward only for groups of at most this many outputs; chosen when gpconv loads, by
CPU: 2048 on AMD CPUs with AVX-512, 192 elsewhere. The kernel re-reads a 48-token slice of x once
per output tile and streams all weights once per 48 tokens, so where MKL's blocking is stronger
it loses on wide groups. Measured at one thread, 1024 tokens (docs/speed.md): AVX-512 on a Xeon
wins on down_proj (96 outputs per group: 29.3 against 33.6 ms) and on SmolLM2's narrow groups
(up to 2.2x), and is 6-10% slower on o_proj / qkv_proj (256 / 768) and 22% slower on
gate_up_proj (2048); on a Zen 4 EPYC it wins on all four (0.66 down_proj, 0.83 o_proj, 0.95
qkv_proj, 0.93 gate_up_proj). AVX2 (Zen 3 EPYC): 0.46-0.97x the two GEMMs' time on SmolLM2's and
tiny-phi3's groups of 24-192 outputs at 128-1024 tokens, 0.91-0.98x at 512; on Phi-3's down_proj
(96, but 8192 inputs, whose 48-token block outgrows the 512 KiB L2) 0.96-1.05x."""

FUSED_GRAD_MAX_OUT_PER_GROUP = 192
"""The gradient kernels (:data:`FUSED_BACKWARD`) only for groups of at most this many outputs:
wider, MKL's GEMMs were as fast or faster, or only some readings were faster (Zen 4, 1024 tokens,
two runs: o_proj's 256 dx 0.90-1.02x / dW 0.87-0.88x, qkv_proj's 768 1.15-1.17x / 1.00-1.19x,
gate_up_proj's 2048 1.22-1.25x / 1.33-1.62x the MKL path's time)."""

# The backward gives both dW GEMMs contiguous operands for groups of up to this many outputs.
# Measured on the Xeon at 1024 tokens: through strided views MKL took ~20 ms for each of
# down_proj's dW GEMMs, ~11 ms on contiguous ones, and the transposes cost ~2-4 ms (down_proj
# forward+backward 122.6 -> 114.0 ms); level on o_proj and qkv_proj, 6% slower on gate_up_proj
# (2048 outputs per group). Reading dY^T transposed in the dx GEMMs too measured no faster (Zen 3).
_DW_CONTIGUOUS_MAX_OUT = 192


def _kernels_ok(x: torch.Tensor, weight: torch.Tensor, bias, *more: torch.Tensor) -> bool:
    """May the block kernels (io_forward, io_small; AVX-512 or AVX2) run on these tensors?"""
    return (FUSED_FORWARD and _native_ok(x, weight, *(() if bias is None else (bias,)), *more)
            and _native.isa() != "portable")


def _fused_ok(x: torch.Tensor, weight: torch.Tensor, bias) -> bool:
    return weight.shape[1] <= FUSED_MAX_OUT_PER_GROUP and _kernels_ok(x, weight, bias)


def _fused_grads_ok(x: torch.Tensor, dy: torch.Tensor, weight: torch.Tensor) -> bool:
    """May the backward compute dx and dW by io_dx / io_dw (FUSED_BACKWARD)?"""
    return (FUSED_BACKWARD and weight.shape[1] <= FUSED_GRAD_MAX_OUT_PER_GROUP and _native_ok(x, dy, weight)
            and _native.isa() != "portable")


def _io_native(x: torch.Tensor, weight: torch.Tensor, bias, small: bool = False, lowrank=None) -> torch.Tensor:
    """y (N, out) of the io block by one C call: io_forward (fused), or io_small (a few tokens);
    x (N, in) contiguous float32. ``lowrank`` (io_small only): (x unpermuted, A, B), all
    contiguous float32: the kernel adds the hybrid's low-rank term too."""
    n, i = x.shape
    g, oc, _ = weight.shape
    y = x.new_empty(n, g * oc)
    kernel = _native.io_small if small else _native.io_forward
    if lowrank is None:
        lr = ()
    else:
        x0, a, b = lowrank
        lr = (x0.data_ptr(), a.data_ptr(), b.data_ptr(), a.shape[0])
    kernel(x.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(), y.data_ptr(),
           n, i, g * oc, g, _threads(), *lr)
    return y


def _uninterleave_add(dx: torch.Tensor, d_mixed: torch.Tensor) -> torch.Tensor:
    """dx (N, in) += the un-interleave of d_mixed (g, N, c): ``dx[n, i*g + k] += d_mixed[k, n, i]``."""
    g, n, c = d_mixed.shape
    if _native_ok(dx, d_mixed):
        _native.uninterleave_add(d_mixed.data_ptr(), dx.data_ptr(), n, c, g, _threads())
        return dx
    dx.view(n, c, g).add_(d_mixed.permute(1, 2, 0))  # (g, N, c) -> (N, c, g)
    return dx


def _as_image(x: torch.Tensor) -> torch.Tensor:
    """(N, C) row-major -> the same memory as a channels-last (1, C, N, 1) image (no copy)."""
    n, ch = x.shape
    return x.view(1, n, 1, ch).permute(0, 3, 1, 2)  # (1, N, 1, C) -> (1, C, N, 1)


def _from_image(y: torch.Tensor) -> torch.Tensor:
    """Channels-last (1, C, N, 1) -> (N, C); free when the conv wrote channels-last."""
    return y.permute(0, 2, 3, 1).reshape(y.shape[2], y.shape[1])  # (1, C, N, 1) -> (1, N, 1, C) -> (N, C)


def _conv(x: torch.Tensor, weight: torch.Tensor, bias, groups: int) -> torch.Tensor:
    """Grouped linear map of (N, in) by weight (g, oc, k) as a 1x1 grouped convolution -> (N, g*oc)."""
    g, oc, k = weight.shape
    w4 = weight.reshape(g * oc, k, 1, 1)  # (g, oc, k) -> (out, k, 1, 1): a view
    return _from_image(torch.nn.functional.conv2d(_as_image(x), w4, bias, groups=groups))


_SCRATCH = threading.local()


def _scratch(shape: tuple[int, ...], like: torch.Tensor, name: str = "interleaved") -> torch.Tensor:
    """A reused buffer for a temporary that nothing keeps.

    A fresh multi-MB tensor on CPU is mmap-ed by the allocator and page-faulted on first write:
    for Phi-3's down_proj at 1024 tokens the 32 MB interleaved copy cost ~25 ms that way against
    ~9 ms written into memory already touched (docs/speed.md). One buffer per thread, device,
    dtype, inference-mode flag and ``name`` (callers that need two at once use two names), grown
    to the largest request; autograd never sees it.
    """
    key = (like.device, like.dtype, torch.is_inference_mode_enabled(), name)
    bufs = _SCRATCH.__dict__.setdefault("bufs", {})
    numel = math.prod(shape)
    buf = bufs.get(key)
    if buf is None or buf.numel() < numel:
        bufs[key] = buf = torch.empty(numel, device=like.device, dtype=like.dtype)
    return buf[:numel].view(shape)


def clear_scratch() -> None:
    """Free this thread's reusable buffers (they otherwise live as long as the thread)."""
    _SCRATCH.__dict__.pop("bufs", None)


def _eager_cpu(x: torch.Tensor) -> bool:
    """Eager CPU, outside torch.compile and CPU autocast: where the hand-written CPU paths (and
    the C kernels, which compute in the tensors' own float32) may run. Under autocast the block
    must follow autocast's dtype, so it takes the plain differentiable ops."""
    return x.is_cpu and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu")


def _needs_grad(x: torch.Tensor, weight: torch.Tensor, bias, *more: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
        or any(t.requires_grad for t in more)
    )


def _strided_out() -> bool:
    """Let ``bmm`` write straight into the (N, g, oc) layout of the result (no transposing copy)?

    Only single-threaded: ``bmm`` into a non-contiguous output runs one GEMM per group, and with
    several threads each of those GEMMs waits on every thread - on a loaded machine that
    collapsed by 3-20x. A contiguous (g, N, oc) result keeps MKL's one-call batched path and
    costs one copy of the output instead (docs/speed.md).
    """
    return torch.get_num_threads() == 1


def _io_bmm(x: torch.Tensor, weight: torch.Tensor, bias, xi: torch.Tensor) -> torch.Tensor:
    """io block as two batched GEMMs: x (N, in) contiguous, xi (N, g, c) its interleaved copy."""
    n, i = x.shape
    g, oc, _ = weight.shape
    c = i // g
    own = x.view(n, g, c).transpose(0, 1)  # (N, in) -> (N, g, c) -> (g, N, c): read in place
    w_own, w_mixed = weight[:, :, :c].transpose(1, 2), weight[:, :, c:].transpose(1, 2)  # (g, c, oc) each
    if _strided_out():
        y = x.new_empty(n, g * oc)
        yg = y.view(n, g, oc).transpose(0, 1)  # (N, out) -> (g, N, oc), a view: GEMMs write y itself
        torch.bmm(own, w_own, out=yg)
        yg.baddbmm_(xi.transpose(0, 1), w_mixed)  # += (g, N, c) @ (g, c, oc)
    else:  # (g, N, oc) into a reused buffer: a fresh one of qkv_proj's 38 MB page-faulted on every call
        yg = torch.bmm(own, w_own, out=_scratch((g, n, oc), x, "grouped_out"))  # contiguous
        yg.baddbmm_(xi.transpose(0, 1), w_mixed)
        y = x.new_empty(n, g * oc)  # always a copy: the buffer is reused by the next call
        y.view(n, g, oc).copy_(yg.transpose(0, 1))  # (g, N, oc) -> (N, g, oc)
    return y if bias is None else y.add_(bias)


class _IOBlockCPU(torch.autograd.Function):
    """The io block with a hand-written backward (CPU, many tokens, training).

    Autograd's backward of the same forward ops costs a scatter for the interleaved copy and
    transposing copies of GEMM operands; here every gradient is one batched GEMM reading its
    operands through strided views:

        dW[:, :, :c] = dY^T @ x_own        dW[:, :, c:] = dY^T @ x_interleaved
        dx_own       = dY @ W_own          dx          += un-interleave(dY @ W_mixed)

    where dY is the (g, N, oc) view of the (N, out) gradient. Saved: x only. The interleaved copy
    is rebuilt in the backward (one more interleave, ~1/8 of down_proj's backward GEMM time)
    rather than kept: keeping it doubled the block's activation memory, and a fresh 32 MB copy
    per call page-faults (docs/speed.md). Both the copy and ``dY @ W_mixed`` go into reused
    per-thread buffers.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        n, i = x.shape
        g = weight.shape[0]
        c = i // g
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        if _fused_ok(x, weight, bias):
            return _io_native(x, weight, bias)
        # nothing keeps the copy past this call, so it can live in the reused buffer
        return _io_bmm(x, weight, bias, _interleave_into(x, _scratch((n, g, c), x)))

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        n, i = x.shape
        g, oc, k = weight.shape
        c = i // g
        strided = _strided_out()
        dy_c = dy.contiguous()
        dyg = dy_c.view(n, g, oc).transpose(0, 1)  # (N, out) -> (g, N, oc), a view
        dx = dw = db = None
        fused = _fused_grads_ok(x, dy_c, weight)
        if ctx.needs_input_grad[0] and fused:
            dx = x.new_empty(n, i)  # the whole input gradient in one C call: no (g, N, c) intermediate
            _native.io_dx(dy_c.data_ptr(), weight.data_ptr(), dx.data_ptr(), n, i, g * oc, g, _threads())
        elif ctx.needs_input_grad[0]:
            if strided:
                dx = torch.empty_like(x)
                torch.bmm(dyg, weight[:, :, :c], out=dx.view(n, g, c).transpose(0, 1))  # written as (N, g, c)
            else:
                dx = torch.bmm(dyg, weight[:, :, :c]).transpose(0, 1).reshape(n, i)  # (g, N, c) -> (N, in)
            d_mixed = torch.bmm(dyg, weight[:, :, c:], out=_scratch((g, n, c), x, "d_mixed"))  # (g, N, oc) @ (g, oc, c)
            _uninterleave_add(dx, d_mixed)
        if ctx.needs_input_grad[1] and fused:
            dw = weight.new_empty(g, oc, k)  # both halves in one C call, from x and dY as they are
            _native.io_dw(x.data_ptr(), dy_c.data_ptr(), dw.data_ptr(), n, i, g * oc, g, _threads())
        elif ctx.needs_input_grad[1]:
            own = x.view(n, g, c).transpose(0, 1)  # (g, N, c)
            if oc <= _DW_CONTIGUOUS_MAX_OUT and _native_ok(x, dy_c):
                # both dW GEMMs on contiguous operands: dY^T as its own (g, oc, N) array and the
                # interleaved copy as (g, N, c) (see _DW_CONTIGUOUS_MAX_OUT).
                dyt = _scratch((g * oc, n), x, "dy_t")
                _native.interleave(dy_c.data_ptr(), dyt.data_ptr(), 1, n, g * oc)  # (N, out) -> (out, N), 1 thread
                dyt = dyt.view(g, oc, n)
                xi = _scratch((g, n, c), x)
                _native.interleave(x.data_ptr(), xi.data_ptr(), n, c, g, _threads(), True)  # (N, in) -> (g, N, c)
            else:
                dyt = dyg.transpose(1, 2)  # (g, oc, N)
                xi = _interleave_into(x, _scratch((n, g, c), x)).transpose(0, 1)  # (N, g, c) -> (g, N, c)
            if strided:
                dw = weight.new_empty(g, oc, k)
                torch.bmm(dyt, own, out=dw[:, :, :c])
                torch.bmm(dyt, xi, out=dw[:, :, c:])
            else:  # small: (g, oc, 2c) is the size of the weight
                dw = torch.cat([torch.bmm(dyt, own), torch.bmm(dyt, xi)], dim=2)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum(0)
        return dx, dw, db


def _io_many(x: torch.Tensor, weight: torch.Tensor, bias, groups: int) -> torch.Tensor:
    """io block for many tokens (see the notes above); ``x`` (N, in) already in the block's channel order."""
    n, i = x.shape
    g, oc, k = weight.shape
    c = i // g
    mixed = x.view(n, c, g).transpose(1, 2)  # (N, in) -> (N, c, g) -> (N, g, c): the interleaved groups, strided
    eager_cpu = _eager_cpu(x)
    if eager_cpu and _needs_grad(x, weight, bias):
        return _IOBlockCPU.apply(x, weight, bias)
    if eager_cpu and _fused_ok(x, weight, bias):
        return _io_native(x, weight, bias)
    if eager_cpu:  # inference: the interleaved copy goes into a reused buffer (nothing keeps it)
        return _io_bmm(x, weight, bias, _interleave_into(x, _scratch((n, g, c), x)))
    # plain differentiable ops, for torch.compile, autocast and other devices
    if i <= g * oc:
        return _conv(torch.cat([x.view(n, g, c), mixed], dim=2).view(n, g * k), weight, bias, groups)
    own_g = x.view(n, g, c).transpose(0, 1)  # (N, g, c) -> (g, N, c)
    xi_g = mixed.contiguous().transpose(0, 1)  # (g, N, c)
    w_own, w_mixed = weight[:, :, :c].transpose(1, 2), weight[:, :, c:].transpose(1, 2)  # (g, c, oc)
    y = torch.bmm(own_g, w_own) + torch.bmm(xi_g, w_mixed)  # (g, N, oc)
    y = y.transpose(0, 1).reshape(n, g * oc)  # (g, N, oc) -> (N, g, oc) -> (N, out)
    return y if bias is None else y + bias.to(y.dtype)  # under autocast y is already bf16/fp16


class _BmmWeightT(torch.autograd.Function):
    """``z @ W^T`` per group, z (g, N, k), W (g, oc, k) -> (g, N, oc), with the weight gradient
    computed as ``dY^T z``: a contiguous (g, oc, k) tensor that AccumulateGrad keeps as it is.
    Autograd's own backward of ``bmm(z, W.transpose(1, 2))`` returns the gradient transposed,
    and AccumulateGrad copies it into the parameter's layout: at one token that strided copy was
    most of a training step (Phi-3 gate_up_proj, Zen 4: 70 of 107 ms). Eager CPU only."""

    @staticmethod
    def forward(ctx, z, weight):
        ctx.save_for_backward(z, weight)
        return torch.bmm(z, weight.transpose(1, 2))  # (g, N, k) @ (g, k, oc) -> (g, N, oc)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        z, weight = ctx.saved_tensors
        dz = torch.bmm(dy, weight) if ctx.needs_input_grad[0] else None  # (g, N, oc) @ (g, oc, k)
        dw = torch.bmm(dy.transpose(1, 2), z) if ctx.needs_input_grad[1] else None  # (g, oc, N) @ (g, N, k)
        return dz, dw


def _bmm_wt(z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(g, N, k) @ (g, oc, k)^T -> (g, N, oc); training on eager CPU takes :class:`_BmmWeightT`."""
    if weight.requires_grad and torch.is_grad_enabled() and _eager_cpu(z):
        return _BmmWeightT.apply(z, weight)
    return torch.bmm(z, weight.transpose(1, 2))


def _io_gather(x: torch.Tensor, weight: torch.Tensor, bias, gather_index: torch.Tensor) -> torch.Tensor:
    """io block, small-N path: gather [own | interleaved] (input_perm included), one bmm."""
    n = x.shape[0]
    g, oc, k = weight.shape
    z = x.index_select(1, gather_index.view(-1)).view(n, g, k).transpose(0, 1)  # (N, g*2c) -> (g, N, 2c)
    y = _bmm_wt(z, weight)  # (g, N, 2c) @ (g, 2c, oc) -> (g, N, oc)
    y = y.transpose(0, 1).reshape(n, g * oc)  # (g, N, oc) -> (N, out)
    return y if bias is None else y + bias.to(y.dtype)  # under autocast y is already bf16/fp16


def _use_conv(x: torch.Tensor) -> bool:
    n = x.shape[0]
    return x.is_cpu and n > 0 and (n >= CONV_MIN_TOKENS or torch.compiler.is_compiling())


def _default_small_max_tokens(amd_avx512: bool) -> int:
    return 31 if amd_avx512 else 8  # (why: the docstring below)


NATIVE_SMALL_MAX_TOKENS = _default_small_max_tokens(_AMD_AVX512)
"""Inference, CPU float32, AVX-512 or AVX2: up to this many tokens (decode) the io block is one
``gpconv._native.io_small`` call; from :data:`FUSED_MIN_TOKENS` on (groups of at most
:data:`FUSED_MAX_OUT_PER_GROUP` outputs) one ``io_forward`` call. Set when gpconv loads: 31 on AMD
CPUs with AVX-512, 8 elsewhere. Measured, medians (docs/speed.md): AVX-512, 1 token, one thread,
SmolLM2 -m 64 shapes 3.3-10.7 us against 18.6-35.5 us for gather + bmm, Phi-3's 1.1-1.3x faster;
AVX2, tiny-phi3 / SmolLM2 -m 64 shapes, 0.65-0.80x the time of gather + bmm at 1 token and
0.52-0.75x at 4; on the Xeon and the Zen 3 EPYC gather + bmm was as fast or faster from 9
tokens on. On a Zen 4 EPYC io_small stayed ahead up to 31 tokens: one thread 0.54-0.92x on
SmolLM2's shapes, 0.69-1.13x on Phi-3's o_proj / down_proj; two threads 0.23-0.78x."""

FUSED_MIN_TOKENS = 32


def _native_inference(x, weight, bias, perm, lowrank=None):
    """The io block (with its low-rank term, if any) through one native call (inference only), or
    None where that is not the measured-faster choice or not possible here."""
    n = x.shape[0]
    small = n <= NATIVE_SMALL_MAX_TOKENS
    if not (small or (n >= FUSED_MIN_TOKENS and weight.shape[1] <= FUSED_MAX_OUT_PER_GROUP)):
        return None
    lr = () if lowrank is None else lowrank
    if not (FUSED_FORWARD and x.dtype == torch.float32 and n > 0 and _eager_cpu(x)) or _needs_grad(x, weight, bias, *lr):
        return None  # (checked before the permutation below costs a copy)
    x = x.contiguous()
    xp = x if perm is None else x.index_select(1, perm)  # the io part reads x[:, perm]; the low-rank term x
    if not _kernels_ok(xp, weight, bias, x, *lr):
        return None
    if small:  # io_small adds the low-rank term itself: two torch calls fewer per decode step
        return _io_native(xp, weight, bias, True, None if lowrank is None else (x, *lowrank))
    return _add_lowrank(_io_native(xp, weight, bias), x, lowrank)


def _add_lowrank(y: torch.Tensor, x: torch.Tensor, lowrank) -> torch.Tensor:
    """y + x A^T B^T: a hybrid block's low-rank term, ``lowrank`` = (A (r, in), B (out, r)) or None."""
    if lowrank is None:
        return y
    a, b = lowrank
    return torch.addmm(y, x @ a.t(), b.t())  # (N, in) -> (N, r) -> (N, out), accumulated onto y by one addmm


def io_forward(x, weight, bias, groups: int, gather_index=None, perm=None, lowrank=None) -> torch.Tensor:
    """``y`` (N, out) of an io block on ``x`` (N, in). ``perm``: the block reads ``x[:, perm]``;
    ``gather_index`` (g, 2c) must then include it. It is only read off the conv path, and may be
    given as a function returning it, called only where it is read. ``lowrank``: (A, B) of a
    hybrid block, whose term ``x A^T B^T`` (on x unpermuted) is added to y."""
    if _use_grouped_mm(x, weight):
        y = _io_grouped_mm(x, weight, bias, gather_index() if callable(gather_index) else gather_index)
        return _add_lowrank(y, x, lowrank)
    if NATIVE and _native is not None:
        y = _native_inference(x, weight, bias, perm, lowrank)
        if y is not None:
            return y
    if _use_conv(x) or gather_index is None:
        xp = x if perm is None else x.index_select(1, perm)
        return _add_lowrank(_io_many(xp.contiguous(), weight, bias, groups), x, lowrank)
    return _add_lowrank(_io_gather(x, weight, bias, gather_index() if callable(gather_index) else gather_index),
                        x, lowrank)


def grouped_forward(x, weight, bias, groups: int) -> torch.Tensor:
    """``y`` (N, out) of a block-diagonal map with weight (g, out/g, in/g) on ``x`` (N, in)."""
    if _use_conv(x):
        return _conv(x.contiguous(), weight, bias, groups)  # no copy at all: x is the image
    n = x.shape[0]
    g, oc, c = weight.shape
    x3 = x.reshape(n, g, c).transpose(0, 1)  # (N, in) -> (g, N, c)
    y = _bmm_wt(x3, weight)  # (g, N, c) @ (g, c, oc) -> (g, N, oc)
    y = y.transpose(0, 1).reshape(n, g * oc)  # (g, N, oc) -> (N, out)
    return y if bias is None else y + bias.to(y.dtype)  # under autocast y is already bf16/fp16


# -- CUDA bf16: torch's grouped GEMM ---------------------------------------------------------

CUDA_GROUPED_MM = True
"""Use ``torch.nn.functional.grouped_mm`` for io blocks on CUDA in bfloat16 (SM >= 8.0). Set to
False to use the bmm path there too. Not measured on a GPU yet (see docs/speed.md)."""

_CAPABILITY: dict = {}


def _use_grouped_mm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if not (CUDA_GROUPED_MM and x.is_cuda and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16):
        return False
    if torch.compiler.is_compiling() or not hasattr(torch.nn.functional, "grouped_mm"):
        return False
    g, oc, k = weight.shape
    if k % 8 or oc % 8:  # the kernels want 16-byte aligned rows
        return False
    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if dev not in _CAPABILITY:
        _CAPABILITY[dev] = torch.cuda.get_device_capability(dev)
    return _CAPABILITY[dev] >= (8, 0)


def _io_grouped_mm(x, weight, bias, gather_index):
    """io block through ``grouped_mm``: gather [own | interleaved] per group, one grouped GEMM."""
    n = x.shape[0]
    g, oc, k = weight.shape
    z = x.index_select(1, gather_index.view(-1))  # (N, in) -> (N, g*2c)
    z = z.view(n, g, k).transpose(0, 1).contiguous()  # (N, g, 2c) -> (g, N, 2c), row-major per group
    y = torch.nn.functional.grouped_mm(z, weight.transpose(1, 2))  # (g, N, 2c) @ (g, 2c, oc) -> (g, N, oc)
    y = y.transpose(0, 1).reshape(n, g * oc)  # (g, N, oc) -> (N, out)
    return y if bias is None else y + bias.to(y.dtype)  # under autocast y is already bf16/fp16


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
