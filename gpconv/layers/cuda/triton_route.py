"""When the io block runs on the Triton kernels of :mod:`.triton_io`.

triton is an optional dependency (extra ``gpu``): nothing here imports it. :func:`available`
only looks for the package, and :func:`kernels` imports the kernels module (and with it triton)
on the first call that runs a kernel, i.e. on the first CUDA call of a block.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from .. import config

DEVICES = ("cuda",)
"""Device types the kernels run on. tests/test_triton.py adds "cpu" to run them there under
TRITON_INTERPRET=1."""
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@functools.cache
def available() -> bool:
    """triton is installed (looked up once, not imported)."""
    return importlib.util.find_spec("triton") is not None


def kernels():
    """:mod:`gpconv.layers.cuda.triton_io`, imported on first use: importing it imports triton
    (optional, and about a second to import), which a CPU-only process never needs."""
    from . import triton_io  # why: it imports triton (optional, extra gpu) at its top; it imports nothing from gpconv

    return triton_io


def kernel_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The op's implementations: the Triton kernels may run on these tensors (a device of
    :data:`DEVICES`, one dtype of :data:`DTYPES` for both, switched on in the config)."""
    return (x.device.type in DEVICES and weight.device == x.device and x.dtype == weight.dtype
            and x.dtype in DTYPES and config.kernel_config().triton and available())


def eager_dtype(x: torch.Tensor, weight: torch.Tensor):
    """An eager block call: the dtype it computes in on the Triton kernels (autocast's where autocast
    is on, else the tensors' own), or None where they do not run. Under torch.compile the block
    calls the op itself, whose CUDA implementation runs them."""
    if x.device.type not in DEVICES or torch.compiler.is_compiling():
        return None
    if not (config.kernel_config().triton and available()):
        return None
    if torch.is_autocast_enabled(x.device.type) and x.dtype in DTYPES:  # autocast leaves float64 alone
        dtype = torch.get_autocast_dtype(x.device.type)
    else:
        dtype = x.dtype if x.dtype == weight.dtype else None
    return dtype if dtype in DTYPES else None
