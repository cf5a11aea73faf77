"""Eager CPU paths of the io block: which kernel a call takes, by token count, group width,
dtype and whether autograd records it (the routing limits are :class:`gpconv.layers.KernelConfig`'s).

On x (N, in) with g groups of c = in/g channels and weight (g, oc, 2c):

* **decode** (N <= ``small_max_tokens``, inference): one io_small call (C), the hybrid's
  low-rank term included.
* **many tokens, inference**: io_forward (C, one fused interleave + GEMM) for groups of at most
  ``fused_max_out_per_group`` outputs; otherwise two batched MKL GEMMs, one per half: the own
  half reads x in place through the (g, N, c) view, the interleaved half one copy of x into a
  reused buffer. Single-threaded the GEMMs write straight into the (N, out) result through a
  strided view; with several threads they write a contiguous (g, N, oc) result plus one
  transposing copy, because bmm into a strided output runs one multithreaded GEMM per group and
  each waits on every thread (3-20x slower on a loaded machine).
* **training**: :class:`IOBlockCPU`, a hand-written backward (io_dx / io_dw in C for narrow
  groups, batched GEMMs through strided views otherwise) instead of autograd's scatter and
  transposing copies.

Everything here runs in the tensors' own float32 outside torch.compile and autocast
(:func:`eager_cpu`); elsewhere the block takes the plain differentiable ops of
:mod:`gpconv.layers.functional`.
"""

from __future__ import annotations

import math
import threading

import torch
from torch.autograd.function import once_differentiable

from .. import config
from . import native


def eager_cpu(x: torch.Tensor) -> bool:
    """Eager CPU, outside torch.compile and CPU autocast: where the hand-written CPU paths (and
    the C kernels, which compute in the tensors' own float32) may run. Under autocast the block
    must follow autocast's dtype, so it takes the plain differentiable ops."""
    return x.is_cpu and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu")


def needs_grad(x: torch.Tensor, weight: torch.Tensor, bias, *more: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
        or any(t.requires_grad for t in more)
    )


def native_ok(*ts: torch.Tensor) -> bool:
    """May the C extension run on these tensors (float32, contiguous, CPU) in this process?"""
    cfg = config.kernel_config()
    if not (cfg.native and native.ext is not None and (torch.get_num_threads() == 1 or native.ext.openmp)
            and not torch.compiler.is_compiling()):
        return False
    for t in ts:  # (a loop, not all(<generator>): this runs on every decode call of every block)
        if not t.is_cpu or t.dtype != torch.float32 or not t.is_contiguous():  # (is_cpu: 0.08 us, device.type 0.35)
            return False
    return True


def kernels_ok(x: torch.Tensor, weight: torch.Tensor, bias, *more: torch.Tensor) -> bool:
    """May the block kernels (io_forward, io_small; AVX-512 or AVX2) run on these tensors?"""
    return (config.kernel_config().fused_forward and native_ok(x, weight, *(() if bias is None else (bias,)), *more)
            and native.isa() != "portable")


def fused_ok(x: torch.Tensor, weight: torch.Tensor, bias) -> bool:
    return weight.shape[1] <= config.kernel_config().fused_max_out_per_group and kernels_ok(x, weight, bias)


def fused_grads_ok(x: torch.Tensor, dy: torch.Tensor, weight: torch.Tensor) -> bool:
    """May the backward compute dx and dW by io_dx / io_dw?"""
    cfg = config.kernel_config()
    return (cfg.fused_backward and weight.shape[1] <= cfg.fused_grad_max_out_per_group and native_ok(x, dy, weight)
            and native.isa() != "portable")


# -- reused buffers ----------------------------------------------------------------------------

_SCRATCH = threading.local()


def scratch(shape: tuple[int, ...], like: torch.Tensor, name: str = "interleaved") -> torch.Tensor:
    """A reused buffer for a temporary that nothing keeps.

    A fresh multi-MB tensor on CPU is mmap-ed by the allocator and page-faulted on first write:
    for Phi-3's down_proj at 1024 tokens the 32 MB interleaved copy cost ~25 ms that way against
    ~9 ms written into memory already touched. One buffer per thread, device, dtype,
    inference-mode flag and ``name`` (callers that need two at once use two names), grown to the
    largest request; autograd never sees it.
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


# -- the pieces --------------------------------------------------------------------------------


def interleave_into(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (N, g, c) <- the interleave of x (N, in): ``out[n, k, i] = x[n, i*g + k]``.

    torch runs ``x.view(N, c, g).transpose(1, 2).contiguous()`` as a strided elementwise copy (one
    scalar load per float at a stride of g floats, ~3x a plain copy); the C kernel transposes each
    token in 16 x 16 (AVX-512) or 8 x 8 (AVX2) register tiles, near plain-copy speed."""
    n, g, c = out.shape
    if native_ok(x, out):
        return native.interleave(x, out)
    return out.copy_(x.view(n, c, g).transpose(1, 2))  # (N, in) -> (N, c, g) -> (N, g, c)


def uninterleave_add(dx: torch.Tensor, d_mixed: torch.Tensor) -> torch.Tensor:
    """dx (N, in) += the un-interleave of d_mixed (g, N, c): ``dx[n, i*g + k] += d_mixed[k, n, i]``."""
    g, n, c = d_mixed.shape
    if native_ok(dx, d_mixed):
        return native.uninterleave_add(d_mixed, dx)
    dx.view(n, c, g).add_(d_mixed.permute(1, 2, 0))  # (g, N, c) -> (N, c, g)
    return dx


def strided_out() -> bool:
    """Let ``bmm`` write straight into the (N, g, oc) layout of the result (no transposing copy)?

    Only single-threaded: ``bmm`` into a non-contiguous output runs one GEMM per group, and with
    several threads each of those GEMMs waits on every thread - on a loaded machine that
    collapsed by 3-20x. A contiguous (g, N, oc) result keeps MKL's one-call batched path and
    costs one copy of the output instead.
    """
    return torch.get_num_threads() == 1


def io_bmm(x: torch.Tensor, weight: torch.Tensor, bias, xi: torch.Tensor) -> torch.Tensor:
    """io block as two batched GEMMs: x (N, in) contiguous, xi (N, g, c) its interleaved copy."""
    n, i = x.shape
    g, oc, _ = weight.shape
    c = i // g
    own = x.view(n, g, c).transpose(0, 1)  # (N, in) -> (N, g, c) -> (g, N, c): read in place
    w_own, w_mixed = weight[:, :, :c].transpose(1, 2), weight[:, :, c:].transpose(1, 2)  # (g, c, oc) each
    if strided_out():
        y = x.new_empty(n, g * oc)
        yg = y.view(n, g, oc).transpose(0, 1)  # (N, out) -> (g, N, oc), a view: GEMMs write y itself
        torch.bmm(own, w_own, out=yg)
        yg.baddbmm_(xi.transpose(0, 1), w_mixed)  # += (g, N, c) @ (g, c, oc)
    else:  # (g, N, oc) into a reused buffer: a fresh one of qkv_proj's 38 MB page-faulted on every call
        yg = torch.bmm(own, w_own, out=scratch((g, n, oc), x, "grouped_out"))  # contiguous
        yg.baddbmm_(xi.transpose(0, 1), w_mixed)
        y = x.new_empty(n, g * oc)  # always a copy: the buffer is reused by the next call
        y.view(n, g, oc).copy_(yg.transpose(0, 1))  # (g, N, oc) -> (N, g, oc)
    return y if bias is None else y.add_(bias)


def io_bmm_scratch(x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """:func:`io_bmm` with the interleaved copy in the reused buffer (nothing keeps it past the call)."""
    n, i = x.shape
    g = weight.shape[0]
    return io_bmm(x, weight, bias, interleave_into(x, scratch((n, g, i // g), x)))


class IOBlockCPU(torch.autograd.Function):
    """The io block with a hand-written backward (CPU, many tokens, training).

    Every gradient is one batched GEMM reading its operands through strided views:

        dW[:, :, :c] = dY^T @ x_own        dW[:, :, c:] = dY^T @ x_interleaved
        dx_own       = dY @ W_own          dx          += un-interleave(dY @ W_mixed)

    where dY is the (g, N, oc) view of the (N, out) gradient; for narrow groups io_dx / io_dw
    compute dx and dW in one C call each. Saved: x only. The interleaved copy is rebuilt in the
    backward (~1/8 of down_proj's backward GEMM time) rather than kept: keeping it doubled the
    block's activation memory, and a fresh 32 MB copy per call page-faults.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        if fused_ok(x, weight, bias):
            return native.io_forward(x, weight, bias)
        return io_bmm_scratch(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx, dw = io_grads(x, weight, dy, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        db = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def io_grads(x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor, want_dx: bool, want_dw: bool):
    """``(dx, dW)`` of the io block (None where not wanted), x (N, in) in the block's channel order."""
    n, i = x.shape
    g, oc, k = weight.shape
    c = i // g
    strided = strided_out()
    cfg = config.kernel_config()
    dy_c = dy.contiguous()
    dyg = dy_c.view(n, g, oc).transpose(0, 1)  # (N, out) -> (g, N, oc), a view
    dx = dw = None
    fused = fused_grads_ok(x, dy_c, weight)
    if want_dx and fused:
        dx = native.io_dx(dy_c, weight, i)  # the whole input gradient in one C call: no (g, N, c) intermediate
    elif want_dx:
        if strided:
            dx = torch.empty_like(x)
            torch.bmm(dyg, weight[:, :, :c], out=dx.view(n, g, c).transpose(0, 1))  # written as (N, g, c)
        else:
            dx = torch.bmm(dyg, weight[:, :, :c]).transpose(0, 1).reshape(n, i)  # (g, N, c) -> (N, in)
        d_mixed = torch.bmm(dyg, weight[:, :, c:], out=scratch((g, n, c), x, "d_mixed"))  # (g, N, oc) @ (g, oc, c)
        uninterleave_add(dx, d_mixed)
    if want_dw and fused:
        dw = native.io_dw(x, dy_c, (g, oc, k))  # both halves in one C call, from x and dY as they are
    elif want_dw:
        own = x.view(n, g, c).transpose(0, 1)  # (g, N, c)
        if oc <= cfg.dw_contiguous_max_out and native_ok(x, dy_c):
            # both dW GEMMs on contiguous operands: dY^T as its own (g, oc, N) array and the
            # interleaved copy as (g, N, c)
            dyt = native.transpose(dy_c, scratch((g * oc, n), x, "dy_t")).view(g, oc, n)  # (N, out) -> (out, N)
            xi = native.interleave(x, scratch((g, n, c), x), grouped=True)  # (N, in) -> (g, N, c)
        else:
            dyt = dyg.transpose(1, 2)  # (g, oc, N)
            xi = interleave_into(x, scratch((n, g, c), x)).transpose(0, 1)  # (N, g, c) -> (g, N, c)
        if strided:
            dw = weight.new_empty(g, oc, k)
            torch.bmm(dyt, own, out=dw[:, :, :c])
            torch.bmm(dyt, xi, out=dw[:, :, c:])
        else:  # small: (g, oc, 2c) is the size of the weight
            dw = torch.cat([torch.bmm(dyt, own), torch.bmm(dyt, xi)], dim=2)
    return dx, dw


def io_many(x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """Eager CPU io block for many tokens; ``x`` (N, in) contiguous, in the block's channel order."""
    if needs_grad(x, weight, bias):
        return IOBlockCPU.apply(x, weight, bias)
    if fused_ok(x, weight, bias):
        return native.io_forward(x, weight, bias)
    return io_bmm_scratch(x, weight, bias)  # inference: the interleaved copy goes into a reused buffer


class BmmWeightT(torch.autograd.Function):
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


def bmm_wt(z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(g, N, k) @ (g, oc, k)^T -> (g, N, oc); training on eager CPU takes :class:`BmmWeightT`."""
    if weight.requires_grad and torch.is_grad_enabled() and eager_cpu(z):
        return BmmWeightT.apply(z, weight)
    return torch.bmm(z, weight.transpose(1, 2))


def native_inference(x, weight, bias, perm, lowrank=None):
    """The io block (with its low-rank term, if any) through one C call (inference only), or
    None where that is not the measured-faster choice or not possible here."""
    cfg = config.kernel_config()
    if not cfg.native or native.ext is None:
        return None
    n = x.shape[0]
    small = n <= cfg.small_max_tokens
    if not (small or (n >= cfg.fused_min_tokens and weight.shape[1] <= cfg.fused_max_out_per_group)):
        return None
    lr = () if lowrank is None else lowrank
    if not (cfg.fused_forward and x.dtype == torch.float32 and n > 0 and eager_cpu(x)) or needs_grad(x, weight, bias, *lr):
        return None  # (checked before the permutation below costs a copy)
    x = x.contiguous()
    xp = x if perm is None else x.index_select(1, perm)  # the io part reads x[:, perm]; the low-rank term x
    if not kernels_ok(xp, weight, bias, x, *lr):
        return None
    if small:  # io_small adds the low-rank term itself: two torch calls fewer per decode step
        return native.io_forward(xp, weight, bias, True, None if lowrank is None else (x, *lowrank))
    y = native.io_forward(xp, weight, bias)
    if lowrank is None:
        return y
    a, b = lowrank
    return torch.addmm(y, x @ a.t(), b.t())  # (N, in) -> (N, r) -> (N, out), accumulated onto y by one addmm
