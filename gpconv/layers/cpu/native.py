"""Tensor-level wrappers of the C extension ``gpconv.layers.cpu._native``: the only module that
hands raw pointers to C.

``_native.c`` is built by ``pip install`` when a C compiler is there (setup.py); without it
:data:`ext` is None and every caller takes its torch path. Each kernel has a torch equivalent
that gives the same result (tests/test_native.py). Arguments are float32 and contiguous; the
callers check that (:func:`gpconv.layers.cpu.dispatch.native_ok`).

Threads: the extension is built with -fopenmp where the compiler has it; loaded after torch,
whose libgomp.so.1 is already in the process, its parallel regions run on torch's own OpenMP
pool with torch.get_num_threads() threads. A build without OpenMP (``openmp == 0``) is used only
when torch runs one thread: its pthreads beside torch's spinning OpenMP workers measured slower
than torch alone (SmolLM2's prefill at two threads 1,155 -> 759 tokens/s).
"""

from __future__ import annotations

import torch

try:
    from . import _native as ext
except ImportError:  # built without a C compiler: the torch paths do the same work
    ext = None


def isa() -> str | None:
    """'avx512' | 'avx2' | 'portable' (which kernels run), None when the extension is not built."""
    return None if ext is None else ext.isa()


def threads() -> int:
    return torch.get_num_threads() if ext.openmp else 1


def interleave(x: torch.Tensor, out: torch.Tensor, grouped: bool = False, n_threads: int | None = None) -> torch.Tensor:
    """``out[n, k, i] = x[n, i*g + k]``: x (N, in) -> out (N, g, c), or (g, N, c) with ``grouped``."""
    if grouped:
        g, n, c = out.shape
    else:
        n, g, c = out.shape
    ext.interleave(x.data_ptr(), out.data_ptr(), n, c, g, threads() if n_threads is None else n_threads, grouped)
    return out


def transpose(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (M, N) <- x (N, M)^T, one thread (the interleave with a single token)."""
    n, m = x.shape
    ext.interleave(x.data_ptr(), out.data_ptr(), 1, n, m)
    return out


def uninterleave_add(d_mixed: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """dx (N, in) += the un-interleave of d_mixed (g, N, c): ``dx[n, i*g + k] += d_mixed[k, n, i]``."""
    g, n, c = d_mixed.shape
    ext.uninterleave_add(d_mixed.data_ptr(), dx.data_ptr(), n, c, g, threads())
    return dx


def io_forward(x: torch.Tensor, weight: torch.Tensor, bias, small: bool = False, lowrank=None) -> torch.Tensor:
    """y (N, out) of the io block by one C call: io_forward (fused), or io_small (a few tokens).
    ``lowrank`` (io_small only): (x unpermuted, A, B): the kernel adds the hybrid's low-rank term."""
    n, i = x.shape
    g, oc, _ = weight.shape
    y = x.new_empty(n, g * oc)
    kernel = ext.io_small if small else ext.io_forward
    if lowrank is None:
        lr = ()
    else:
        x0, a, b = lowrank
        lr = (x0.data_ptr(), a.data_ptr(), b.data_ptr(), a.shape[0])
    kernel(x.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(), y.data_ptr(),
           n, i, g * oc, g, threads(), *lr)
    return y


def io_dx(dy: torch.Tensor, weight: torch.Tensor, n_in: int) -> torch.Tensor:
    """The io block's input gradient (N, in) for dy (N, out), in one call."""
    n = dy.shape[0]
    g, oc, _ = weight.shape
    dx = dy.new_empty(n, n_in)
    ext.io_dx(dy.data_ptr(), weight.data_ptr(), dx.data_ptr(), n, n_in, g * oc, g, threads())
    return dx


def io_dw(x: torch.Tensor, dy: torch.Tensor, weight_shape: tuple[int, int, int]) -> torch.Tensor:
    """The io block's weight gradient (g, oc, 2c) for x (N, in) and dy (N, out), both halves at once."""
    n, i = x.shape
    g, oc, k = weight_shape
    dw = x.new_empty(g, oc, k)
    ext.io_dw(x.data_ptr(), dy.data_ptr(), dw.data_ptr(), n, i, g * oc, g, threads())
    return dw
