"""The group rule and the channel interleave of the kphi-3 block.

Everything here is integer bookkeeping; the modules in :mod:`gpconv.layers` use it.
"""

from __future__ import annotations

import math

import torch

from ..errors import GPConvError


def divisors(n: int) -> list[int]:
    """All positive divisors of ``n`` in increasing order (trial division up to sqrt(n))."""
    if n <= 0:
        raise ValueError(f"divisors() needs a positive integer, got {n}")
    small, large = [], []
    d = 1
    while d * d <= n:
        if n % d == 0:
            small.append(d)
            if d * d != n:
                large.append(n // d)
        d += 1
    return small + large[::-1]


def group_count(in_features: int, out_features: int, min_channels_per_group: int) -> int:
    """Number of groups the paper's rule gives a layer ``in_features -> out_features``.

    The largest common divisor of ``in_features`` and ``out_features`` that is not above
    ``in_features // min_channels_per_group`` (the kphi-3 report's
    ``get_max_acceptable_common_divisor``), taken from the divisors of their gcd rather than by
    counting down. Returns 1 when no divisor above 1 fits, i.e. the layer stays dense.

    >>> group_count(3072, 9216, 256), group_count(9216, 3072, 256)
    (12, 32)
    """
    if min_channels_per_group <= 0:
        raise GPConvError(f"min_channels_per_group must be a positive integer, got {min_channels_per_group}")
    if in_features <= 0 or out_features <= 0:
        raise GPConvError(f"layer sizes must be positive, got {in_features} -> {out_features}")
    bound = in_features // min_channels_per_group
    fitting = [d for d in divisors(math.gcd(in_features, out_features)) if d <= bound]
    return fitting[-1] if fitting else 1


def interleave_index(features: int, groups: int) -> torch.Tensor:
    """Index ``idx`` with ``interleave(x, groups) == x[..., idx]``.

    New channel ``b * (features // groups) + a`` is old channel ``a * groups + b``: new group ``b``
    takes every ``groups``-th channel starting at ``b``, so it draws on every old group.
    """
    if features % groups:
        raise ValueError(f"{features} channels do not split into {groups} groups")
    per_group = features // groups
    # (per_group, groups) grid of old indices, read column by column.
    return torch.arange(features).view(per_group, groups).t().reshape(features)


def interleave(x: torch.Tensor, groups: int) -> torch.Tensor:
    """The paper's channel interleave with stride ``groups`` on the last axis."""
    features = x.shape[-1]
    per_group = features // groups
    x = x.reshape(*x.shape[:-1], per_group, groups)  # (..., F) -> (..., F/g, g)
    x = x.transpose(-1, -2)  # (..., F/g, g) -> (..., g, F/g)
    return x.reshape(*x.shape[:-2], features)  # (..., g, F/g) -> (..., F)
