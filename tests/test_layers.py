import pytest
import torch

from gpconv.layers import BlockSpec, GroupedLinear, GroupedPointwiseBlock, LowRankLinear, interleave

SHAPES = [(12, 18, 3), (64, 128, 4), (64, 64, 8), (48, 96, 6), (96, 32, 8), (128, 64, 16)]


def _grouped_loop(x, w):
    """Reference grouped linear: a Python loop over groups. w: (g, out/g, in/g)."""
    g = w.shape[0]
    xs = x.chunk(g, dim=-1)
    return torch.cat([xs[j] @ w[j].t() for j in range(g)], dim=-1)


@pytest.mark.parametrize("n_in, n_out, g", SHAPES)
def test_grouped_linear_matches_loop_and_dense(n_in, n_out, g):
    lin = GroupedLinear(n_in, n_out, g, bias=True).double()
    x = torch.randn(3, 5, n_in, dtype=torch.double)
    y = lin(x)
    assert y.shape == (3, 5, n_out)
    torch.testing.assert_close(y, _grouped_loop(x, lin.weight) + lin.bias)
    torch.testing.assert_close(y, x @ lin.to_dense().t() + lin.bias)
    assert sum(p.numel() for p in lin.parameters()) == n_in * n_out // g + n_out


@pytest.mark.parametrize("n_in, n_out, g", SHAPES)
@pytest.mark.parametrize("variant, rank", [("io", 0), ("chained", 0), ("io", 3)])
@pytest.mark.parametrize("bias", [False, True])
def test_block_matches_paper_formula_and_dense(n_in, n_out, g, variant, rank, bias):
    b = GroupedPointwiseBlock(n_in, n_out, g, bias=bias, variant=variant, rank=rank).double()
    if rank:
        torch.nn.init.normal_(b.lowrank_b)  # starts at zero; make the term visible
    x = torch.randn(2, 7, n_in, dtype=torch.double)
    y = b(x)
    if variant == "io":
        c = n_in // g
        g1, g2 = b.weight[:, :, :c], b.weight[:, :, c:]
        ref = _grouped_loop(x, g1) + _grouped_loop(interleave(x, g), g2)  # y = G1(x) + G2(interleave(x))
    else:
        h = _grouped_loop(x, b.g1.weight)
        ref = h + _grouped_loop(interleave(h, g), b.g2.weight)  # h = G1(x); y = h + G2(interleave(h))
    if rank:
        ref = ref + x @ b.lowrank_a.t() @ b.lowrank_b.t()
    if bias:
        ref = ref + b.bias
    torch.testing.assert_close(y, ref)
    dense = x @ b.to_dense().t() + (b.bias if bias else 0)
    torch.testing.assert_close(y, dense)
    assert sum(p.numel() for p in b.parameters()) == b.spec.num_params


def test_io_block_keeps_two_over_g_of_dense():
    b = GroupedPointwiseBlock(3072, 9216, 12)
    assert b.spec.num_params == 2 * 3072 * 9216 // 12
    assert b.spec.num_params / b.spec.dense_params == pytest.approx(2 / 12)


def test_block_backward_reaches_all_weights():
    b = GroupedPointwiseBlock(64, 128, 4, bias=True, rank=2)
    torch.nn.init.normal_(b.lowrank_b)
    x = torch.randn(4, 64, requires_grad=True)
    b(x).square().sum().backward()
    for name, p in b.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad is not None


def test_lowrank_linear():
    m = LowRankLinear(20, 30, 4, bias=True)
    x = torch.randn(5, 20)
    torch.testing.assert_close(m(x), x @ m.to_dense().t() + m.bias)
    assert m.to_dense().shape == (30, 20)
    assert torch.linalg.matrix_rank(m.to_dense()) <= 4
    assert sum(p.numel() for p in m.parameters()) == m.spec.num_params == 4 * 50 + 30


def test_permuted_block_reads_through_permutation():
    b = GroupedPointwiseBlock(32, 32, 4, permuted=True).double()
    x = torch.randn(3, 32, dtype=torch.double)
    y0 = b(x)
    perm = torch.randperm(32)
    b.input_perm.copy_(perm)
    # a permuted block on x equals the unpermuted block on x[perm]
    ref = GroupedPointwiseBlock(32, 32, 4).double()
    ref.weight.data.copy_(b.weight.data)
    torch.testing.assert_close(b(x), ref(x[:, perm]))
    torch.testing.assert_close(b(x), x @ b.to_dense().t())
    assert not torch.allclose(y0, b(x))
    assert "input_perm" in b.state_dict()


@pytest.mark.parametrize(
    "spec",
    [
        BlockSpec(64, 128, "io", 4),
        BlockSpec(64, 128, "chained", 4, bias=True),
        BlockSpec(64, 128, "hybrid", 4, rank=5),
        BlockSpec(64, 128, "lowrank", 1, rank=7, source="conv1d"),
        BlockSpec(64, 64, "io", 8, permuted=True),
    ],
)
def test_spec_roundtrip_and_build(spec):
    assert BlockSpec.from_dict(spec.to_dict()) == spec
    m = spec.build()
    assert m.spec == spec
    assert sum(p.numel() for p in m.parameters()) == spec.num_params


def test_spec_validation():
    with pytest.raises(ValueError):
        BlockSpec(64, 100, "io", 8)
    with pytest.raises(ValueError):
        BlockSpec(64, 64, "hybrid", 4, rank=0)
    with pytest.raises(ValueError):
        BlockSpec(64, 64, "zigzag", 4)
    with pytest.raises(ValueError):
        BlockSpec.from_dict({"in_features": 4, "out_features": 4, "frobnicate": 1})


def test_meta_device_block_has_no_storage():
    b = GroupedPointwiseBlock(3072, 8192, 8, device="meta")
    assert b.weight.is_meta
    assert b.spec.num_params == 2 * 3072 * 8192 // 8
