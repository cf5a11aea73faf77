"""The io / hybrid block as torch custom ops: registered correctly (opcheck: schema, fake tensors,
autograd, AOT dispatch), compiled models give eager's logits and gradients with no graph break,
and torch.export keeps the op with dynamic batch and sequence lengths."""

import copy

import pytest
import torch

import gpconv
from gpconv.layers import GroupedPointwiseBlock, use_kernels
from tiny_models import FAMILIES, MCPG

pytestmark = pytest.mark.usefixtures("one_thread")

# (in, out, groups, tokens): odd token counts, c != oc, one channel per group, decode
CASES = [(48, 60, 4, 9), (64, 32, 8, 1), (30, 30, 15, 130), (96, 160, 8, 37)]


def _block(n_in, n_out, g, bias, permuted, rank):
    torch.manual_seed(0)
    b = GroupedPointwiseBlock(n_in, n_out, g, bias=bias, rank=rank, permuted=permuted)
    with torch.no_grad():
        if rank:
            b.lowrank_b.normal_()
        if permuted:
            b.input_perm.copy_(torch.randperm(n_in))
    return b


def _args(b, x):
    return (x, b.weight, b.bias, b.input_perm, getattr(b, "lowrank_a", None), getattr(b, "lowrank_b", None))


@pytest.mark.parametrize("n_in, n_out, g, n", CASES)
@pytest.mark.parametrize("bias, permuted, rank", [(False, False, 0), (True, True, 0), (True, False, 3), (False, True, 2)])
def test_io_block_op_passes_opcheck_and_is_the_block(n_in, n_out, g, n, bias, permuted, rank):
    b = _block(n_in, n_out, g, bias, permuted, rank)
    x = torch.randn(n, n_in, requires_grad=True)
    torch.library.opcheck(torch.ops.gpconv.io_block.default, _args(b, x))
    with torch.no_grad():
        y = torch.ops.gpconv.io_block(*_args(b, x))
        torch.testing.assert_close(y, b(x), rtol=1e-5, atol=1e-5)
        dense = x @ b.to_dense().t() + (b.bias if bias else 0)
        torch.testing.assert_close(y, dense, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n_in, n_out, g, n", CASES)
def test_io_block_op_gradients_equal_the_eager_blocks(n_in, n_out, g, n):
    b = _block(n_in, n_out, g, True, True, 3)
    x = torch.randn(n, n_in, requires_grad=True)
    dy = torch.randn(n, n_out)
    y = torch.ops.gpconv.io_block(*_args(b, x))
    grads = torch.autograd.grad(y, [x, b.weight, b.bias, b.lowrank_a, b.lowrank_b], dy)
    ref = torch.autograd.grad(b(x), [x, b.weight, b.bias, b.lowrank_a, b.lowrank_b], dy)
    for a, r in zip(grads, ref):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)
    xp = x.detach()[:, b.input_perm]
    torch.library.opcheck(torch.ops.gpconv.io_grouped_grads.default, (dy, xp, b.weight.detach()))


def test_gather_index_cache_is_not_fooled_by_reused_memory():
    """A new permutation tensor in a freed one's memory (same address, version 0 again) gets its
    own index, not the cached one of the tensor that lived there."""
    import numpy as np

    from gpconv.layers import ops

    arr = np.random.default_rng(0).permutation(16)
    first = torch.from_numpy(arr)
    assert torch.equal(ops.gather_index(16, 4, first, "cpu"), ops.traced_gather_index(16, 4, first))
    arr[:] = np.roll(arr, 1)  # other contents, written where no version counter sees it
    second = torch.from_numpy(arr)
    assert second.data_ptr() == first.data_ptr() and second._version == first._version
    assert torch.equal(ops.gather_index(16, 4, second, "cpu"), ops.traced_gather_index(16, 4, second))


def test_fake_implementation_gives_shapes_without_data():
    from torch._subclasses.fake_tensor import FakeTensorMode

    b = _block(64, 96, 4, True, True, 3)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x = mode.from_tensor(torch.randn(11, 64))
        y = torch.ops.gpconv.io_block(*_args(b, x))
        assert tuple(y.shape) == (11, 96) and y.dtype == torch.float32
        dxp, dw = torch.ops.gpconv.io_grouped_grads(torch.empty(11, 96), x, b.weight)
        assert tuple(dxp.shape) == (11, 64) and tuple(dw.shape) == tuple(b.weight.shape)


def _mixed(family):
    """A tiny model with every variant: attention io (permuted) or low-rank, MLP hybrid or chained."""
    model = FAMILIES[family][0]()
    att, mlp = (("io", "hybrid") if family == "phi3" else ("lowrank", "chained"))
    gpconv.shrink(model, gpconv.GPConvConfig(min_channels_per_group=MCPG, target_modules="attention", variant=att,
                                             init="project", permute=att == "io"))
    gpconv.shrink(model, gpconv.GPConvConfig(min_channels_per_group=MCPG, target_modules="mlp", variant=mlp,
                                             init="project", rank=3 if mlp == "hybrid" else None))
    if family != "phi3":  # the llama model's MLP down projection as a plain io block too
        gpconv.shrink(model, gpconv.GPConvConfig(min_channels_per_group=MCPG, target_modules="o_proj", init="project"))
    return model.eval()


@pytest.mark.parametrize("family", ["phi3", "llama"])
def test_compiled_model_has_no_graph_break_and_eager_logits(family):
    torch._dynamo.reset()
    model = _mixed(family)
    ids = torch.randint(3, 128, (2, 40))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        out = torch.compile(model, fullgraph=True)(ids, use_cache=False).logits  # a graph break raises here
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_compiled_training_step_gives_eager_gradients():
    torch._dynamo.reset()
    b = _block(96, 160, 8, True, True, 3)
    c = copy.deepcopy(b)
    x = torch.randn(2, 70, 96)
    b(x).square().sum().backward()
    torch.compile(c, fullgraph=True)(x).square().sum().backward()
    for (name, p), q in zip(b.named_parameters(), c.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_torch_export_keeps_the_op_with_dynamic_shapes():
    model = _mixed("phi3")
    ids = torch.randint(3, 128, (2, 12))
    dims = {"input_ids": {0: torch.export.Dim("batch", min=1, max=16), 1: torch.export.Dim("seq", min=2, max=128)},
            "use_cache": None}
    ep = torch.export.export(model, (), {"input_ids": ids, "use_cache": False}, dynamic_shapes=dims)
    ops = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.gpconv.io_block.default in ops
    other = torch.randint(3, 128, (3, 29))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(input_ids=other, use_cache=False).logits,
                                   model(other, use_cache=False).logits, rtol=1e-5, atol=1e-5)
    with use_kernels(custom_ops=False):  # plain ops, for exporters that know no gpconv ops
        ep = torch.export.export(model, (), {"input_ids": ids, "use_cache": False}, dynamic_shapes=dims)
    assert not any("gpconv" in str(n.target) for n in ep.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(input_ids=other, use_cache=False).logits,
                                   model(other, use_cache=False).logits, rtol=1e-5, atol=1e-5)
