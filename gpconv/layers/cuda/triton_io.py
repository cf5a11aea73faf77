"""Triton kernels for the io block: forward, input gradient and weight gradient, with the channel
interleave (and a block's input permutation) folded into the operand loads.

Notation (as in :mod:`gpconv.layers.functional`): x (N, in), g groups of c = in/g channels, weight
(g, oc, 2c) with ``weight[j, :, :c]`` on group j's own inputs ``x[:, j*c + t]`` and
``weight[j, :, c:]`` on its interleaved inputs ``x[:, t*g + j]`` (t = 0..c-1); a permuted block
reads ``xp = x[:, perm]`` instead of x. Every kernel accumulates in float32 and stores in the
output's dtype (bfloat16, float16 or float32; float32 dots follow torch's matmul precision: TF32
unless ``torch.get_float32_matmul_precision() == "highest"``).

Importing this module imports triton (an optional dependency, extra ``gpu``): gpconv imports it
only through :func:`gpconv.layers.cuda.triton_route.kernels`, i.e. on the first call that runs it.
It imports nothing from gpconv, so that tests can load a second copy of it under
``TRITON_INTERPRET=1`` (tests/test_triton.py).

The kernels use triton's builtins only (tl.full, not tl.zeros; no tl.cdiv): those two are jit
functions of triton's own library, decorated when triton is imported, and would not run under an
interpreter switched on after that (how tests/test_triton.py loads its copy).

Tile sizes are autotuned per shape (a handful of GPU configs, keyed on the token-count bucket,
oc, c and g; triton caches the winner in the process, and on disk with TRITON_CACHE_AUTOTUNING=1).
Under the interpreter there is one small config, so nothing is benchmarked there.
"""

from __future__ import annotations

import inspect
import os

import torch
import triton
import triton.language as tl
import triton.testing

try:  # read when the kernels below are decorated, as triton does
    from triton import knobs

    INTERPRET = bool(knobs.runtime.interpret)
except ImportError:  # triton < 3.4 reads the variable itself
    INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE = os.environ.get("GPCONV_TRITON_AUTOTUNE", "1") != "0"
"""False (GPCONV_TRITON_AUTOTUNE=0 when this module is imported): the first config of each list
only - one compile per kernel variant instead of one per config (test runs, quick checks)."""


def _configs(shapes):
    """``(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)`` rows -> triton configs; one small config
    under the interpreter (every config would be run, on the CPU, to pick one)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in (shapes if AUTOTUNE else shapes[:1])]


# Forward and dx: M = tokens, N = outputs (dx: inputs), K = the reduction. The 16/32-row tiles are
# for decode and short prompts, where a 128-row tile would be mostly masked.
_GEMM_SHAPES = [(128, 128, 32, 4, 4), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 64, 4, 3),
                (128, 256, 32, 8, 3), (32, 64, 64, 4, 4), (16, 64, 128, 4, 3)]
# dW: M = outputs of a group, N = input channels of a half, K = tokens (long: deeper K tiles).
_DW_SHAPES = [(64, 64, 64, 4, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (128, 128, 32, 8, 3),
              (32, 64, 128, 4, 3)]


def _prune(configs, named_args, **kwargs):
    """Drop token tiles far larger than the token count (a 1-token decode step gains nothing from
    benchmarking 128-row tiles); always keep the smallest."""
    n = named_args["n_bucket"]
    kept = [cfg for cfg in configs if cfg.kwargs["BLOCK_M"] <= max(32, n)]
    return kept or [min(configs, key=lambda cfg: cfg.kwargs["BLOCK_M"])]


def _bench(fn, quantiles):
    """Autotuning's timer: 5 ms of warm-up and 25 ms of runs per config (triton's defaults, 25 and
    100 ms, made the first call of each new shape cost seconds)."""
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


# the shorter timer where this triton's autotune takes one (3.9 does; older ones time with their defaults)
_TUNE = {"do_bench": _bench} if "do_bench" in inspect.signature(triton.autotune).parameters else {}


def _bucket(n: int) -> int:
    """Token counts keyed by power of two: autotuning once per bucket, not once per length (and the
    kernels are not specialized on n either, ``do_not_specialize``: one compile serves every length)."""
    return 1 << max(4, (n - 1).bit_length())


def precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision for float32 operands, following torch's matmul setting;
    "upcast" where the interpreter cannot multiply the dtype itself (see :func:`_dot`)."""
    if INTERPRET and dtype == torch.bfloat16:
        return "upcast"
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"  # ignored for bfloat16 / float16 operands


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b in fp32. "upcast": the operands go to fp32 first - only under the interpreter,
    whose tl.dot on bfloat16 returns garbage in triton 3.9 (numpy has no bfloat16); products of
    bfloat16 numbers are exact in fp32, so this is the GPU's bf16 MMA with fp32 accumulation."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _group_tile(pid, g, cols, BLOCK: tl.constexpr):
    """A program id -> (group, tile of ``cols`` columns, what is left): groups run fastest, so
    that the g programs of one tile run side by side and share their strided reads of x in L2."""
    rest = pid // g
    n_tiles = (cols + BLOCK - 1) // BLOCK
    return pid % g, rest % n_tiles, rest // n_tiles


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------


@triton.autotune(configs=_configs(_GEMM_SHAPES), key=["n_bucket", "oc", "c", "g"],
                 prune_configs_by={"early_config_prune": _prune} if not INTERPRET else None, **_TUNE)
@triton.jit(do_not_specialize=["n", "n_bucket"])
def _io_forward_kernel(x_ptr, perm_ptr, w_ptr, b_ptr, y_ptr, n, c, oc, g, n_bucket, stride_xn, stride_yn,
                       HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[m, j*oc + o] = sum_t x[m, j*c + t] W[j, o, t] + sum_t x[m, t*g + j] W[j, o, c + t] (+ b).

    One program: a BLOCK_M x BLOCK_N tile of group j's outputs. Per K step it loads two
    BLOCK_M x BLOCK_K tiles of x (own columns, contiguous; interleaved columns, stride g) and the
    two matching BLOCK_K x BLOCK_N tiles of W[j]^T, and adds both dots into one fp32 accumulator:
    no gathered copy of x, one launch. Columns go through perm when the block has one.

    The program id runs over groups fastest: the g programs of one (token tile, output tile) are
    scheduled together, and the interleaved loads of all of them together read every column of
    the same x rows, so the stride-g loads of one program hit the L2 lines its neighbours bring
    in (an x row tile is read from DRAM about once, not once per group). Each strided load still
    moves a 32-byte sector per element from L2 (for g * itemsize >= 32): the interleaved operand
    costs up to g times its size in L2 traffic. Loading it contiguously would take a program
    that computes several consecutive groups at once (a batched 3-D dot over a
    (groups, tokens, channels) tile whose innermost axis is the group); not done yet.
    """
    j, pid_n, pid_m = _group_tile(tl.program_id(0), g, oc, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < n, rn < oc
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xn  # (BLOCK_M, 1): int64, N * in may pass 2^31
    w_cols = w_ptr + (j * oc + rn)[None, :] * (2 * c)  # (1, BLOCK_N): row o of W[j] starts here
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, c, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < c
        own, mixed = j * c + kk, kk * g + j  # input columns of the two halves
        if HAS_PERM:  # the block reads xp = x[:, perm]
            own = tl.load(perm_ptr + own, mask=k_ok, other=0)
            mixed = tl.load(perm_ptr + mixed, mask=k_ok, other=0)
        a_ok = m_ok[:, None] & k_ok[None, :]
        a_own = tl.load(x_rows + own[None, :], mask=a_ok, other=0.0)
        a_mixed = tl.load(x_rows + mixed[None, :], mask=a_ok, other=0.0)
        w_ok = k_ok[:, None] & n_ok[None, :]
        w_own = tl.load(w_cols + kk[:, None], mask=w_ok, other=0.0)  # (BLOCK_K, BLOCK_N) of W[j, :, :c]^T
        w_mixed = tl.load(w_cols + (c + kk)[:, None], mask=w_ok, other=0.0)  # ... of W[j, :, c:]^T
        acc = _dot(a_own, w_own, acc, PRECISION)
        acc = _dot(a_mixed, w_mixed, acc, PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + j * oc + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + rm.to(tl.int64)[:, None] * stride_yn + (j * oc + rn)[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def io_forward(x: torch.Tensor, weight: torch.Tensor, bias=None, perm=None) -> torch.Tensor:
    """The grouped part of the io block, ``y`` (N, out) of ``x`` (N, in) (read through ``perm``),
    plus ``bias``; in x's dtype."""
    n, _ = x.shape
    g, oc, k = weight.shape
    c = k // 2
    x = x if x.stride(1) == 1 else x.contiguous()  # rows may be strided, columns not
    w = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    perm = None if perm is None else perm.contiguous()
    y = torch.empty(n, g * oc, device=x.device, dtype=x.dtype)
    if n == 0:
        return y

    def grid(meta):  # 1-D: groups fastest, then output tiles, then token tiles (see the kernel)
        return (g * triton.cdiv(oc, meta["BLOCK_N"]) * triton.cdiv(n, meta["BLOCK_M"]),)

    _io_forward_kernel[grid](x, x if perm is None else perm, w, w if bias is None else bias, y, n, c, oc, g,
                             _bucket(n), x.stride(0), y.stride(0), HAS_PERM=perm is not None,
                             HAS_BIAS=bias is not None, PRECISION=precision(x.dtype))
    return y


# ---------------------------------------------------------------------------------------------
# input gradient
# ---------------------------------------------------------------------------------------------


@triton.autotune(configs=_configs(_GEMM_SHAPES), key=["n_bucket", "oc", "c", "g", "ACCUMULATE"],
                 prune_configs_by={"early_config_prune": _prune} if not INTERPRET else None,
                 restore_value=["dx_ptr"], **_TUNE)
@triton.jit(do_not_specialize=["n", "n_bucket"])
def _io_dx_kernel(dy_ptr, w_ptr, dx_ptr, n, c, oc, g, n_bucket, stride_dyn, stride_dxn,
                  ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One half of dx: ``dx[m, col(t)] (+)= sum_o dy[m, j*oc + o] W[j, o, h*c + t]``.

    ACCUMULATE=False: the interleaved half (h = 1, col = t*g + j), stored; True: the own half
    (h = 0, col = j*c + t), added to what is there. A column of dx is group j's own column and
    another group's interleaved column, so no tile of dx is one GEMM: the two halves are two
    launches of this kernel, each a plain GEMM on a BLOCK_M x BLOCK_N tile of (tokens, t) with
    K = oc, and each program owns its columns (no atomics). The strided half is stored first, so
    that the read-modify-write pass is the contiguous one.
    """
    j, pid_n, pid_m = _group_tile(tl.program_id(0), g, c, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rt = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok, t_ok = rm < n, rt < c
    dy_rows = dy_ptr + rm.to(tl.int64)[:, None] * stride_dyn + j * oc  # (BLOCK_M, 1): group j's outputs
    half = 0 if ACCUMULATE else c
    w_tile = w_ptr + j * oc * (2 * c) + half + rt[None, :]  # (1, BLOCK_N): W[j, 0, h*c + t]
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, oc, BLOCK_K):
        ko = k0 + rk
        o_ok = ko < oc
        a = tl.load(dy_rows + ko[None, :], mask=m_ok[:, None] & o_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        b = tl.load(w_tile + ko[:, None] * (2 * c), mask=o_ok[:, None] & t_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
        acc = _dot(a, b, acc, PRECISION)
    cols = j * c + rt if ACCUMULATE else rt * g + j
    out = dx_ptr + rm.to(tl.int64)[:, None] * stride_dxn + cols[None, :]
    ok = m_ok[:, None] & t_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(out, mask=ok, other=0.0).to(tl.float32)
    tl.store(out, acc.to(dx_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------
# weight gradient
# ---------------------------------------------------------------------------------------------


@triton.autotune(configs=_configs(_DW_SHAPES), key=["n_bucket", "oc", "c", "g"], **_TUNE)
@triton.jit(do_not_specialize=["n", "n_bucket"])
def _io_dw_kernel(dy_ptr, x_ptr, dw_ptr, n, c, oc, g, n_bucket, stride_dyn, stride_xn,
                  PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``dW[j, o, h*c + t] = sum_m dy[m, j*oc + o] xp[m, col_h(t)]``, col_0 = j*c + t (own),
    col_1 = t*g + j (interleaved): both halves of every group in one launch.

    One program: a BLOCK_M x BLOCK_N tile of (outputs o, channels t) of one half of group j, the
    K loop over tokens in BLOCK_K steps: dy^T tile (BLOCK_M, BLOCK_K) times an x tile
    (BLOCK_K, BLOCK_N) read at stride 1 (own) or g (interleaved) straight from xp. Groups run
    fastest in the program id, for the same cache sharing of the strided x reads as the forward.
    """
    j, pid_m, rest = _group_tile(tl.program_id(0), g, oc, BLOCK_M)
    t_tiles = (c + BLOCK_N - 1) // BLOCK_N
    h = rest // t_tiles  # 0: own half, 1: interleaved half
    pid_n = rest % t_tiles
    ro = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rt = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    o_ok, t_ok = ro < oc, rt < c
    cols = tl.where(h == 0, j * c + rt, rt * g + j)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, n, BLOCK_K):
        km = k0 + rk
        k_ok = km < n
        rows = km.to(tl.int64)
        a = tl.load(dy_ptr + rows[None, :] * stride_dyn + (j * oc + ro)[:, None],
                    mask=o_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K) of dy^T
        b = tl.load(x_ptr + rows[:, None] * stride_xn + cols[None, :],
                    mask=k_ok[:, None] & t_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
        acc = _dot(a, b, acc, PRECISION)
    out = dw_ptr + (j * oc + ro)[:, None] * (2 * c) + (h * c + rt)[None, :]
    tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=o_ok[:, None] & t_ok[None, :])


def io_grads(dy: torch.Tensor, xp: torch.Tensor, weight: torch.Tensor):
    """``(dxp, dW)`` of the grouped part, on ``xp`` (N, in) in the block's channel order (a permuted
    block's caller gathers x[:, perm] and scatters dxp back)."""
    n, i = xp.shape
    g, oc, k = weight.shape
    c = k // 2
    dy = dy if dy.stride(1) == 1 else dy.contiguous()
    xp = xp if xp.stride(1) == 1 else xp.contiguous()
    w = weight.contiguous()
    dx = torch.empty(n, i, device=xp.device, dtype=xp.dtype)
    dw = torch.empty(g, oc, k, device=w.device, dtype=w.dtype)
    if n == 0:
        return dx, dw.zero_()
    prec = precision(dy.dtype)

    def dx_grid(meta):  # groups fastest, then channel tiles, then token tiles
        return (g * triton.cdiv(c, meta["BLOCK_N"]) * triton.cdiv(n, meta["BLOCK_M"]),)

    for accumulate in (False, True):  # the strided interleaved half stored, then the own half added
        _io_dx_kernel[dx_grid](dy, w, dx, n, c, oc, g, _bucket(n), dy.stride(0), dx.stride(0),
                               ACCUMULATE=accumulate, PRECISION=prec)

    def dw_grid(meta):  # groups fastest, then output tiles, then (half, channel tile)
        return (g * triton.cdiv(oc, meta["BLOCK_M"]) * 2 * triton.cdiv(c, meta["BLOCK_N"]),)

    _io_dw_kernel[dw_grid](dy, xp, dw, n, c, oc, g, _bucket(n), dy.stride(0), xp.stride(0), PRECISION=prec)
    return dx, dw
