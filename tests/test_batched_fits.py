"""The fits solve their small per-group systems in one batched call on a GPU and one at a time on
the CPU: both give the same blocks (here both run on the CPU, the batched one forced)."""

import pytest
import torch

from gpconv.fitting import fit_chained_, fit_grouped_weight, fit_io_weight, linalg
from gpconv.fitting.grouped import _equal_supports
from gpconv.layers import GroupedPointwiseBlock
from gpconv.surgery import best_split

pytestmark = pytest.mark.usefixtures("one_thread")


def _cov(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, n, generator=g, dtype=torch.float64)
    return x.t() @ x / x.shape[0]


@pytest.mark.parametrize("n_in, n_out, g, permuted", [(48, 60, 4, False), (48, 60, 4, True), (30, 30, 15, True),
                                                      (64, 32, 8, False)])
def test_supports_in_batch_equal_unique_row_by_row(n_in, n_out, g, permuted):
    b = GroupedPointwiseBlock(n_in, n_out, g, permuted=permuted)
    if permuted:
        b.input_perm.copy_(torch.randperm(n_in, generator=torch.Generator().manual_seed(1)))
    idx = b.gather_index()
    got = _equal_supports(idx)
    rows = [torch.unique(idx[j], return_inverse=True, return_counts=True) for j in range(g)]
    if len({len(r[0]) for r in rows}) > 1:
        assert got is None
        return
    support, inv, mult = got
    for j, (u, i, c) in enumerate(rows):
        assert torch.equal(support[j], u) and torch.equal(inv[j], i) and torch.equal(mult[j], c[i])


@pytest.fixture
def force_batched(monkeypatch):
    def run(fn, *args):
        with monkeypatch.context() as m:
            m.setattr(linalg, "batched", lambda t: True)
            return fn(*args)
    return run


@pytest.mark.parametrize("permuted", [False, True])
def test_batched_io_and_grouped_fits_equal_the_loops(force_batched, permuted):
    w = torch.randn(60, 48, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    cov = _cov(48)
    b = GroupedPointwiseBlock(48, 60, 4, permuted=permuted)
    if permuted:
        b.input_perm.copy_(torch.randperm(48, generator=torch.Generator().manual_seed(3)))
    idx = b.gather_index()
    torch.testing.assert_close(force_batched(fit_io_weight, w, 4, idx, cov, 0.1), fit_io_weight(w, 4, idx, cov, 0.1))
    for c in (None, cov):
        torch.testing.assert_close(force_batched(fit_grouped_weight, w, 4, c, 0.1), fit_grouped_weight(w, 4, c, 0.1))


def test_grouped_fit_without_data_is_the_diagonal_blocks():
    w = torch.randn(60, 48, generator=torch.Generator().manual_seed(4))
    got = fit_grouped_weight(w, 4)
    for j in range(4):
        assert torch.equal(got[j], w[j * 15:(j + 1) * 15, j * 12:(j + 1) * 12])


def test_batched_chained_fit_equals_the_loop(force_batched):
    w = torch.randn(48, 48, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    a = GroupedPointwiseBlock(48, 48, 4, variant="chained").double()
    b = GroupedPointwiseBlock(48, 48, 4, variant="chained").double()
    cov = _cov(48, 1)
    force_batched(fit_chained_, a, w, cov, 0.1)
    fit_chained_(b, w, cov, 0.1)
    torch.testing.assert_close(a.g2.weight, b.g2.weight)
    torch.testing.assert_close(a.to_dense(), b.to_dense())


def test_batched_hybrid_split_picks_the_same_block(force_batched):
    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    cov, held = _cov(64, 2), _cov(64, 3)
    args = (64, 96, False, "linear", w, cov, 2000, 8, 0.1, True, held)
    a, b = force_batched(best_split, *args), best_split(*args)
    assert a.spec == b.spec and a.params == b.params
    assert a.error == pytest.approx(b.error, rel=1e-9)
