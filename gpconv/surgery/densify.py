"""The way back: every gpconv block replaced by the exact dense layer it computes."""

from __future__ import annotations

import torch
from torch import nn

from ..hfutil import conv1d_types
from ..layers import is_gpconv_module
from .plan import set_submodule


@torch.no_grad()
def densify(model: nn.Module) -> nn.Module:
    """Replace every gpconv block by the exact dense layer it computes, in place.

    The result is a plain model of the base architecture: GPT-2 blocks go back to ``Conv1D``.
    """
    for name, mod in list(model.named_modules()):
        if not is_gpconv_module(mod):
            continue
        w = mod.to_dense()  # (out, in)
        bias = mod.bias
        if mod.source == "conv1d":
            (conv1d,) = conv1d_types()
            new = conv1d(mod.out_features, mod.in_features)
            new.weight = nn.Parameter(w.t().contiguous())
            new.bias = nn.Parameter(bias.detach().clone() if bias is not None else torch.zeros(mod.out_features, dtype=w.dtype, device=w.device))
        else:
            new = nn.Linear(mod.in_features, mod.out_features, bias=bias is not None, device="meta")
            new.weight = nn.Parameter(w.contiguous())
            if bias is not None:
                new.bias = nn.Parameter(bias.detach().clone())
        new.train(mod.training)
        set_submodule(model, name, new)
    cfg = getattr(model, "config", None)
    for k in ("gpconv", "auto_map"):
        if cfg is not None and hasattr(cfg, k):
            delattr(cfg, k)
    if hasattr(model, "_gpconv_plan"):
        del model._gpconv_plan
    return model
