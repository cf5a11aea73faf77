"""The grouped matmuls behind the layers, as functions of tensors.

On a 2-D input x (N, in) with g groups of c = in/g channels and weight (g, oc, K)::

    y[:, group j] = x[:, group j] @ W[j, :, :c].T                      (K = c: GroupedLinear)
                  + interleave(x)[:, group j] @ W[j, :, c:].T          (K = 2c: the io block)
                  + bias

:func:`io_forward` picks a path per call: the CUDA grouped GEMM (bfloat16), the eager CPU paths
of :mod:`gpconv.layers.cpu.dispatch` (C kernels, hand-written backward), or the plain
differentiable torch ops below, which torch.compile, autocast and every other device take and
which are the reference the faster paths are tested against. The Triton kernels on CUDA are
chosen one level up, by the block and the custom ops (:mod:`gpconv.layers.cuda.triton_route`).
"""

from __future__ import annotations

import torch

from . import config
from .cpu import dispatch
from .cuda import grouped_mm


def io_dense(weight: torch.Tensor, gather_index: torch.Tensor, in_features: int) -> torch.Tensor:
    """Dense ``(out, in)`` matrix of io-block weights ``(g, out/g, 2c)`` read through ``gather_index`` ``(g, 2c)``."""
    g, oc, _ = weight.shape
    dense = torch.zeros(g, oc, in_features, device=weight.device, dtype=weight.dtype)
    # G1 and G2 reach the same input channel where a group meets its own interleaved group;
    # scatter_add sums both contributions there.
    dense.scatter_add_(2, gather_index.to(weight.device)[:, None, :].expand_as(weight), weight)
    return dense.reshape(g * oc, in_features)


def add_lowrank(y: torch.Tensor, x: torch.Tensor, lowrank) -> torch.Tensor:
    """y + x A^T B^T: a hybrid block's low-rank term, ``lowrank`` = (A (r, in), B (out, r)) or None."""
    if lowrank is None:
        return y
    a, b = lowrank
    return torch.addmm(y, x @ a.t(), b.t())  # (N, in) -> (N, r) -> (N, out), accumulated onto y by one addmm


def _as_image(x: torch.Tensor) -> torch.Tensor:
    """(N, C) row-major -> the same memory as a channels-last (1, C, N, 1) image (no copy)."""
    n, ch = x.shape
    return x.view(1, n, 1, ch).permute(0, 3, 1, 2)  # (1, N, 1, C) -> (1, C, N, 1)


def _from_image(y: torch.Tensor) -> torch.Tensor:
    """Channels-last (1, C, N, 1) -> (N, C); free when the conv wrote channels-last."""
    return y.permute(0, 2, 3, 1).reshape(y.shape[2], y.shape[1])  # (1, C, N, 1) -> (1, N, 1, C) -> (N, C)


def conv(x: torch.Tensor, weight: torch.Tensor, bias, groups: int) -> torch.Tensor:
    """Grouped linear map of (N, in) by weight (g, oc, k) as a 1x1 grouped convolution -> (N, g*oc).

    x (N, in) row-major *is* a channels-last (1, in, N, 1) image, so GroupedLinear needs no copy
    at all; oneDNN re-packs the weight per call, which is why the io block's CPU path uses GEMMs."""
    g, oc, k = weight.shape
    w4 = weight.reshape(g * oc, k, 1, 1)  # (g, oc, k) -> (out, k, 1, 1): a view
    return _from_image(torch.nn.functional.conv2d(_as_image(x), w4, bias, groups=groups))


def use_conv(x: torch.Tensor) -> bool:
    """CPU with many tokens (or under torch.compile): the many-token paths instead of gather + bmm."""
    n = x.shape[0]
    return x.is_cpu and n > 0 and (n >= config.kernel_config().conv_min_tokens or torch.compiler.is_compiling())


def io_plain(x: torch.Tensor, weight: torch.Tensor, bias, groups: int) -> torch.Tensor:
    """The io block in plain differentiable ops; ``x`` (N, in) in the block's channel order."""
    n, i = x.shape
    g, oc, k = weight.shape
    c = i // g
    mixed = x.view(n, c, g).transpose(1, 2)  # (N, in) -> (N, c, g) -> (N, g, c): the interleaved groups, strided
    if i <= g * oc:
        return conv(torch.cat([x.view(n, g, c), mixed], dim=2).view(n, g * k), weight, bias, groups)
    own_g = x.view(n, g, c).transpose(0, 1)  # (N, g, c) -> (g, N, c)
    xi_g = mixed.contiguous().transpose(0, 1)  # (g, N, c)
    w_own, w_mixed = weight[:, :, :c].transpose(1, 2), weight[:, :, c:].transpose(1, 2)  # (g, c, oc)
    y = torch.bmm(own_g, w_own) + torch.bmm(xi_g, w_mixed)  # (g, N, oc)
    y = y.transpose(0, 1).reshape(n, g * oc)  # (g, N, oc) -> (N, g, oc) -> (N, out)
    return y if bias is None else y + bias.to(y.dtype)  # under autocast y is already bf16/fp16


def io_many(x: torch.Tensor, weight: torch.Tensor, bias, groups: int) -> torch.Tensor:
    """io block for many tokens; ``x`` (N, in) already in the block's channel order."""
    if dispatch.eager_cpu(x):
        return dispatch.io_many(x, weight, bias)
    return io_plain(x, weight, bias, groups)


def io_gather(x: torch.Tensor, weight: torch.Tensor, bias, gather_index: torch.Tensor) -> torch.Tensor:
    """io block, small-N path: gather [own | interleaved] (input_perm included), one bmm."""
    n = x.shape[0]
    g, oc, k = weight.shape
    z = x.index_select(1, gather_index.view(-1)).view(n, g, k).transpose(0, 1)  # (N, g*2c) -> (g, N, 2c)
    y = dispatch.bmm_wt(z, weight)  # (g, N, 2c) @ (g, 2c, oc) -> (g, N, oc)
    y = y.transpose(0, 1).reshape(n, g * oc)  # (g, N, oc) -> (N, out)
    return y if bias is None else y + bias.to(y.dtype)  # under autocast y is already bf16/fp16


def io_forward(x, weight, bias, groups: int, gather_index=None, perm=None, lowrank=None) -> torch.Tensor:
    """``y`` (N, out) of an io block on ``x`` (N, in). ``perm``: the block reads ``x[:, perm]``;
    ``gather_index`` (g, 2c) must then include it. It is only read off the conv path, and may be
    given as a function returning it, called only where it is read. ``lowrank``: (A, B) of a
    hybrid block, whose term ``x A^T B^T`` (on x unpermuted) is added to y."""
    if grouped_mm.usable(x, weight):
        y = grouped_mm.io_forward(x, weight, bias, gather_index() if callable(gather_index) else gather_index)
        return add_lowrank(y, x, lowrank)
    y = dispatch.native_inference(x, weight, bias, perm, lowrank)
    if y is not None:
        return y
    if use_conv(x) or gather_index is None:
        xp = x if perm is None else x.index_select(1, perm)
        return add_lowrank(io_many(xp.contiguous(), weight, bias, groups), x, lowrank)
    return add_lowrank(io_gather(x, weight, bias, gather_index() if callable(gather_index) else gather_index),
                       x, lowrank)


def grouped_forward(x, weight, bias, groups: int) -> torch.Tensor:
    """``y`` (N, out) of a block-diagonal map with weight (g, out/g, in/g) on ``x`` (N, in)."""
    if use_conv(x):
        return conv(x.contiguous(), weight, bias, groups)  # no copy at all: x is the image
    n = x.shape[0]
    g, oc, c = weight.shape
    x3 = x.reshape(n, g, c).transpose(0, 1)  # (N, in) -> (g, N, c)
    y = dispatch.bmm_wt(x3, weight)  # (g, N, c) @ (g, c, oc) -> (g, N, oc)
    y = y.transpose(0, 1).reshape(n, g * oc)  # (g, N, oc) -> (N, out)
    return y if bias is None else y + bias.to(y.dtype)  # under autocast y is already bf16/fp16
