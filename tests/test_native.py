"""gpconv.layers.cpu._native: the io block's C kernels equal torch's copies and GEMMs.

The extension is optional (setup.py builds it with optional=True). Where a C compiler exists it
must have been built: a silent build failure would otherwise turn every test here into a skip.
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from gpconv import layers
from gpconv.layers import GroupedPointwiseBlock, KernelConfig, kernel_config
from gpconv.layers.cpu import native
from conftest import route

# (c, g): Phi-3's o_proj / down_proj groups, g below, at and above one 16-wide (AVX-512) or
# 8-wide (AVX2) tile, partial tiles of every width 1-7, c not a multiple of 16, a single
# channel per group
SHAPES = [(256, 12), (256, 32), (16, 16), (33, 17), (7, 5), (3, 40), (1, 3), (20, 1), (9, 14), (16, 7), (24, 10)]
TOKENS = [1, 5, 130]


def test_extension_is_built_where_a_compiler_exists():
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler here: gpconv runs on torch's copies")
    assert native.ext is not None, "gpconv._native was not built: reinstall with `pip install -e .` and read the compiler error"


needs_native = pytest.mark.skipif(native.ext is None, reason="gpconv._native not built")


@pytest.fixture(autouse=True)
def kernels_on(monkeypatch):
    """These tests are about the kernels: on even under GPCONV_NATIVE=0 (where built)."""
    route(monkeypatch, native=native.ext is not None)


@pytest.fixture
def one_thread():
    """The block uses the kernels only with one torch thread (gpconv/layers.py, after NATIVE)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _use_isa(name):
    """Switch the kernels to ``name``; skip the test where this CPU lacks it. Returns the old one."""
    before = native.ext.set_isa(name)
    if native.ext.isa() != name:
        native.ext.set_isa(before)
        pytest.skip(f"this CPU has no {name}")
    return before


@pytest.fixture(params=["avx512", "avx2", "portable"])
def isa(request):
    """Run a test with each version of the copy kernels this CPU has (AVX-512, AVX2, portable)."""
    before = _use_isa(request.param)
    yield request.param
    native.ext.set_isa(before)


@pytest.fixture(params=["avx512", "avx2"])
def block_isa(request):
    """The block kernels (io_forward, io_small): AVX-512 and AVX2 versions, where the CPU has them."""
    before = _use_isa(request.param)
    yield request.param
    native.ext.set_isa(before)


@needs_native
@pytest.mark.parametrize("c, g", SHAPES)
@pytest.mark.parametrize("n", TOKENS)
@pytest.mark.parametrize("threads", [1, 3])
def test_interleave_matches_torch(isa, c, g, n, threads):
    x = torch.randn(n, c * g)
    out = torch.full((n, g, c), float("nan"))
    native.ext.interleave(x.data_ptr(), out.data_ptr(), n, c, g, threads)
    assert torch.equal(out, x.view(n, c, g).transpose(1, 2))


@needs_native
@pytest.mark.parametrize("c, g", SHAPES)
@pytest.mark.parametrize("n", TOKENS)
def test_interleave_grouped_layout_and_plain_transpose(isa, c, g, n):
    x = torch.randn(n, c * g)
    out = torch.full((g, n, c), float("nan"))
    native.ext.interleave(x.data_ptr(), out.data_ptr(), n, c, g, 2, True)
    assert torch.equal(out, x.view(n, c, g).permute(2, 0, 1))  # (N, c, g) -> (g, N, c)
    t = torch.full((c * g, n), float("nan"))  # n = 1 per call: a 2-D transpose of (n, c*g)
    native.ext.interleave(x.data_ptr(), t.data_ptr(), 1, n, c * g)
    assert torch.equal(t, x.t())


@needs_native
@pytest.mark.parametrize("c, g", SHAPES)
@pytest.mark.parametrize("n", TOKENS)
@pytest.mark.parametrize("threads", [1, 3])
def test_uninterleave_add_matches_torch(isa, c, g, n, threads):
    d_mixed = torch.randn(g, n, c)
    dx = torch.randn(n, c * g)
    ref = dx.clone()
    ref.view(n, c, g).add_(d_mixed.permute(1, 2, 0))
    native.ext.uninterleave_add(d_mixed.data_ptr(), dx.data_ptr(), n, c, g, threads)
    assert torch.equal(dx, ref)


@needs_native
def test_bad_arguments_raise():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="g >= 1"):
        native.ext.interleave(x.data_ptr(), x.data_ptr(), 1, 4, 0)


@needs_native
@pytest.mark.parametrize("n_in, n_out, g", [(3072 // 8, 3072 // 8, 12), (1024, 384, 32), (96, 160, 8)])
@pytest.mark.parametrize("threads", [1, 2])  # 2: contiguous GEMM outputs, and OpenMP kernels where built so
def test_block_with_and_without_native_is_bit_equal(monkeypatch, n_in, n_out, g, threads):
    """The io block's many-token CPU paths (inference and the hand-written backward) give the same
    bits with the native copy kernels as with torch's copies: only the data movement differs.
    (The fused kernels sum in another order: tested against the dense map below.)"""
    route(monkeypatch, fused_forward=False)
    route(monkeypatch, fused_backward=False)
    torch.manual_seed(0)
    block = GroupedPointwiseBlock(n_in, n_out, g, bias=True)
    x = torch.randn(2, 150, n_in)  # 300 tokens: the many-token path
    dy = torch.randn(2, 150, n_out)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = []
        for on in (True, False):
            route(monkeypatch, native=on)
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


@needs_native
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_one_openmp_runtime_in_the_process():
    """Built with OpenMP, the extension must share torch's libgomp (one runtime, one thread pool),
    not load a second copy whose workers would compete with torch's."""
    maps = open("/proc/self/maps").read().splitlines()
    gomp = {line.split()[-1] for line in maps if "libgomp" in line.split()[-1]}
    assert len(gomp) <= 1, gomp


def test_native_off_by_environment():
    """GPCONV_NATIVE=0 turns the kernels off for a whole process, and says so."""
    code = "import gpconv.layers as l; print(l.kernel_config().native); print(l.native_status())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "GPCONV_NATIVE": "0"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["False", "off (torch paths)" if native.ext else "not built (torch paths)"]


@needs_native
def test_native_status_names_what_runs():
    status = layers.native_status()
    assert status.startswith("on: ")
    names = {"avx512": "fused forward + copies (AVX-512)", "avx2": "fused forward + copies (AVX2)",
             "portable": "copies only (no AVX2)"}
    assert names[native.ext.isa()] in status
    assert ("OpenMP, torch's threads" in status) == bool(native.ext.openmp)
    if native.ext.isa() != "portable":
        assert (f"fused forward <= {kernel_config().fused_max_out_per_group} outputs/group, "
                f"decode kernel <= {kernel_config().small_max_tokens} tokens") in status


needs_block_kernels = pytest.mark.skipif(
    native.ext is None or native.ext.isa() == "portable",
    reason="the fused forward needs gpconv._native on an AVX2 or AVX-512 CPU")

# (in, out, g): Phi-3's o_proj / down_proj at 1/8 width, oc not a multiple of the 8-output (AVX-512)
# or 6-output (AVX2) tile, in not a multiple of the 16 / 8-channel tile, one channel per group, g = 1
FUSED_SHAPES = [(384, 384, 12), (1024, 384, 32), (36, 60, 3), (30, 20, 5), (7, 14, 7), (64, 24, 1), (48, 48, 4)]


@needs_block_kernels
@pytest.mark.parametrize("n_in, n_out, g", FUSED_SHAPES)
# around the 16-token tile and the 48-token block; at 3 threads io_forward splits the groups up to
# n = 200 (fewer weight passes) and the tokens at 130 and 400
@pytest.mark.parametrize("kernel, n", [("io_forward", n) for n in (1, 15, 16, 17, 47, 48, 49, 130, 200, 400)]
                         + [("io_small", n) for n in (1, 3, 8)])
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_block_kernels_are_the_block(block_isa, n_in, n_out, g, kernel, n, threads, bias):
    """The fused forward and the small-N forward compute the block's dense map (fp32 rounding)."""
    torch.manual_seed(n)
    block = GroupedPointwiseBlock(n_in, n_out, g, bias=bias)
    if bias:
        torch.nn.init.normal_(block.bias)
    x = torch.randn(n, n_in)
    y = torch.full((n, n_out), float("nan"))
    w, b = block.weight.detach(), None if block.bias is None else block.bias.detach()
    getattr(native.ext, kernel)(x.data_ptr(), w.data_ptr(), 0 if b is None else b.data_ptr(), y.data_ptr(),
                                    n, n_in, n_out, g, threads)
    ref = x.double() @ block.to_dense().double().t() + (0 if b is None else b.double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


@needs_block_kernels
@pytest.mark.parametrize("n_in, n_out, g", FUSED_SHAPES)
@pytest.mark.parametrize("n", [1, 7, 15, 16, 17, 47, 48, 49, 130])  # tails of the 8 x 8 transposes,
@pytest.mark.parametrize("threads", [1, 3])                          # the 16-token tile, the 48-token block
def test_io_dx_is_the_blocks_input_gradient(block_isa, n_in, n_out, g, n, threads):
    """io_dx writes dY @ W_dense: the own half's GEMM plus the un-interleaved mixed half, every
    element (the output starts as NaN), at channel counts that are not a multiple of its 6-channel
    tile."""
    torch.manual_seed(n)
    block = GroupedPointwiseBlock(n_in, n_out, g)
    dy = torch.randn(n, n_out)
    dx = torch.full((n, n_in), float("nan"))
    native.ext.io_dx(dy.data_ptr(), block.weight.detach().data_ptr(), dx.data_ptr(), n, n_in, n_out, g, threads)
    ref = dy.double() @ block.to_dense().double()
    torch.testing.assert_close(dx.double(), ref, rtol=1e-5, atol=1e-5)


def _weight_grad_ref(x, dy, g):
    """dW of the io block by autograd through plain torch ops (the interleave as a strided view)."""
    n, n_in = x.shape
    c = n_in // g
    z = torch.cat([x.view(n, g, c), x.view(n, c, g).transpose(1, 2)], dim=2).double()  # (N, g, 2c)
    return torch.einsum("nko,nkj->koj", dy.double().view(n, g, dy.shape[1] // g), z)  # (g, oc, 2c)


@needs_block_kernels
@pytest.mark.parametrize("n_in, n_out, g", FUSED_SHAPES)
@pytest.mark.parametrize("n", [0, 1, 7, 15, 16, 17, 47, 48, 49, 130])
@pytest.mark.parametrize("threads", [1, 3])
def test_io_dw_is_the_blocks_weight_gradient(block_isa, n_in, n_out, g, n, threads):
    """io_dw writes dY_k^T [x own | x interleaved] for every group, every element (the output
    starts as NaN; no tokens -> zeros), across the 48-token blocks it accumulates over."""
    torch.manual_seed(n)
    x, dy = torch.randn(n, n_in), torch.randn(n, n_out)
    dw = torch.full((g, n_out // g, 2 * n_in // g), float("nan"))
    native.ext.io_dw(x.data_ptr(), dy.data_ptr(), dw.data_ptr(), n, n_in, n_out, g, threads)
    torch.testing.assert_close(dw.double(), _weight_grad_ref(x, dy, g), rtol=1e-5, atol=1e-4)


@needs_native
@pytest.mark.parametrize("kernel", ["io_dx", "io_dw"])
def test_gradient_kernels_refuse_bad_shapes_and_missing_isa(kernel):
    x = torch.zeros(8)
    fn = getattr(native.ext, kernel)
    with pytest.raises(ValueError, match="g dividing"):
        fn(x.data_ptr(), x.data_ptr(), x.data_ptr(), 1, 6, 4, 4)
    before = native.ext.set_isa("portable")
    try:
        with pytest.raises(RuntimeError, match="AVX2"):
            fn(x.data_ptr(), x.data_ptr(), x.data_ptr(), 1, 2, 2, 1)
    finally:
        native.ext.set_isa(before)


GUARD = 64  # floats of sentinel before and after each output


def _guarded(numel):
    """A buffer of numel floats with GUARD sentinels on both sides: (whole buffer, the inner view)."""
    buf = torch.full((numel + 2 * GUARD,), 12345.0)
    return buf, buf[GUARD:GUARD + numel]


def _guards_intact(buf):
    return bool((buf[:GUARD] == 12345.0).all() and (buf[-GUARD:] == 12345.0).all())


@needs_native
@pytest.mark.parametrize("n_in, n_out, g", FUSED_SHAPES)
@pytest.mark.parametrize("n", [1, 5, 17, 49])
def test_kernels_write_only_their_output(isa, n_in, n_out, g, n):
    """Every kernel, at every tail (tokens, channels, outputs not a multiple of its tile), writes
    inside its output and nowhere around it (the masked and partial stores at the edges)."""
    c = n_in // g
    x = torch.randn(n, n_in)
    buf, out = _guarded(n * n_in)
    native.ext.interleave(x.data_ptr(), out.data_ptr(), n, c, g, 2)
    assert _guards_intact(buf) and torch.equal(out.view(n, g, c), x.view(n, c, g).transpose(1, 2))
    d_mixed = torch.randn(g, n, c)
    buf, dx = _guarded(n * n_in)
    dx.zero_()
    native.ext.uninterleave_add(d_mixed.data_ptr(), dx.data_ptr(), n, c, g, 2)
    assert _guards_intact(buf) and torch.equal(dx.view(n, c, g), d_mixed.permute(1, 2, 0))
    if native.ext.isa() == "portable":
        return
    w = torch.randn(g, n_out // g, 2 * c)
    b = torch.randn(n_out)
    for kernel in ("io_forward", "io_small"):
        buf, y = _guarded(n * n_out)
        getattr(native.ext, kernel)(x.data_ptr(), w.data_ptr(), b.data_ptr(), y.data_ptr(), n, n_in, n_out, g, 2)
        assert _guards_intact(buf), kernel
        assert torch.isfinite(y).all() and not (y == 12345.0).any(), kernel
    dy = torch.randn(n, n_out)
    buf, dx = _guarded(n * n_in)
    native.ext.io_dx(dy.data_ptr(), w.data_ptr(), dx.data_ptr(), n, n_in, n_out, g, 2)
    assert _guards_intact(buf)
    assert torch.isfinite(dx).all() and not (dx == 12345.0).any()
    buf, dw = _guarded(w.numel())
    native.ext.io_dw(x.data_ptr(), dy.data_ptr(), dw.data_ptr(), n, n_in, n_out, g, 2)
    assert _guards_intact(buf)
    assert torch.isfinite(dw).all() and not (dw == 12345.0).any()


@needs_block_kernels
def test_fused_forward_runs_in_the_block_and_in_training(monkeypatch, one_thread, block_isa):
    """Inference and the training forward take the fused kernel (many tokens, float32); the output
    matches the two-GEMM path and gradients still come from the hand-written backward."""
    calls = []
    real = native.ext.io_forward
    real_ext = native.ext

    class Spy:
        def __getattr__(self, name):
            return (lambda *a: calls.append(a) or real(*a)) if name == "io_forward" else getattr(real_ext, name)

    monkeypatch.setattr(native, "ext", Spy())
    torch.manual_seed(0)
    block = GroupedPointwiseBlock(384, 384, 12, bias=True)
    x = torch.randn(3, 100, 384, requires_grad=True)
    y = block(x)
    y.square().sum().backward()
    with torch.inference_mode():
        y_inf = block(x.detach())
    assert len(calls) == 2
    route(monkeypatch, fused_max_out_per_group=31)  # 32 outputs per group: too wide now
    with torch.inference_mode():
        torch.testing.assert_close(block(x.detach()), y_inf, rtol=1e-5, atol=1e-5)
    assert len(calls) == 2
    route(monkeypatch, fused_forward=False)
    x2 = x.detach().clone().requires_grad_(True)
    block_grads = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    y2 = block(x2)
    y2.square().sum().backward()
    assert len(calls) == 2
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_inf, y2.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)
    for a, p in zip(block_grads, block.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-4)


@needs_block_kernels
def test_fused_gradients_run_in_training(monkeypatch, one_thread, block_isa):
    """The backward takes io_dx and io_dw for narrow groups (not for wide ones, not with
    FUSED_BACKWARD off; each only for the gradient that is needed), and every route gives the
    same gradients."""
    calls = []
    real_ext = native.ext

    class Spy:
        def __getattr__(self, name):
            real = getattr(real_ext, name)
            return (lambda *a: calls.append(name) or real(*a)) if name in ("io_dx", "io_dw") else real

    monkeypatch.setattr(native, "ext", Spy())
    torch.manual_seed(0)
    block = GroupedPointwiseBlock(384, 384, 12, bias=True)
    x0 = torch.randn(2, 100, 384)
    dy = torch.randn(2, 100, 384)

    def grads():
        x = x0.clone().requires_grad_(True)
        block.zero_grad()
        block(x).backward(dy)
        return [x.grad] + [p.grad.clone() for p in block.parameters()]

    fused = grads()
    assert sorted(calls) == ["io_dw", "io_dx"]
    route(monkeypatch, fused_backward=False)
    unfused = grads()
    assert len(calls) == 2
    route(monkeypatch, fused_backward=True)
    route(monkeypatch, fused_grad_max_out_per_group=31)  # 32 outputs per group: too wide now
    wide = grads()
    assert len(calls) == 2
    for a, b, c in zip(fused, unfused, wide):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)
    route(monkeypatch, fused_grad_max_out_per_group=192)
    block.zero_grad()
    block(x0).backward(dy)  # x needs no gradient: dW only
    assert calls[2:] == ["io_dw"]
    block.requires_grad_(False)
    x = x0.clone().requires_grad_(True)
    block(x).backward(dy)  # frozen block (e.g. only a low-rank term or other layers train): dx only
    assert calls[3:] == ["io_dx"]


@pytest.mark.parametrize("vendor, isa_name, limit, small", [("AuthenticAMD", "avx512", 2048, 31),
                                                            ("GenuineIntel", "avx512", 192, 8),
                                                            ("AuthenticAMD", "avx2", 192, 8), ("", "avx512", 192, 8),
                                                            ("AuthenticAMD", None, 192, 8)])
def test_kernel_limits_follow_the_cpu(vendor, isa_name, limit, small):
    """Wide groups take the fused forward, and 9-31 tokens io_small, only where that was measured
    faster: AMD's AVX-512."""
    cfg = KernelConfig.for_cpu(isa_name, vendor)
    assert (cfg.fused_max_out_per_group, cfg.small_max_tokens) == (limit, small)


def test_routing_in_force_is_this_cpus():
    from gpconv.system import cpu_vendor

    expected = KernelConfig.for_cpu(native.isa(), cpu_vendor())
    cfg = KernelConfig.detect()
    assert (cfg.fused_max_out_per_group, cfg.small_max_tokens) == (expected.fused_max_out_per_group,
                                                                   expected.small_max_tokens)


@needs_native
def test_fused_forward_refuses_bad_shapes():
    x = torch.zeros(8)
    with pytest.raises(ValueError, match="g dividing"):
        native.ext.io_forward(x.data_ptr(), x.data_ptr(), 0, x.data_ptr(), 1, 6, 4, 4)


@needs_block_kernels
@pytest.mark.parametrize("permuted", [False, True])
@pytest.mark.parametrize("small_max", [8, 31])  # the two CPU-chosen defaults of small_max_tokens
def test_inference_routes_by_token_count(monkeypatch, one_thread, permuted, block_isa, small_max):
    """Inference: a few tokens -> io_small, 32+ tokens of narrow groups -> io_forward, in between
    and with gradients -> torch's paths; every route gives the block's output."""
    route(monkeypatch, small_max_tokens=small_max)
    calls = []
    real = native.ext

    class Spy:
        def __getattr__(self, name):
            fn = getattr(real, name)
            return (lambda *a: calls.append(name) or fn(*a)) if name.startswith("io_") else fn

    monkeypatch.setattr(native, "ext", Spy())
    block = GroupedPointwiseBlock(96, 160, 8, bias=True, permuted=permuted)  # 20 outputs per group
    if permuted:
        block.input_perm.copy_(torch.randperm(96))
    dense = block.to_dense().detach()
    for n in (1, 8, 9, 31, 32, 200):
        kernel = "io_small" if n <= small_max else "io_forward" if n >= 32 else None
        x = torch.randn(1, n, 96)  # N = n tokens
        calls.clear()
        with torch.no_grad():
            y = block(x)
        assert calls == ([kernel] if kernel else []), n
        torch.testing.assert_close(y, x @ dense.t() + block.bias.detach(), rtol=1e-5, atol=1e-5)
    calls.clear()
    block(torch.randn(3, 96, requires_grad=True)).sum().backward()  # training: autograd's path
    assert calls == []
    torch.set_num_threads(2)  # several torch threads: the kernels only when built with OpenMP
    with torch.no_grad():
        for n in (1, 200):
            x = torch.randn(n, 96)
            torch.testing.assert_close(block(x), x @ dense.t() + block.bias.detach(), rtol=1e-5, atol=1e-5)
    assert calls == (["io_small", "io_forward"] if real.openmp else [])


@needs_native
@pytest.mark.parametrize("family", ["phi3", "qwen2", "opt", "phi3-hybrid"])  # fused qkv/gate_up, biases on
@pytest.mark.parametrize("threads", [1, 2])  # q/k/v, biases everywhere, grouped + low-rank blocks
def test_whole_model_logits_with_and_without_kernels(isa, family, threads):
    """End to end: a shrunk tiny model's prefill (64 tokens x 3 sequences: the fused forward) and
    its KV-cache decode (1 token: io_small, with the low-rank term for hybrid blocks) give the
    same logits with the kernels on and off."""
    from gpconv import GPConvConfig, shrink

    from tiny_models import FAMILIES, MCPG

    base, hybrid = family.split("-")[0], family.endswith("-hybrid")
    build, _, _ = FAMILIES[base]
    model = build()
    shrink(model, GPConvConfig(min_channels_per_group=MCPG, init="project", permute=(base == "qwen2"),
                               variant="hybrid" if hybrid else "io", rank=3 if hybrid else None))
    model = model.eval()
    ids = torch.randint(3, 128, (3, 64))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = {}
        for on in (True, False):
            with layers.use_kernels(native=on), torch.no_grad():
                full = model(ids).logits
                past = model(ids[:, :60], use_cache=True).past_key_values
                steps = []
                for t in range(60, 64):
                    o = model(ids[:, t:t + 1], past_key_values=past, use_cache=True)
                    past = o.past_key_values
                    steps.append(o.logits[:, -1])
            out[on] = (full, torch.stack(steps))
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[True][1], out[True][0][:, 60:].transpose(0, 1), rtol=1e-4, atol=1e-4)


@needs_block_kernels
def test_decode_path_does_not_build_the_gather_index(monkeypatch, one_thread, block_isa):
    """The gather index is built only by the paths that read it: a 1-token call through the C
    kernel leaves the block's cache empty, a 20-token call (gather + bmm) fills it."""
    route(monkeypatch, small_max_tokens=8)  # 20 tokens: gather + bmm on every CPU
    block = GroupedPointwiseBlock(96, 160, 8, bias=True)
    dense = block.to_dense().detach()
    block._gather_cache.clear()
    with torch.no_grad():
        x = torch.randn(1, 96)
        torch.testing.assert_close(block(x), x @ dense.t() + block.bias, rtol=1e-5, atol=1e-5)
        assert not block._gather_cache
        x = torch.randn(20, 96)
        torch.testing.assert_close(block(x), x @ dense.t() + block.bias, rtol=1e-5, atol=1e-5)
    assert len(block._gather_cache) == 1


def _hybrid_ref(x, block):
    """The hybrid block's output by its dense map (io part and low-rank term), in float64."""
    ref = x.double() @ block.to_dense().double().t()
    return ref if block.bias is None else ref + block.bias.double()


@needs_block_kernels
@pytest.mark.parametrize("n_in, n_out, g", FUSED_SHAPES)
@pytest.mark.parametrize("r", [1, 5, 9, 17])  # below, at and across the 8-wide vectors
@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("threads", [1, 3])
def test_io_small_adds_the_low_rank_term(block_isa, n_in, n_out, g, r, n, threads):
    """io_small with a hybrid block's A, B: y = io block + (x A^T) B^T (+ bias), every tail of
    the 8-output and 8-wide rank loops, written only inside y."""
    torch.manual_seed(r * 31 + n)
    block = GroupedPointwiseBlock(n_in, n_out, g, bias=True, rank=r)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(n, n_in)
    w, b, a, bb = (t.detach() for t in (block.weight, block.bias, block.lowrank_a, block.lowrank_b))
    buf, y = _guarded(n * n_out)
    native.ext.io_small(x.data_ptr(), w.data_ptr(), b.data_ptr(), y.data_ptr(), n, n_in, n_out, g, threads,
                            x.data_ptr(), a.data_ptr(), bb.data_ptr(), r)
    assert _guards_intact(buf)
    torch.testing.assert_close(y.view(n, n_out).double(), _hybrid_ref(x, block), rtol=1e-5, atol=1e-5)


@needs_native
def test_low_rank_term_only_with_io_small():
    x = torch.zeros(64)
    with pytest.raises(ValueError, match="low-rank term"):
        native.ext.io_forward(x.data_ptr(), x.data_ptr(), 0, x.data_ptr(), 1, 8, 8, 2, 1,
                                  x.data_ptr(), x.data_ptr(), x.data_ptr(), 2)


@needs_block_kernels
@pytest.mark.parametrize("permuted", [False, True])
def test_hybrid_block_routes_and_matches(monkeypatch, one_thread, block_isa, permuted):
    """A hybrid block (io + low rank): decode (<= 8 tokens) is one io_small call carrying the
    low-rank term (no torch matmul for it), other sizes keep their routes and add it with torch;
    every route gives the dense map, the permutation applying to the io part only."""
    calls = []
    real = native.ext

    class Spy:
        def __getattr__(self, name):
            fn = getattr(real, name)
            return (lambda *a: calls.append((name, len(a))) or fn(*a)) if name.startswith("io_") else fn

    monkeypatch.setattr(native, "ext", Spy())
    torch.manual_seed(1)
    block = GroupedPointwiseBlock(96, 160, 8, bias=True, rank=6, permuted=permuted)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    if permuted:
        block.input_perm.copy_(torch.randperm(96))
    route(monkeypatch, small_max_tokens=8)  # the default off AMD's AVX-512 (9: torch)
    for n, kernel in [(1, ("io_small", 13)), (8, ("io_small", 13)), (9, None), (32, ("io_forward", 9)),
                     (200, ("io_forward", 9))]:
        x = torch.randn(1, n, 96)
        calls.clear()
        with torch.no_grad():
            y = block(x)
        assert calls == ([kernel] if kernel else []), n
        torch.testing.assert_close(y[0].double(), _hybrid_ref(x[0], block), rtol=1e-5, atol=1e-5)


@needs_block_kernels
def test_training_only_the_low_rank_term_takes_autograd(one_thread, block_isa):
    """LoRA-style: the grouped weight frozen, A and B trained. A 1-token step must not go through
    the C kernel (it has no backward): A and B get autograd's gradients."""
    torch.manual_seed(2)
    block = GroupedPointwiseBlock(96, 160, 8, bias=False, rank=4)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    block.weight.requires_grad_(False)
    x = torch.randn(1, 96)
    block(x).square().sum().backward()
    a, b = block.lowrank_a.detach().requires_grad_(True), block.lowrank_b.detach().requires_grad_(True)
    io = x @ block.to_dense().detach().t() - (x @ a.t() @ b.t()).detach()  # the frozen io part alone
    (io + x @ a.t() @ b.t()).square().sum().backward()
    torch.testing.assert_close(block.lowrank_a.grad, a.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(block.lowrank_b.grad, b.grad, rtol=1e-4, atol=1e-4)
