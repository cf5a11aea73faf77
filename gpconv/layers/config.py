"""Which kernel runs the io block: one frozen :class:`KernelConfig`, chosen for this machine
when gpconv loads, read (never written) by the dispatch on every call.

    from gpconv.layers import kernel_config, use_kernels
    kernel_config()                          # what runs now
    with use_kernels(native=False):          # the torch paths only, e.g. to compare
        model(ids)

Every setting changes speed, never results beyond float rounding: each kernel has a torch path
that computes the same map (tests/test_native.py, tests/test_speed_paths.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass

from ..system import cpu_vendor
from .cpu import native


@dataclass(frozen=True)
class KernelConfig:
    """Routing of the io block. The CPU-chosen defaults come from :meth:`for_cpu`."""

    native: bool = True
    """CPU float32: use the C kernels (``gpconv.layers.cpu._native``) where they apply. Off with
    GPCONV_NATIVE=0 in the environment; without a built extension it has no effect."""
    fused_forward: bool = True
    """AVX-512 / AVX2: run the io block's forward as one fused interleave + GEMM (io_forward) and
    decode steps as io_small, instead of an interleaved copy and two MKL GEMMs."""
    fused_backward: bool = True
    """AVX2 (AVX-512 CPUs run the same code): compute dx and dW by io_dx / io_dw (one C call each)
    instead of MKL GEMMs around an interleaved copy of x and a transposed dY."""
    fused_max_out_per_group: int = 192
    """The fused forward only for groups of at most this many outputs: it re-reads a 48-token
    slice of x once per output tile, so where MKL's blocking is stronger it loses on wide groups
    (AVX2 above ~192 outputs; on AMD's AVX-512 it won at every Phi-3 width up to 2048)."""
    fused_grad_max_out_per_group: int = 192
    """The gradient kernels only for groups of at most this many outputs (wider, MKL's GEMMs were
    as fast or faster)."""
    small_max_tokens: int = 8
    """Inference up to this many tokens (decode) is one io_small call (8 by default; 31 on AMD
    AVX-512, where it stayed ahead of gather + bmm up to 31 tokens)."""
    fused_min_tokens: int = 32
    """From this many tokens on, the fused forward (io_forward) may run."""
    conv_min_tokens: int = 128
    """CPU: from this many tokens on the many-token paths (batched GEMMs / grouped 1x1 conv);
    below it, a gather of [own | interleaved] inputs and one bmm (three ops: the fewest fixed costs)."""
    dw_contiguous_max_out: int = 192
    """When the gradient kernels do not run: for groups of up to this many outputs, both dW GEMMs
    get contiguous operands (a transposed dY and a (g, N, c) interleaved copy); through strided
    views MKL took ~2x as long on down_proj's."""
    triton: bool = True
    """CUDA (bfloat16, float16, float32): the io block's forward, input and weight gradients on the
    Triton kernels of ``gpconv.layers.cuda.triton_io`` (interleave folded into the loads, fp32
    accumulation), eager calls and torch.compile alike. No effect where triton is not installed
    (extra ``gpu``). False: the paths below (grouped_mm for bfloat16, else batched GEMMs)."""
    cuda_grouped_mm: bool = True
    """CUDA bfloat16 (SM >= 8.0), where the Triton kernels do not run: the io block through
    ``torch.nn.functional.grouped_mm``."""
    custom_ops: bool = True
    """Under torch.compile and torch.export the io block is one ``gpconv::io_block`` op, whose
    kernels (the C ones on a CPU) run inside the compiled graph. False: plain torch ops (a gather
    and a batched MatMul), which any exporter translates (what ONNX export uses)."""

    @classmethod
    def for_cpu(cls, isa: str | None, vendor: str) -> "KernelConfig":
        """The defaults for a CPU with C kernels of ``isa`` ('avx512', 'avx2', 'portable', None if
        not built) and vendor string ``vendor``. AMD's AVX-512 (Zen 4 and later) ran the fused
        forward faster than MKL's GEMMs at every group width measured, and io_small up to 31 tokens."""
        amd_avx512 = isa == "avx512" and vendor == "AuthenticAMD"
        return cls(fused_max_out_per_group=2048 if amd_avx512 else 192, small_max_tokens=31 if amd_avx512 else 8)

    @classmethod
    def detect(cls) -> "KernelConfig":
        """The defaults for this process's CPU (and the GPCONV_NATIVE environment variable)."""
        cfg = cls.for_cpu(native.isa(), cpu_vendor())
        return dataclasses.replace(cfg, native=os.environ.get("GPCONV_NATIVE", "1") != "0")


_ACTIVE = KernelConfig.detect()


def kernel_config() -> KernelConfig:
    """The routing in force now."""
    return _ACTIVE


def set_kernel_config(config: KernelConfig) -> KernelConfig:
    """Make ``config`` the routing from now on (process-wide); returns the previous one."""
    global _ACTIVE
    if not isinstance(config, KernelConfig):
        raise TypeError(f"expected a KernelConfig, got {type(config).__name__}")
    before, _ACTIVE = _ACTIVE, config
    return before


@contextlib.contextmanager
def use_kernels(**changes):
    """Change some routing settings inside a ``with`` block: ``use_kernels(native=False)``."""
    before = set_kernel_config(dataclasses.replace(_ACTIVE, **changes))
    try:
        yield _ACTIVE
    finally:
        set_kernel_config(before)


def native_status() -> str:
    """What the C kernels do in this process, in words (benchmarks print it next to their numbers)."""
    cfg = _ACTIVE
    if native.ext is None:
        return "not built (torch paths)"
    if not cfg.native:
        return "off (torch paths)"
    isa = native.isa()
    kernels = {"avx512": "fused forward + copies (AVX-512)", "avx2": "fused forward + copies (AVX2)",
               "portable": "copies only (no AVX2)"}[isa]
    threads = "OpenMP, torch's threads" if native.ext.openmp else "no OpenMP, used at 1 thread only"
    if isa == "portable" or not cfg.fused_forward:
        return f"on: {kernels}, {threads}"
    # the CPU-chosen routing limits, so that a benchmark's header says which paths its rows took
    return (f"on: {kernels}, {threads}, fused forward <= {cfg.fused_max_out_per_group} outputs/group, "
            f"decode kernel <= {cfg.small_max_tokens} tokens")
