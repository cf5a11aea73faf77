"""The GPU paths: run only where torch sees a CUDA device (skipped on the CPU CI machine).

What they pin down: on CUDA, in fp32 and bf16, every block variant computes the same map as its
dense equivalent and as the CPU path; the bf16 grouped-GEMM path (``grouped_mm``, SM >= 8.0)
matches the gather + ``bmm`` path, forward and gradients; a shrunk model saved from the GPU
loads back with identical logits; distillation under bf16 autocast lowers the loss, also from a
teacher cache filled on the GPU; the Triton kernels (bf16, fp16, fp32) match the float64
reference, a block trains through them with the gradients of the other paths, and a compiled
block runs them inside its graph.
"""

import pytest
import torch

import gpconv
from gpconv import GPConvConfig, TrainConfig, distill, shrink, train
from gpconv.layers import GroupedPointwiseBlock
from conftest import route

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# (in, out, groups, variant, rank): Phi-3's four projection shapes at 1/8 width, and the variants
CASES = [(384, 1152, 12, "io", 0), (384, 384, 12, "io", 0), (384, 2048, 8, "io", 0), (1024, 384, 32, "io", 0),
         (384, 384, 12, "chained", 0), (384, 384, 12, "io", 16)]


def _block(n_in, n_out, g, variant, rank, seed=0):
    torch.manual_seed(seed)
    b = GroupedPointwiseBlock(n_in, n_out, g, bias=True, variant=variant, rank=rank)
    with torch.no_grad():
        for p in b.parameters():
            p.normal_(0, 0.05)  # low-rank B starts at zero: make every term visible
    return b


def _forward_backward(block, x):
    """y, dx and every parameter's gradient (float32) of one forward + backward of ``block`` on ``x``."""
    block.zero_grad(set_to_none=True)
    x.grad = None
    y = block(x)
    y.float().square().sum().backward()
    return y.float(), x.grad.float(), [p.grad.float() for p in block.parameters()]


@pytest.mark.parametrize("n_in, n_out, g, variant, rank", CASES)
@pytest.mark.parametrize("tokens", [1, 7, 300])  # decode, few tokens, many tokens
def test_cuda_fp32_matches_dense_and_cpu(n_in, n_out, g, variant, rank, tokens):
    cpu = _block(n_in, n_out, g, variant, rank)
    gpu = _block(n_in, n_out, g, variant, rank).cuda()
    x = torch.randn(tokens, n_in)
    y_cpu, y_gpu = cpu(x), gpu(x.cuda())
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, atol=2e-4, rtol=2e-4)
    dense = x.cuda() @ gpu.to_dense().t() + gpu.bias
    torch.testing.assert_close(y_gpu, dense, atol=2e-4, rtol=2e-4)
    y_cpu.square().sum().backward()
    y_gpu.square().sum().backward()
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(q.grad.cpu(), p.grad, atol=2e-3, rtol=2e-3, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("n_in, n_out, g, variant, rank", CASES)
def test_cuda_bf16_grouped_mm_matches_bmm_path(n_in, n_out, g, variant, rank, monkeypatch):
    b = _block(n_in, n_out, g, variant, rank).cuda().to(torch.bfloat16)
    x = torch.randn(300, n_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def run(flag):
        route(monkeypatch, cuda_grouped_mm=flag, triton=False)  # grouped_mm against bmm, the Triton path off
        return _forward_backward(b, x)

    y1, dx1, dw1 = run(True)
    y0, dx0, dw0 = run(False)
    torch.testing.assert_close(y1, y0, atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(dx1, dx0, atol=5e-1, rtol=5e-2)
    for a, c in zip(dw1, dw0):
        torch.testing.assert_close(a, c, atol=5e-1, rtol=5e-2)
    ref = (x.detach().float() @ b.to_dense().float().t() + b.bias.float())
    torch.testing.assert_close(y1, ref, atol=1e-1, rtol=5e-2)


def test_cuda_shrink_save_load_identical_logits(tmp_path):
    model, tok = gpconv.hub.tiny_phi3(seed=0)
    model = model.cuda().eval()
    shrink(model, GPConvConfig(min_channels_per_group=16, init="project"))
    ids = torch.randint(0, model.config.vocab_size, (2, 24), device="cuda")
    with torch.no_grad():
        before = model(input_ids=ids).logits
    gpconv.save_pretrained(model, tmp_path / "m", tok)
    loaded = gpconv.from_pretrained(tmp_path / "m").cuda().eval()
    with torch.no_grad():
        after = loaded(input_ids=ids).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def _small(seed):
    return gpconv.hub.tiny_phi3(seed=seed, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                   num_key_value_heads=4)[0]


def test_cuda_bf16_training_and_distillation_lower_the_loss():
    data = (torch.arange(32 * 32) % 17).view(32, 32)  # a repeating pattern a small model learns fast
    student = _small(1)
    shrink(student, GPConvConfig(min_channels_per_group=16, init="project"))
    cfg = TrainConfig(max_steps=20, batch_size=4, lr=1e-2, precision="bf16", progress=False, save_every=0, log_every=1)
    res = train(student.cuda(), data, cfg)
    ce = [r["loss"] for r in res.history if r["split"] == "train"]
    assert ce[-1] < 0.5 * ce[0]
    # distil a fresh student from the trained one: KL to a sharp teacher must fall too
    fresh = _small(2)
    shrink(fresh, GPConvConfig(min_channels_per_group=16, init="project"))
    res = distill(fresh.cuda(), student, data, cfg)
    kl = [r["loss"] for r in res.history if r["split"] == "train"]
    assert kl[-1] < 0.85 * kl[0]  # only the new blocks train: slower than the CE run above (fp32 CPU: 4.92 -> 3.82)


def test_cuda_teacher_cache_under_bf16_autocast():
    """A cache filled on the GPU (teacher under bf16 autocast) serves every block to a second
    student without running the teacher, and distilling from it lowers the KL."""
    data = (torch.arange(32 * 32) % 17).view(32, 32)
    distinct = len({tuple(r) for r in data.tolist()})
    teacher = _small(1).cuda()
    cfg = TrainConfig(max_steps=16, batch_size=4, lr=1e-2, precision="bf16", progress=False, save_every=0, log_every=1)
    cache = gpconv.TeacherCache(teacher, top_k=8)
    runs = []
    for seed in (2, 3):
        s = _small(seed)
        shrink(s, GPConvConfig(min_channels_per_group=16, init="project"))
        runs.append(distill(s.cuda(), cache, data, cfg))
        if seed == 2:
            computed = cache.teacher_s
    assert len(cache) == distinct and cache.teacher_s == computed  # the second student ran no teacher forward
    kl = [r["loss"] for r in runs[1].history if r["split"] == "train"]
    assert kl[-1] < kl[0]


def test_cuda_calibrated_hybrid_split_matches_cpu():
    """The calibrated surgery (fit init, hybrid split with the channel permutation, sequential,
    corrected) runs where the model is: on the GPU it picks the same block for every layer as on
    the CPU, leaves every tensor on the GPU, and the shrunk models agree up to float rounding."""
    import copy

    from gpconv.surgery import Calibration

    cpu = _small(0)
    gpu = copy.deepcopy(cpu).cuda()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cpu.config.vocab_size, (4, 32), generator=g) for _ in range(4)]
    cfg = GPConvConfig(min_channels_per_group=16, variant="hybrid", init="fit", permute=True)
    reports = [shrink(m, cfg, calibration=Calibration(batches, sequential=True)) for m in (cpu, gpu)]
    picked = [[(m.name, m.variant, m.groups, m.rank) for m in r.modules if m.status == "replaced"] for r in reports]
    assert picked[0] and picked[0] == picked[1]
    assert reports[0].after.non_embedding == reports[1].after.non_embedding
    assert {t.device.type for t in [*gpu.parameters(), *gpu.buffers()]} == {"cuda"}
    ids = batches[0][:2]
    with torch.no_grad():
        a = cpu.eval()(input_ids=ids).logits
        b = gpu.eval()(input_ids=ids.cuda()).logits.cpu()
    torch.testing.assert_close(b, a, atol=2e-3, rtol=2e-3)


# -- the Triton kernels (gpconv.layers.cuda.triton_io) -------------------------------------------

TRITON_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}  # max |err| / max |ref|


def _rel(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n_in, n_out, g, tokens", [(384, 1152, 12, 300), (1024, 384, 32, 7), (384, 2048, 8, 1),
                                                    (3072, 3072, 16, 1024)])
def test_cuda_triton_kernels_match_reference(n_in, n_out, g, tokens, dtype):
    pytest.importorskip("triton")
    from gpconv.layers.cuda import triton_io
    from gpconv.layers.ops import io_reference

    torch.manual_seed(0)
    x = torch.randn(tokens, n_in, device="cuda").to(dtype)
    w = (torch.randn(g, n_out // g, 2 * n_in // g, device="cuda") * 0.05).to(dtype)
    bias, dy = torch.randn(n_out, device="cuda").to(dtype), torch.randn(tokens, n_out, device="cuda").to(dtype)
    perm = torch.randperm(n_in, device="cuda")
    with torch.no_grad():  # float32: IEEE dots, torch's default matmul precision ('highest')
        y = triton_io.io_forward(x, w, bias, perm)
        ref = io_reference(x.double(), w.double(), bias.double(), perm)
    assert _rel(y, ref) <= TRITON_TOL[dtype]
    xp = x.index_select(1, perm)
    xr, wr = xp.double().requires_grad_(), w.double().requires_grad_()
    io_reference(xr, wr, None).backward(dy.double())
    dx, dw = triton_io.io_grads(dy, xp, w)
    assert _rel(dx, xr.grad) <= TRITON_TOL[dtype] and _rel(dw, wr.grad) <= TRITON_TOL[dtype]


@pytest.mark.parametrize("n_in, n_out, g, variant, rank", [c for c in CASES if c[3] == "io"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_triton_block_forward_backward_matches_grouped_mm_and_dense(n_in, n_out, g, variant, rank, dtype,
                                                                         monkeypatch):
    """A GroupedPointwiseBlock (permuted, hybrid where rank > 0) trains through the Triton path
    with the same y and gradients as with it off (grouped_mm / batched GEMMs), and the same map
    as its dense equivalent; the kernels really run (counted)."""
    pytest.importorskip("triton")
    from gpconv.layers.cuda import triton_route

    torch.manual_seed(0)
    b = GroupedPointwiseBlock(n_in, n_out, g, bias=True, rank=rank, permuted=True)
    with torch.no_grad():
        for p in b.parameters():
            p.normal_(0, 0.05)
        b.input_perm.copy_(torch.randperm(n_in))
    b = b.cuda().to(dtype)
    x = torch.randn(300, n_in, device="cuda", dtype=dtype, requires_grad=True)
    calls = []
    real = triton_route.kernels()

    class Counting:
        def io_forward(self, *a):
            calls.append("forward")
            return real.io_forward(*a)

        def io_grads(self, *a):
            calls.append("grads")
            return real.io_grads(*a)

    monkeypatch.setattr(triton_route, "kernels", lambda: Counting())

    def run(flag):
        route(monkeypatch, triton=flag)
        return _forward_backward(b, x)

    y1, dx1, dw1 = run(True)
    assert calls == ["forward", "grads"]
    y0, dx0, dw0 = run(False)
    assert calls == ["forward", "grads"]  # off: not called again
    tol = dict(atol=5e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=2e-4, rtol=2e-4)
    gtol = dict(atol=5e-1, rtol=5e-2) if dtype == torch.bfloat16 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(y1, y0, **tol)
    torch.testing.assert_close(dx1, dx0, **gtol)
    for a, c in zip(dw1, dw0):
        torch.testing.assert_close(a, c, **gtol)
    ref = x.detach().float() @ b.to_dense().float().t() + b.bias.float()
    torch.testing.assert_close(y1, ref, **tol)


def test_cuda_triton_block_under_torch_compile():
    """torch.compile of a block on CUDA: the op's CUDA kernel (the Triton path) runs inside the
    compiled graph, with eager's outputs and gradients and no graph break."""
    pytest.importorskip("triton")
    torch.manual_seed(0)
    b = _block(384, 1152, 12, "io", 16).cuda().to(torch.bfloat16)
    x = torch.randn(257, 384, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y_eager = b(x)
    y_eager.float().square().sum().backward()
    g_eager = [x.grad.clone()] + [p.grad.clone() for p in b.parameters()]
    b.zero_grad(set_to_none=True)
    x.grad = None
    compiled = torch.compile(b, fullgraph=True)
    y = compiled(x)
    y.float().square().sum().backward()
    torch.testing.assert_close(y, y_eager, atol=2e-2, rtol=2e-2)
    for a, c in zip([x.grad] + [p.grad for p in b.parameters()], g_eager):
        torch.testing.assert_close(a.float(), c.float(), atol=5e-1, rtol=5e-2)
