"""CUDA bfloat16: the io block through ``torch.nn.functional.grouped_mm`` (one grouped GEMM over
a gathered [own | interleaved] input)."""

from __future__ import annotations

import torch

from .. import config

_CAPABILITY: dict = {}


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """bfloat16 on an SM >= 8.0 GPU, rows 16-byte aligned, eager, and switched on in the config."""
    if not (x.is_cuda and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16):
        return False
    if not config.kernel_config().cuda_grouped_mm:
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


def io_forward(x, weight, bias, gather_index):
    """io block through ``grouped_mm``: gather [own | interleaved] per group, one grouped GEMM."""
    n = x.shape[0]
    g, oc, k = weight.shape
    z = x.index_select(1, gather_index.view(-1))  # (N, in) -> (N, g*2c)
    z = z.view(n, g, k).transpose(0, 1).contiguous()  # (N, g, 2c) -> (g, N, 2c), row-major per group
    y = torch.nn.functional.grouped_mm(z, weight.transpose(1, 2))  # (g, N, 2c) @ (g, 2c, oc) -> (g, N, oc)
    y = y.transpose(0, 1).reshape(n, g * oc)  # (g, N, oc) -> (N, out)
    return y if bias is None else y + bias.to(y.dtype)  # under autocast y is already bf16/fp16
