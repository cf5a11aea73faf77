"""The grouped-matmul paths (grouped conv for many tokens, gather + bmm for few) against plain
references: forward, backward, permutations, odd shapes, torch.compile.

Correctness only: speed lives in benchmarks/bench_block.py.
"""

import pytest
import torch

from conftest import route
from gpconv.layers import GroupedLinear, GroupedPointwiseBlock, grouped_forward, interleave, io_forward
from gpconv.layers.cpu import dispatch
from gpconv.layers.cuda import grouped_mm

# (in, out, groups): odd sizes, c != oc, c == 1, many groups
SHAPES = [(12, 18, 3), (20, 10, 5), (96, 32, 8), (64, 128, 4), (6, 9, 3), (30, 30, 15)]


@pytest.fixture(params=["many", "many-strided", "few"])
def path(request, monkeypatch):
    """Run a test on each CPU path: the thresholds decide, so force every way.

    many: bmm / hand-written backward with contiguous GEMM outputs (what several threads use);
    many-strided: the same writing through strided outputs (one thread); few: gather + bmm.
    """
    p = request.param
    route(monkeypatch, conv_min_tokens=10**9 if p == "few" else 0)
    monkeypatch.setattr(dispatch, "strided_out", lambda: p == "many-strided")
    return p


def _reference(block: GroupedPointwiseBlock, x: torch.Tensor) -> torch.Tensor:
    """The paper's formula in plain autograd ops: G1(x[perm]) + G2(interleave(x[perm])) + bias."""
    g, c = block.groups, block.in_features // block.groups
    xs = x if block.input_perm is None else x[..., block.input_perm]
    lead = xs.shape[:-1]
    x2 = xs.reshape(-1, block.in_features)
    own = x2.view(-1, g, c).transpose(0, 1)  # (N, in) -> (g, N, c)
    mixed = interleave(x2, g).view(-1, g, c).transpose(0, 1)
    w1, w2 = block.weight[:, :, :c], block.weight[:, :, c:]
    y = torch.bmm(own, w1.transpose(1, 2)) + torch.bmm(mixed, w2.transpose(1, 2))  # (g, N, oc)
    y = y.transpose(0, 1).reshape(*lead, block.out_features)
    if block.rank:
        y = y + x @ block.lowrank_a.t() @ block.lowrank_b.t()
    return y if block.bias is None else y + block.bias


def _inputs(kind: str, n_in: int) -> torch.Tensor:
    if kind == "one-token":
        return torch.randn(1, n_in, dtype=torch.double)
    if kind == "3d":
        return torch.randn(2, 5, n_in, dtype=torch.double)
    if kind == "non-contiguous":
        return torch.randn(n_in, 7, dtype=torch.double).t()  # (7, in) with strides (1, 7)
    if kind == "sliced":
        return torch.randn(3, 4, 2 * n_in, dtype=torch.double)[..., ::2]  # stride-2 channels
    raise ValueError(kind)


@pytest.mark.parametrize("n_in, n_out, g", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("permuted", [False, True])
@pytest.mark.parametrize("kind", ["one-token", "3d", "non-contiguous", "sliced"])
def test_io_forward_backward_match_reference(path, n_in, n_out, g, bias, permuted, kind):
    b = GroupedPointwiseBlock(n_in, n_out, g, bias=bias, permuted=permuted).double()
    if permuted:
        b.input_perm.copy_(torch.randperm(n_in))
    x0 = _inputs(kind, n_in)

    x = x0.clone().requires_grad_(True)
    y = b(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    fast = (y.detach(), x.grad, *(p.grad.clone() for p in b.parameters()))

    b.zero_grad(set_to_none=True)
    xr = x0.clone().requires_grad_(True)
    yr = _reference(b, xr)
    yr.backward(dy)
    ref = (yr.detach(), xr.grad, *(p.grad.clone() for p in b.parameters()))

    assert y.shape == (*x0.shape[:-1], n_out)
    for a, r in zip(fast, ref):
        torch.testing.assert_close(a, r)
    # and the dense equivalent still agrees
    torch.testing.assert_close(fast[0], x0 @ b.to_dense().t() + (b.bias.detach() if bias else 0))
    # inference (no_grad) takes the autograd-free path: same numbers
    with torch.no_grad():
        torch.testing.assert_close(b(x0), fast[0])


@pytest.mark.parametrize("K", ["io", "grouped"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("permuted", [False, True])
def test_gradcheck_double(path, K, bias, permuted):
    if K == "grouped" and permuted:
        pytest.skip("a plain grouped map has no permutation")
    n_in, n_out, g = 12, 6, 3
    c = n_in // g
    k = 2 * c if K == "io" else c
    x = torch.randn(4, n_in, dtype=torch.double, requires_grad=True)
    w = torch.randn(g, n_out // g, k, dtype=torch.double, requires_grad=True)
    bb = torch.randn(n_out, dtype=torch.double, requires_grad=True) if bias else None
    blk = GroupedPointwiseBlock(n_in, n_out, g, permuted=permuted)
    if permuted:
        blk.input_perm.copy_(torch.randperm(n_in))
    perm, idx = blk.input_perm, blk.gather_index()
    inputs = (x, w) if bb is None else (x, w, bb)

    def f(*t):
        b = t[2] if len(t) > 2 else None
        if K == "io":
            return io_forward(t[0], t[1], b, g, idx, perm)
        return grouped_forward(t[0], t[1], b, g)

    assert torch.autograd.gradcheck(f, inputs)
    # the same map as the dense matrix it stands for
    if K == "io":
        from gpconv.layers import io_dense

        dense = io_dense(w.detach(), idx, n_in)
    else:
        dense = torch.block_diag(*w.detach().unbind(0))
    torch.testing.assert_close(f(*inputs), x @ dense.t() + (bb if bias else 0))


@pytest.mark.parametrize("K", ["io", "grouped"])
def test_weight_gradient_arrives_contiguous(path, K):
    """The weight gradient reaches AccumulateGrad in the parameter's own layout, so it is kept
    rather than copied (a transposed one cost a strided copy of the whole gradient)."""
    if K == "io":
        m = GroupedPointwiseBlock(24, 12, 4, bias=True)
    else:
        m = GroupedLinear(24, 12, 4, bias=True)
    seen = []
    m.weight.register_hook(lambda grad: seen.append(grad.is_contiguous()))
    m(torch.randn(3, 24, requires_grad=True)).sum().backward()
    assert seen == [True]


def test_gradient_only_where_asked(path):
    b = GroupedPointwiseBlock(24, 12, 4, bias=True)
    b.weight.requires_grad_(False)
    x = torch.randn(5, 24, requires_grad=True)
    b(x).sum().backward()
    assert b.weight.grad is None and b.bias.grad is not None and x.grad is not None
    # input without grad, weights with: x gets none
    b.weight.requires_grad_(True)
    x2 = torch.randn(5, 24)
    b(x2).sum().backward()
    assert b.weight.grad is not None and x2.grad is None


@pytest.mark.parametrize("n_in, n_out, g", [(12, 18, 3), (64, 64, 8)])
def test_grouped_linear_and_chained_match_reference(path, n_in, n_out, g):
    lin = GroupedLinear(n_in, n_out, g, bias=True).double()
    x = torch.randn(3, 4, n_in, dtype=torch.double, requires_grad=True)
    y = lin(x)
    y.backward(torch.ones_like(y))
    xr = x.detach().clone().requires_grad_(True)
    wr = lin.weight.detach().clone().requires_grad_(True)
    own = xr.reshape(-1, g, n_in // g).transpose(0, 1)  # (N, in) -> (g, N, c)
    yr = torch.bmm(own, wr.transpose(1, 2)).transpose(0, 1).reshape(3, 4, n_out) + lin.bias.detach()
    yr.backward(torch.ones_like(yr))
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(lin.weight.grad, wr.grad)

    ch = GroupedPointwiseBlock(n_in, n_out, g, variant="chained", bias=True).double()
    xc = torch.randn(5, n_in, dtype=torch.double)
    h = xc @ ch.g1.to_dense().t()
    torch.testing.assert_close(ch(xc), h + interleave(h, g) @ ch.g2.to_dense().t() + ch.bias)


def test_hybrid_grads_reach_everything(path):
    b = GroupedPointwiseBlock(32, 48, 4, bias=True, rank=3, permuted=True).double()
    b.input_perm.copy_(torch.randperm(32))
    torch.nn.init.normal_(b.lowrank_b)
    x = torch.randn(6, 32, dtype=torch.double, requires_grad=True)
    y = b(x)
    y.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in b.named_parameters()}
    xg = x.grad.clone()
    b.zero_grad(set_to_none=True)
    xr = x.detach().clone().requires_grad_(True)
    _reference(b, xr).square().sum().backward()
    torch.testing.assert_close(xg, xr.grad)
    for n, p in b.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=n)


def test_state_dict_layout_unchanged(path):
    b = GroupedPointwiseBlock(64, 128, 4, bias=True, permuted=True)
    sd = b.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {"weight": (4, 32, 32), "bias": (128,), "input_perm": (64,)}
    b2 = GroupedPointwiseBlock(64, 128, 4, bias=True, permuted=True)
    b2.load_state_dict(sd)
    x = torch.randn(3, 64)
    torch.testing.assert_close(b2(x), b(x))


def test_permutation_change_is_seen(path):
    # the gather index is cached: changing input_perm in place must invalidate it
    b = GroupedPointwiseBlock(16, 16, 4, permuted=True).double()
    x = torch.randn(2, 16, dtype=torch.double, requires_grad=True)
    b(x).sum().backward()
    b.input_perm.copy_(torch.randperm(16))
    x.grad = None
    y = b(x)
    y.backward(torch.ones_like(y))
    xr = x.detach().clone().requires_grad_(True)
    _reference(b, xr).backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, xr.grad)


def test_autocast_cpu_bfloat16(path):
    b = GroupedPointwiseBlock(64, 32, 4, bias=True)
    x = torch.randn(5, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = b(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), b(x), atol=5e-2, rtol=5e-2)
    for n in (5, 40, 200):  # inference too: a few tokens, narrow groups, many (the C kernels' routes)
        x = torch.randn(n, 64)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            y = b(x)
        assert y.dtype == torch.bfloat16, n
        with torch.no_grad():
            torch.testing.assert_close(y.float(), b(x), atol=5e-2, rtol=5e-2)


def test_empty_batch(path):
    b = GroupedPointwiseBlock(12, 18, 3, bias=True)
    assert b(torch.randn(0, 12)).shape == (0, 18)
    assert b(torch.randn(2, 0, 12)).shape == (2, 0, 18)


def test_grouped_mm_path_semantics():
    """The CUDA bf16 path cannot run here; its layout logic can, through torch's CPU fallback."""
    b = GroupedPointwiseBlock(64, 32, 4, bias=True, permuted=True)
    b.input_perm.copy_(torch.randperm(64))
    assert not grouped_mm.usable(torch.randn(2, 64), b.weight)  # never on CPU
    if not hasattr(torch.nn.functional, "grouped_mm"):
        pytest.skip("this torch has no grouped_mm")
    bb = b.to(torch.bfloat16)
    x = torch.randn(7, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        try:
            y = grouped_mm.io_forward(x, bb.weight, bb.bias, bb.gather_index(x.device))
        except (RuntimeError, NotImplementedError) as e:
            pytest.skip(f"grouped_mm has no CPU fallback here: {e}")
        torch.testing.assert_close(y.float(), bb(x).float(), atol=3e-2, rtol=3e-2)


def test_torch_compile_matches_eager():
    """A failure to compile is a failure: the CI machine has the C++ compiler inductor needs."""
    torch._dynamo.reset()
    b = GroupedPointwiseBlock(24, 36, 3, bias=True, permuted=True)
    b.input_perm.copy_(torch.randperm(24))
    x = torch.randn(2, 5, 24)
    y_eager = b(x)
    y_eager.sum().backward()
    g_eager = b.weight.grad.clone()
    b.zero_grad(set_to_none=True)
    cb = torch.compile(b, fullgraph=True)
    y = cb(x)
    y.sum().backward()
    torch.testing.assert_close(y, y_eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.weight.grad, g_eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_in, n_out, g", [(64, 128, 4), (96, 32, 8), (48, 40, 1)])  # g = 1: a transpose is a view
def test_inference_scratch_buffer_never_leaks(monkeypatch, path, n_in, n_out, g):
    """The two-GEMM path reuses buffers for the interleaved copy and (several threads) the
    (g, N, oc) GEMM result: outputs must not alias them, in inference and in training."""
    route(monkeypatch, fused_forward=False)  # the fused forward has no scratch
    b = GroupedPointwiseBlock(n_in, n_out, g, bias=True)
    xa, xb = torch.randn(9, n_in), torch.randn(9, n_in)
    ya = b(xa)  # training forward (grad enabled)
    ya_before = ya.detach().clone()
    b(xb)
    torch.testing.assert_close(ya.detach(), ya_before, rtol=0, atol=0)
    xs = [torch.randn(n, n_in) for n in (9, 3, 9, 1)]
    with torch.no_grad():
        ys = [b(x) for x in xs]  # later calls overwrite the buffer earlier calls used
        for x, y in zip(xs, ys):
            torch.testing.assert_close(y, x @ b.to_dense().t() + b.bias)
    with torch.inference_mode():
        torch.testing.assert_close(b(xs[0]), ys[0])
    with torch.no_grad():  # the inference-mode buffer is not reused outside inference mode
        torch.testing.assert_close(b(xs[2]), ys[2])
    dispatch.clear_scratch()


@pytest.mark.parametrize("n_in, n_out, g", [(64, 128, 4), (96, 32, 8)])
def test_backward_takes_a_non_contiguous_upstream_gradient(path, n_in, n_out, g):
    """The hand-written backward views dY as (g, N, oc): a transposed dY must still be right."""
    b = GroupedPointwiseBlock(n_in, n_out, g, bias=True).double()
    x = torch.randn(9, n_in, dtype=torch.double, requires_grad=True)
    dy = torch.randn(n_out, 9, dtype=torch.double).t()  # (9, out) with strides (1, 9)
    assert not dy.is_contiguous()
    b(x).backward(dy)
    xr = x.detach().clone().requires_grad_(True)
    (xr @ b.to_dense().detach().t() + b.bias.detach()).backward(dy)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(b.bias.grad, dy.sum(0))
    from gpconv.layers import io_dense

    wp = b.weight.detach().clone().requires_grad_(True)  # the block's weight through its dense map
    (x.detach() @ io_dense(wp, b.gather_index(), n_in).t()).backward(dy)
    torch.testing.assert_close(b.weight.grad, wp.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.double])  # float32: the native kernels where built
def test_training_saves_only_the_input_and_blocks_share_the_buffers(path, dtype):
    """Training keeps x (not its interleaved copy) for the backward, and two io blocks in a row
    (each overwriting the reused interleave / d_mixed buffers) still get exact gradients."""
    b1 = GroupedPointwiseBlock(96, 64, 8, bias=True).to(dtype)
    b2 = GroupedPointwiseBlock(64, 96, 4).to(dtype)
    x0 = torch.randn(2, 11, 96, dtype=dtype)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    x = x0.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h = b1(x)
    if path != "few":  # the hand-written backward: x (N, in) and the weight, nothing else
        assert sorted(saved) == sorted([x.numel(), b1.weight.numel()])
    y = b2(torch.tanh(h))
    dy = torch.randn_like(y)
    y.backward(dy)

    xr = x0.clone().requires_grad_(True)
    w1, w2 = b1.to_dense().detach().requires_grad_(True), b2.to_dense().detach().requires_grad_(True)
    yr = torch.tanh(xr @ w1.t() + b1.bias.detach()) @ w2.t()
    yr.backward(dy)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else {}
    torch.testing.assert_close(y, yr, **tol)
    torch.testing.assert_close(x.grad, xr.grad, **tol)
    from gpconv.layers import io_dense

    for blk, wd in ((b1, w1), (b2, w2)):  # the block's weight gradient through its dense map
        wp = blk.weight.detach().clone().requires_grad_(True)
        dense = io_dense(wp, blk.gather_index(), blk.in_features)
        (wd.grad * dense).sum().backward()
        torch.testing.assert_close(blk.weight.grad, wp.grad, **tol)
    dispatch.clear_scratch()
