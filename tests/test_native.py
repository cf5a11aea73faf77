"""gpconv._native: the io block's C interleave kernels equal torch's copies, bit for bit.

The extension is optional (setup.py builds it with optional=True). Where a C compiler exists it
must have been built: a silent build failure would otherwise turn every test here into a skip.
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from gpconv import GroupedPointwiseBlock
from gpconv import layers

# (c, g): Phi-3's o_proj / down_proj groups, g below, at and above one 16-wide tile, c not a
# multiple of 16, a single channel per group
SHAPES = [(256, 12), (256, 32), (16, 16), (33, 17), (7, 5), (3, 40), (1, 3), (20, 1)]
TOKENS = [1, 5, 130]


def test_extension_is_built_where_a_compiler_exists():
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler here: gpconv runs on torch's copies")
    assert layers._native is not None, "gpconv._native was not built: reinstall with `pip install -e .` and read the compiler error"


needs_native = pytest.mark.skipif(layers._native is None, reason="gpconv._native not built")


@pytest.fixture(params=[True, False], ids=["avx512", "portable"])
def isa(request):
    """Run a test with the AVX-512 kernels (where the CPU has them) and with the portable loops."""
    before = layers._native.set_avx512(request.param)
    yield request.param
    layers._native.set_avx512(before)


@needs_native
@pytest.mark.parametrize("c, g", SHAPES)
@pytest.mark.parametrize("n", TOKENS)
@pytest.mark.parametrize("threads", [1, 3])
def test_interleave_matches_torch(isa, c, g, n, threads):
    x = torch.randn(n, c * g)
    out = torch.full((n, g, c), float("nan"))
    layers._native.interleave(x.data_ptr(), out.data_ptr(), n, c, g, threads)
    assert torch.equal(out, x.view(n, c, g).transpose(1, 2))


@needs_native
@pytest.mark.parametrize("c, g", SHAPES)
@pytest.mark.parametrize("n", TOKENS)
@pytest.mark.parametrize("threads", [1, 3])
def test_uninterleave_add_matches_torch(isa, c, g, n, threads):
    d_mixed = torch.randn(g, n, c)
    dx = torch.randn(n, c * g)
    ref = dx.clone()
    ref.view(n, c, g).add_(d_mixed.permute(1, 2, 0))
    layers._native.uninterleave_add(d_mixed.data_ptr(), dx.data_ptr(), n, c, g, threads)
    assert torch.equal(dx, ref)


@needs_native
def test_bad_arguments_raise():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="g >= 1"):
        layers._native.interleave(x.data_ptr(), x.data_ptr(), 1, 4, 0)


@needs_native
@pytest.mark.parametrize("n_in, n_out, g", [(3072 // 8, 3072 // 8, 12), (1024, 384, 32), (96, 160, 8)])
@pytest.mark.parametrize("threads", [1, 2])
def test_block_with_and_without_native_is_bit_equal(monkeypatch, n_in, n_out, g, threads):
    """The io block's many-token CPU paths (inference and the hand-written backward) give the same
    bits with the native kernels as with torch's copies: only the data movement differs."""
    torch.manual_seed(0)
    block = GroupedPointwiseBlock(n_in, n_out, g, bias=True)
    x = torch.randn(2, 150, n_in)  # 300 tokens: the many-token path
    dy = torch.randn(2, 150, n_out)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = []
        for native in (True, False):
            monkeypatch.setattr(layers, "NATIVE", native)
            with torch.inference_mode():
                y_inf = block(x)
            xg = x.clone().requires_grad_(True)
            block.zero_grad()
            y = block(xg)
            y.backward(dy)
            results.append((y_inf, y.detach(), xg.grad, block.weight.grad.clone(), block.bias.grad.clone()))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*results):
        assert torch.equal(a, b)
    # and the io block is still the paper's formula
    torch.testing.assert_close(results[0][0], x @ block.to_dense().t() + block.bias, rtol=1e-4, atol=1e-4)


def test_native_off_by_environment():
    """GPCONV_NATIVE=0 turns the kernels off for a whole process."""
    code = "import gpconv.layers as l; print(l.NATIVE)"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "GPCONV_NATIVE": "0"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
