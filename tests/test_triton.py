"""The Triton kernels of gpconv.layers.cuda.triton_io, run on the CPU by triton's interpreter.

The kernels run in one child process (tests/triton_child.py) started with TRITON_INTERPRET=1:
triton 3.9 reads it when a jit function is decorated, its own library included, so it must be
set before triton is imported, and this process imported triton long before (torch and
transformers do). The child runs every case below as a GroupedPointwiseBlock forward and
backward through the op and autograd a GPU call takes, and reports errors against the float64
dense map; the tests here judge them.

Tolerances, as max |error| / max |reference|: float32 1e-5 (the interpreter multiplies in IEEE
fp32), float16 4e-3 and bfloat16 3e-2 (a few roundings of the output: dx adds its two halves
after the first is stored in the dtype). bfloat16 dots are upcast to fp32 under the interpreter
(triton 3.9's interpreter cannot multiply bfloat16), which the GPU's MMA with fp32 accumulation
matches; float16 is multiplied as float16.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpconv.layers import GroupedPointwiseBlock, use_kernels
from gpconv.layers.cuda import triton_route

pytest.importorskip("triton")

CHILD = str(Path(__file__).with_name("triton_child.py"))
TOL = {"float32": 1e-5, "float16": 4e-3, "bfloat16": 3e-2}

# (in, out, groups, variant, bias, tokens, dtype): c below, at and above the interpreter's 16-wide
# K tile, c < g, oc not a multiple of the tile, odd token counts; every variant in every dtype
CASES = [
    (32, 48, 4, "io", True, 1, "float32"),
    (32, 48, 4, "io", False, 17, "float32"),
    (96, 40, 2, "io", True, 33, "float32"),
    (40, 80, 8, "permuted", True, 3, "float32"),
    (48, 24, 3, "permuted", False, 33, "float32"),
    (32, 48, 4, "hybrid", True, 17, "float32"),
    (64, 64, 8, "hybrid", False, 1, "float32"),
    (32, 48, 4, "io", True, 17, "float16"),
    (48, 24, 3, "permuted", True, 3, "float16"),
    (96, 40, 2, "hybrid", False, 33, "float16"),
    (32, 48, 4, "io", False, 33, "bfloat16"),
    (40, 80, 8, "permuted", True, 17, "bfloat16"),
    (48, 24, 3, "hybrid", True, 1, "bfloat16"),
]


@pytest.fixture(scope="module")
def interpreted():
    """Every case's report from one interpreter run (~20 s on two shared cores)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, CHILD, json.dumps(CASES)], env=env, capture_output=True, text=True,
                       timeout=150)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_triton_runs_interpreted_with_one_config(interpreted):
    """The interpreter took effect, and nothing was autotuned on the CPU (one config each)."""
    assert interpreted["interpreted"] == ["InterpretedFunction"] * 3
    assert interpreted["configs"] == [1, 1, 1]


@pytest.mark.parametrize("case", range(len(CASES)), ids=["-".join(map(str, c)) for c in CASES])
def test_triton_block_forward_and_grads_match_dense(interpreted, case):
    report, dtype = interpreted["cases"][case], CASES[case][-1]
    assert report["calls"] == ["forward", "grads"]  # both passes on the kernels, once each
    assert report["dtypes"] == [f"torch.{dtype}"] * 2
    names = {"y", "dx", "dweight"} | ({"dbias"} if CASES[case][4] else set())
    names |= {"dlowrank_a", "dlowrank_b"} if CASES[case][3] == "hybrid" else set()
    assert set(report["errors"]) == names
    bad = {k: v for k, v in report["errors"].items() if not v <= TOL[dtype]}
    assert not bad, f"relative max errors above {TOL[dtype]}: {bad}"


def test_triton_kernels_read_strided_rows(interpreted):
    """The wrappers read x at any row stride (a slice of a wider activation) without a copy."""
    assert all(e <= TOL["float32"] for e in interpreted["strided"].values()), interpreted["strided"]


def test_triton_inference_and_autocast_routes(interpreted):
    """Inference calls only the forward kernel; under autocast the block computes in bfloat16 on
    the kernels, and the gradient lands on the float32 parameter."""
    r = interpreted["routes"]
    assert r["inference_calls"] == ["forward"] and r["inference_y"] <= TOL["float32"]
    assert r["autocast_dtype"] == "torch.bfloat16" and r["autocast_y"] == "torch.bfloat16"
    assert r["autocast_calls"] == ["forward", "forward", "grads"] and r["weight_grad"] == "torch.float32"


def test_triton_off_never_calls_triton(monkeypatch):
    """KernelConfig.triton=False: neither the eager block nor the ops touch the kernels, even on a
    device the kernels would take."""
    def forbidden():
        raise AssertionError("the Triton kernels were called with KernelConfig.triton=False")

    monkeypatch.setattr(triton_route, "DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(triton_route, "kernels", forbidden)
    torch.manual_seed(0)
    block = GroupedPointwiseBlock(32, 48, 4, bias=True, permuted=True)
    with torch.no_grad():
        block.input_perm.copy_(torch.randperm(32))
    x = torch.randn(7, 32, requires_grad=True)
    dense = x.detach() @ block.to_dense().t() + block.bias.detach()
    with use_kernels(triton=False):
        assert triton_route.eager_dtype(x, block.weight) is None
        assert not triton_route.kernel_ok(x, block.weight)
        y = block(x)
        y.sum().backward()
        z = torch.ops.gpconv.io_block(x, block.weight, block.bias, block.input_perm, None, None)
        dxp, dw = torch.ops.gpconv.io_grouped_grads(torch.ones(7, 48), x.detach(), block.weight.detach())
    torch.testing.assert_close(y, dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z, dense, atol=1e-5, rtol=1e-5)
    assert dxp.shape == (7, 32) and dw.shape == block.weight.shape
    assert x.grad is not None and block.weight.grad is not None


def test_triton_is_the_ops_cuda_kernel():
    """Where triton is importable both ops have a CUDA kernel (the Triton path), and with it on
    the routing takes CUDA tensors only (a CPU tensor keeps the CPU paths)."""
    assert triton_route.available()
    for op in ("gpconv::io_block", "gpconv::io_grouped_grads"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
    x, w = torch.randn(3, 32), torch.randn(4, 12, 16)
    assert triton_route.DEVICES == ("cuda",)
    assert triton_route.eager_dtype(x, w) is None and not triton_route.kernel_ok(x, w)
