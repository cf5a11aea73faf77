"""The io / hybrid block as torch custom ops, so that torch.compile and torch.export see one
opaque operator (with its shapes known from a fake implementation) instead of tracing into the
C kernels' raw pointers.

    gpconv::io_block(x, weight, bias?, perm?, lowrank_a?, lowrank_b?) -> y
        x (N, in), weight (g, out/g, 2*in/g) -> y (N, out): G1(x[perm]) + G2(interleave(x[perm]))
        + bias, plus (x A^T) B^T for a hybrid block (on x unpermuted)
    gpconv::io_grouped_grads(dy, xp, weight) -> (dxp, dweight)
        the grouped part's gradients, on xp = x[:, perm]

On CUDA (where triton is installed and ``KernelConfig.triton`` is on) both ops run the Triton
kernels of :mod:`gpconv.layers.cuda.triton_io`, registered as their CUDA implementation
(``register_kernel("cuda")``). Elsewhere the forward op runs
:func:`gpconv.layers.functional.io_forward` (on the CPU the C kernels where they apply, on CUDA
bf16 the grouped GEMM). The backward is written in torch ops around ``io_grouped_grads``, so
AOTAutograd traces it.

Eager CPU calls do not go through the ops (a 1-token decode step costs ~30 us of Python around a
~5 us kernel, and the dispatcher would add to it): :class:`gpconv.layers.GroupedPointwiseBlock`
calls them while torch.compile or torch.export trace it, and on eager calls that take the Triton
kernels with autograd on (the op's autograd runs the Triton gradients). Both paths run the same
functions.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import Tensor

from . import functional
from .cpu import dispatch
from .cuda import triton_route
from .grouping import interleave_index

_GATHER: dict = {}


def gather_index(n_in: int, groups: int, perm: Optional[Tensor], device) -> Tensor:
    """The io block's ``(g, 2c)`` input channels [own group | interleaved group], through ``perm``;
    cached per shape, device and permutation version (eager code: the ops' implementations)."""
    key = (n_in, groups, str(device), None if perm is None else (perm.data_ptr(), perm._version))
    hit = _GATHER.get(key)
    # a freed permutation's memory may hold the next model's, at version 0 again: an entry counts
    # only for the very tensor it was built from
    if hit is not None and (perm is None or hit[0]() is perm):
        return hit[1]
    if len(_GATHER) > 256:  # models come and go; the cache must not grow without bound
        _GATHER.clear()
    idx = traced_gather_index(n_in, groups, perm).to(device)
    _GATHER[key] = (None if perm is None else weakref.ref(perm), idx)
    return idx


def traced_gather_index(n_in: int, groups: int, perm: Optional[Tensor]) -> Tensor:
    """:func:`gather_index` in plain ops (what the reference path traces into an exported graph)."""
    c = n_in // groups
    own = torch.arange(n_in).view(groups, c)
    mixed = interleave_index(n_in, groups).view(groups, c)
    idx = torch.cat([own, mixed], dim=1)  # (g, c) + (g, c) -> (g, 2c)
    return idx if perm is None else perm[idx.to(perm.device)]


def io_block_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], perm: Optional[Tensor],
                  lowrank_a: Optional[Tensor], lowrank_b: Optional[Tensor]) -> Tensor:
    """What ``gpconv::io_block`` computes, on every device (eager inference calls it directly)."""
    groups = weight.shape[0]
    lowrank = None if lowrank_a is None else (lowrank_a, lowrank_b)
    with torch.no_grad():  # the op's autograd is registered below: no graph inside it
        if triton_route.kernel_ok(x, weight):  # the grouped part in one Triton launch, the low-rank term by addmm
            y = functional.add_lowrank(triton_route.kernels().io_forward(x, weight, bias, perm), x, lowrank)
        else:
            y = functional.io_forward(x, weight, bias, groups,
                                      lambda: gather_index(x.shape[1], groups, perm, x.device), perm, lowrank)
    return y if y.is_contiguous() else y.contiguous()


@torch.library.custom_op("gpconv::io_block", mutates_args=())
def io_block(x: Tensor, weight: Tensor, bias: Optional[Tensor], perm: Optional[Tensor],
             lowrank_a: Optional[Tensor], lowrank_b: Optional[Tensor]) -> Tensor:
    return io_block_impl(x, weight, bias, perm, lowrank_a, lowrank_b)


@io_block.register_fake
def _(x, weight, bias, perm, lowrank_a, lowrank_b):
    g, oc, _ = weight.shape
    return x.new_empty(x.shape[0], g * oc)


def io_grouped_grads_impl(dy: Tensor, xp: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """What ``gpconv::io_grouped_grads`` computes, on every device."""
    if triton_route.kernel_ok(xp, weight) and dy.dtype == xp.dtype:
        return triton_route.kernels().io_grads(dy, xp, weight)  # dx in two launches, dW in one
    dxp, dw = dispatch.io_grads(xp.contiguous(), weight.contiguous(), dy, True, True)
    return dxp.contiguous(), dw.contiguous()


@torch.library.custom_op("gpconv::io_grouped_grads", mutates_args=())
def io_grouped_grads(dy: Tensor, xp: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    return io_grouped_grads_impl(dy, xp, weight)


if triton_route.available():  # triton is optional: without it CUDA takes the ops' default implementations
    # the Triton path as the ops' CUDA kernels: the dispatcher (and torch.compile's graphs) call them
    # for CUDA tensors; each still falls back to the default path where kernel_ok says no
    io_block.register_kernel("cuda")(io_block_impl)
    io_grouped_grads.register_kernel("cuda")(io_grouped_grads_impl)


@io_grouped_grads.register_fake
def _(dy, xp, weight):
    return xp.new_empty(xp.shape), weight.new_empty(weight.shape)


def _setup(ctx, inputs, output):
    x, weight, bias, perm, a, b = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, perm, a, b)


def _backward(ctx, dy):
    x, weight, perm, a, b = ctx.saved_tensors
    xp = x if perm is None else x.index_select(1, perm)
    dxp, dw = torch.ops.gpconv.io_grouped_grads(dy, xp, weight)
    # x[:, perm] fed the grouped part: its gradient goes back to the columns it came from
    dx = dxp if perm is None else torch.zeros_like(x).index_copy(1, perm, dxp)
    da = db = None
    if a is not None:
        t = dy @ b  # (N, out) @ (out, r) -> (N, r)
        dx = dx + t @ a  # (N, r) @ (r, in)
        da = t.t() @ x  # (r, N) @ (N, in)
        db = dy.t() @ (x @ a.t())  # (out, N) @ (N, r)
    dbias = dy.sum(0) if ctx.has_bias else None
    return dx, dw, dbias, None, da, db


io_block.register_autograd(_backward, setup_context=_setup)


def io_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], perm: Optional[Tensor] = None,
                 lowrank=None) -> Tensor:
    """The io block in plain torch ops that any exporter can translate (what ONNX export traces,
    ``use_kernels(custom_ops=False)``): two batched MatMuls, one on the own groups
    ``x.view(N, g, c)``, one on the interleaved groups ``x.view(N, c, g)``, both read through
    transposes (no gather: ONNX Runtime ran a Gather on the channel axis at 1.2-2.5x the time of
    the whole two-MatMul block); a permuted block first gathers ``x[:, perm]``; the low-rank term
    is two more MatMuls."""
    n, i = x.shape
    g, oc, k = weight.shape
    c = k // 2
    xp = x if perm is None else x.index_select(1, perm)
    own = xp.reshape(n, g, c).transpose(0, 1)  # (N, in) -> (N, g, c) -> (g, N, c)
    mixed = xp.reshape(n, c, g).permute(2, 0, 1)  # (N, in) -> (N, c, g) -> (g, N, c): interleaved group j
    y = torch.bmm(own, weight[:, :, :c].transpose(1, 2)) + torch.bmm(mixed, weight[:, :, c:].transpose(1, 2))  # (g, N, oc)
    y = y.transpose(0, 1).reshape(n, g * oc)  # (g, N, oc) -> (N, g, oc) -> (N, out)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return functional.add_lowrank(y, x, lowrank)
