import pytest
import torch

from gpconv import GPConvError
from gpconv.layers import divisors, group_count, interleave, interleave_index


# The worked values: Phi-3 shapes at min_channels_per_group=256 (hidden 3072).
@pytest.mark.parametrize(
    "n_in, n_out, expected",
    [
        (3072, 9216, 12),  # qkv
        (3072, 3072, 12),  # o
        (3072, 18432, 12),  # gate_up, intermediate 9216
        (3072, 16384, 8),  # gate_up, intermediate 8192
        (9216, 3072, 32),  # down, intermediate 9216
        (8192, 3072, 32),  # down, intermediate 8192
    ],
)
def test_group_count_phi3_shapes(n_in, n_out, expected):
    assert group_count(n_in, n_out, 256) == expected


def _countdown(a, b, bound):  # the paper's definition, as a slow oracle
    d = max(1, min(a, b, bound))
    while a % d or b % d:
        d -= 1
    return d


@pytest.mark.parametrize("a", [1, 7, 12, 64, 96, 576, 1536, 3072])
@pytest.mark.parametrize("b", [1, 9, 32, 192, 576, 1536, 9216])
@pytest.mark.parametrize("mcpg", [1, 2, 16, 64, 256])
def test_group_count_equals_countdown_definition(a, b, mcpg):
    assert group_count(a, b, mcpg) == _countdown(a, b, a // mcpg)


def test_group_count_rejects_bad_min_channels():
    with pytest.raises(GPConvError, match="positive"):
        group_count(64, 64, 0)
    with pytest.raises(GPConvError):
        group_count(64, 64, -3)


def test_divisors():
    assert divisors(1) == [1]
    assert divisors(36) == [1, 2, 3, 4, 6, 9, 12, 18, 36]
    assert divisors(97) == [1, 97]


def test_interleave_matches_paper_definition():
    # view (..., in/g, g), swap the last two axes
    x = torch.arange(24.0).view(2, 12)
    y = interleave(x, 3)
    ref = x.view(2, 4, 3).transpose(-1, -2).reshape(2, 12)
    assert torch.equal(y, ref)
    assert y[0].tolist() == [0, 3, 6, 9, 1, 4, 7, 10, 2, 5, 8, 11]
    assert torch.equal(x[..., interleave_index(12, 3)], y)


def test_interleaved_group_draws_on_every_group():
    # with in/g >= g, each new group holds channels of every old group: that is the mixing
    g, n = 4, 32
    idx = interleave_index(n, g).view(g, n // g)
    for j in range(g):
        assert set((idx[j] // (n // g)).tolist()) == set(range(g))
