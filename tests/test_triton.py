"""The Triton kernels of gpconv.layers.cuda.triton_io, run on the CPU by triton's interpreter.

A second copy of the kernels module is imported with TRITON_INTERPRET=1 (triton 3.9 reads it
when a kernel is decorated, i.e. when the module is imported, and again when one is launched:
every test here sets it). The copy leaves the real module, which a GPU run of tests/test_cuda.py
compiles, alone; it runs because the kernels use triton's builtins only (triton's own jit
library was decorated, uninterpreted, when torch and transformers imported triton). The routing's
device list is widened to the CPU for a test, so that a GroupedPointwiseBlock's forward and
backward run the kernels through the same op and autograd as a GPU call.

Each case compares y, dx and every parameter gradient with the float64 dense map (to_dense) and
the autograd of the two-bmm reference, on the same rounded inputs. Tolerances, as
max |error| / max |reference| (measured: fp32 <= 2e-7, fp16 <= 6e-4, bf16 <= 8e-3): float32 1e-6
(the interpreter multiplies in IEEE fp32), float16 2e-3, bfloat16 2e-2 (a few roundings of the
output: dx adds its two halves after the first is stored in the dtype). bfloat16 dots are upcast
to fp32 under the interpreter (triton 3.9's interpreter cannot multiply bfloat16), which the
GPU's MMA with fp32 accumulation matches; float16 is multiplied as float16.
"""

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpconv.layers.cuda
from gpconv.layers import GroupedPointwiseBlock, use_kernels
from gpconv.layers.cuda import triton_route
from gpconv.layers.ops import io_reference

pytest.importorskip("triton")

TOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module")
def interpreted():
    """The kernels module, imported afresh under TRITON_INTERPRET=1 (the environment restored after)."""
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec = importlib.util.spec_from_file_location(
            "gpconv_triton_io_interpreted", Path(gpconv.layers.cuda.__file__).with_name("triton_io.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # the interpreter finds a kernel's helpers through its module
        spec.loader.exec_module(mod)
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before
    yield mod
    del sys.modules[spec.name]


@pytest.fixture(autouse=True)
def _interpreting(monkeypatch):
    """The interpreter runs a kernel only while TRITON_INTERPRET=1 (launches read it too)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


class Spy:
    """The interpreted kernels, counting calls."""

    def __init__(self, mod):
        self.mod, self.calls = mod, []

    def io_forward(self, *args):
        self.calls.append("forward")
        return self.mod.io_forward(*args)

    def io_grads(self, *args):
        self.calls.append("grads")
        return self.mod.io_grads(*args)


@pytest.fixture
def on_cpu(interpreted, monkeypatch):
    """CPU tensors routed to the interpreted kernels, as CUDA tensors are to the compiled ones."""
    spy = Spy(interpreted)
    monkeypatch.setattr(triton_route, "DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(triton_route, "kernels", lambda: spy)
    return spy


def _block(n_in, n_out, g, variant, bias, dtype, seed=0):
    torch.manual_seed(seed)
    b = GroupedPointwiseBlock(n_in, n_out, g, bias=bias, rank=3 if variant == "hybrid" else 0,
                              permuted=variant != "io")
    with torch.no_grad():
        for p in b.parameters():
            p.normal_(0, 0.3)  # the low-rank B starts at zero: make every term count
        if b.input_perm is not None:
            b.input_perm.copy_(torch.randperm(n_in))
    return b.to(dtype)


def _reference(block, x, dy):
    """float64 y (the dense matrix), dx and parameter gradients (autograd of the two-bmm form)."""
    params = {n: p.detach().double().requires_grad_() for n, p in block.named_parameters()}
    x64 = x.detach().double().requires_grad_()
    lowrank = (params["lowrank_a"], params["lowrank_b"]) if "lowrank_a" in params else None
    y = io_reference(x64, params["weight"], params.get("bias"), block.input_perm, lowrank)
    y.backward(dy.double())
    dense = x64.detach() @ copy.deepcopy(block).double().to_dense().t()  # summed in float64 too
    if block.bias is not None:
        dense = dense + params["bias"].detach()
    torch.testing.assert_close(y.detach(), dense)  # the reference is the dense map
    return dense, x64.grad, {n: p.grad for n, p in params.items()}


def _close(got, want, dtype, what):
    err = (got.detach().double() - want).abs().max().item() / max(want.abs().max().item(), 1e-30)
    assert err <= TOL[dtype], f"{what}: relative max error {err:.2e} > {TOL[dtype]:.0e}"


# (in, out, groups, variant, bias, tokens, dtype): with the interpreter's 32-wide tiles, c and oc
# below, at and above one tile, c < g, odd token counts; every variant in every dtype
CASES = [
    (32, 48, 4, "io", True, 1, torch.float32),
    (32, 160, 4, "io", False, 17, torch.float32),
    (96, 40, 2, "io", True, 33, torch.float32),
    (40, 80, 8, "permuted", True, 3, torch.float32),
    (48, 24, 3, "permuted", False, 33, torch.float32),
    (32, 48, 4, "hybrid", True, 17, torch.float32),
    (64, 64, 8, "hybrid", False, 1, torch.float32),
    (32, 48, 4, "io", True, 17, torch.float16),
    (48, 24, 3, "permuted", True, 3, torch.float16),
    (96, 40, 2, "hybrid", False, 33, torch.float16),
    (32, 48, 4, "io", False, 33, torch.bfloat16),
    (40, 80, 8, "permuted", True, 17, torch.bfloat16),
    (48, 24, 3, "hybrid", True, 1, torch.bfloat16),
]


@pytest.mark.parametrize("n_in, n_out, g, variant, bias, tokens, dtype", CASES)
def test_triton_block_forward_and_grads_match_dense(on_cpu, n_in, n_out, g, variant, bias, tokens, dtype):
    block = _block(n_in, n_out, g, variant, bias, dtype)
    x = torch.randn(tokens, n_in).to(dtype).requires_grad_()
    dy = torch.randn(tokens, n_out).to(dtype)
    with use_kernels(triton=True):
        y = block(x)
        y.backward(dy)
    assert on_cpu.calls == ["forward", "grads"]  # both passes on the kernels, once each
    assert y.dtype == dtype and x.grad.dtype == dtype
    y_ref, dx_ref, grads_ref = _reference(block, x, dy)
    _close(y, y_ref, dtype, "y")
    _close(x.grad, dx_ref, dtype, "dx")
    for name, p in block.named_parameters():
        _close(p.grad, grads_ref[name], dtype, f"d{name}")


def test_triton_kernels_read_strided_rows(interpreted):
    """The wrappers read x at any row stride (a slice of a wider activation) without a copy."""
    torch.manual_seed(1)
    wide = torch.randn(17, 80)
    x, weight, dy = wide[:, 8:56], torch.randn(4, 6, 24), torch.randn(17, 24)  # x (17, 48), row stride 80
    perm = torch.randperm(48)
    y = interpreted.io_forward(x, weight, None, perm)
    torch.testing.assert_close(y, io_reference(x, weight, None, perm), atol=1e-5, rtol=1e-5)
    xp = x.index_select(1, perm)
    xr, wr = xp.clone().requires_grad_(), weight.clone().requires_grad_()
    io_reference(xr, wr, None).backward(dy)
    dx, dw = interpreted.io_grads(dy, xp, weight)
    torch.testing.assert_close(dx, xr.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dw, wr.grad, atol=1e-5, rtol=1e-5)


def test_triton_inference_and_autocast_routes(on_cpu):
    """Inference calls only the forward kernel (the op's implementation, no autograd); under
    autocast the block computes in autocast's dtype on the kernels, like nn.Linear, and the
    gradient lands on the float32 parameter."""
    block = _block(32, 48, 4, "hybrid", True, torch.float32)
    x = torch.randn(5, 32)
    with torch.no_grad():
        y = block(x)
    assert on_cpu.calls == ["forward"]
    _close(y, _reference(block, x, torch.zeros(5, 48))[0], torch.float32, "y")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert triton_route.eager_dtype(x, block.weight) == torch.bfloat16
        y16 = block(x.requires_grad_())
    y16.float().sum().backward()
    assert y16.dtype == torch.bfloat16 and on_cpu.calls == ["forward", "forward", "grads"]
    assert block.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


def test_triton_off_never_calls_triton(monkeypatch):
    """KernelConfig.triton=False: neither the eager block nor the ops touch the kernels, even on a
    device the kernels would take."""
    def forbidden():
        raise AssertionError("the Triton kernels were called with KernelConfig.triton=False")

    monkeypatch.setattr(triton_route, "DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(triton_route, "kernels", forbidden)
    block = _block(32, 48, 4, "permuted", True, torch.float32)
    x = torch.randn(7, 32, requires_grad=True)
    y_ref = _reference(block, x, torch.zeros(7, 48))[0]
    with use_kernels(triton=False):
        assert triton_route.eager_dtype(x, block.weight) is None
        assert not triton_route.kernel_ok(x, block.weight)
        y = block(x)
        y.sum().backward()
        z = torch.ops.gpconv.io_block(x, block.weight, block.bias, block.input_perm, None, None)
        dxp, dw = torch.ops.gpconv.io_grouped_grads(torch.ones(7, 48), x.detach(), block.weight.detach())
    _close(y, y_ref, torch.float32, "y")
    _close(z, y_ref, torch.float32, "op")
    assert dxp.shape == (7, 32) and dw.shape == block.weight.shape
    assert x.grad is not None and block.weight.grad is not None


def test_triton_is_the_ops_cuda_kernel(interpreted):
    """Where triton is importable both ops have a CUDA kernel (the Triton path), and the routing
    takes CUDA tensors only (a CPU tensor keeps the CPU paths); the interpreter copy runs one
    config per kernel, so nothing is benchmarked on the CPU."""
    assert triton_route.available()
    for op in ("gpconv::io_block", "gpconv::io_grouped_grads"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
    x, w = torch.randn(3, 32), torch.randn(4, 12, 16)
    assert triton_route.DEVICES == ("cuda",)
    assert triton_route.eager_dtype(x, w) is None and not triton_route.kernel_ok(x, w)
    for kernel in (interpreted._io_forward_kernel, interpreted._io_dx_kernel, interpreted._io_dw_kernel):
        assert type(kernel.fn).__name__ == "InterpretedFunction" and len(kernel.configs) == 1


def test_triton_kernels_compile_for_a_hopper_gpu(monkeypatch):
    """The kernels compile to sm_90 machine code (PTX and ptxas, no GPU needed): what the
    interpreter does not check (constexpr branches, dot layouts, shared memory)."""
    import triton  # why: optional dependency, skipped above without it
    from triton.backends.compiler import GPUTarget  # why: the same
    from triton.compiler import ASTSource  # why: the same

    monkeypatch.delenv("TRITON_INTERPRET")  # the real module, compiled kernels (as on a GPU)
    triton_io = triton_route.kernels()

    def compile_(kernel, args, constexprs):
        sig = {**{a: t for a, t in zip(kernel.fn.arg_names, args)}, **{k: "constexpr" for k in constexprs}}
        src = ASTSource(fn=kernel.fn, signature=sig, constexprs=constexprs)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})

    tiles = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32)
    ints = ["i32"] * 7  # n, c, oc, g, n_bucket and two row strides
    try:
        k = compile_(triton_io._io_forward_kernel, ["*bf16", "*i64", "*bf16", "*bf16", "*bf16", *ints],
                     dict(HAS_PERM=True, HAS_BIAS=True, PRECISION="tf32", **tiles))
    except (RuntimeError, FileNotFoundError) as e:  # a triton without its NVIDIA backend or ptxas
        pytest.skip(f"triton cannot compile for sm_90 here: {e}")
    assert k.metadata.shared > 0
    compile_(triton_io._io_dx_kernel, ["*bf16"] * 3 + ints, dict(ACCUMULATE=True, PRECISION="tf32", **tiles))
    compile_(triton_io._io_dw_kernel, ["*bf16"] * 3 + ints, dict(PRECISION="tf32", **tiles))


def test_triton_absent_gpconv_imports_and_runs():
    """Without triton (hidden from imports) gpconv imports, a block trains on the CPU, the ops
    have no CUDA kernel of their own and the kernels module is never imported."""
    code = """
import sys
sys.modules["triton"] = None  # as if triton were not installed
import torch, gpconv
from gpconv.layers import GroupedPointwiseBlock
from gpconv.layers.cuda import triton_route
b = GroupedPointwiseBlock(32, 48, 4, bias=True, rank=2)
x = torch.randn(5, 32, requires_grad=True)
b(x).sum().backward()
assert x.grad is not None and b.weight.grad is not None
print(triton_route.available(), torch._C._dispatch_has_kernel_for_dispatch_key("gpconv::io_block", "CUDA"),
      "gpconv.layers.cuda.triton_io" in sys.modules)
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["False", "False", "False"]
