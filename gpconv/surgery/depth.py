"""Depth truncation: keep some decoder layers, drop the rest.

The kphi-3 report's 2- and 3-layer models are Phi-3 cut to its first 2 and 3 decoder layers;
``keep_first(n)`` does that. ``layer_importance`` ranks layers on calibration data by how much
each changes the hidden state (1 - cosine between a layer's input and output, averaged over
tokens): the layers that change it least are the cheapest to drop (a depth-pruning baseline).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import GPConvError
from .calibrate import Calibration, decoder_layers, run_model


def _stack(model: nn.Module):
    found = decoder_layers(model)
    if found is None:
        raise GPConvError("depth truncation needs a stack of decoder layers (an nn.ModuleList); none found")
    return found


def num_layers(model: nn.Module) -> int:
    return len(_stack(model)[1])


def check_keep(model: nn.Module, keep: Sequence[int]) -> list[int]:
    n = num_layers(model)
    keep = list(keep)
    if not keep:
        raise GPConvError("keep at least one decoder layer")
    bad = [i for i in keep if not 0 <= i < n]
    if bad:
        raise GPConvError(f"layer index {bad[0]} is out of range: the model has layers 0..{n - 1}")
    if len(set(keep)) != len(keep):
        raise GPConvError(f"layer indices repeat in {keep}")
    return sorted(keep)


def truncate(model: nn.Module, keep: Sequence[int]) -> nn.Module:
    """Keep decoder layers ``keep`` (in model order), in place; renumber their cache indices."""
    keep = check_keep(model, keep)
    name, layers = _stack(model)
    new = nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(new):
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = new_idx  # KV caches are indexed by layer position
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)
    cfg = getattr(model, "config", None)
    if cfg is not None:
        types = getattr(cfg, "layer_types", None)
        cfg.num_hidden_layers = len(keep)
        if isinstance(types, (list, tuple)) and len(types) >= max(keep) + 1:
            cfg.layer_types = [types[i] for i in keep]
    return model


@torch.no_grad()
def layer_importance(model: nn.Module, calib: Calibration) -> list[float]:
    """Per decoder layer, the mean ``1 - cos(h_in, h_out)`` over calibration tokens."""
    _, layers = _stack(model)
    device = next(model.parameters()).device
    scores = torch.zeros(len(layers), dtype=torch.float64)
    counts = torch.zeros(len(layers), dtype=torch.float64)
    handles = []
    for i, layer in enumerate(layers):
        def hook(mod, args, kwargs, out, i=i):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = out[0] if isinstance(out, tuple) else out
            cos = torch.nn.functional.cosine_similarity(h_in.double(), h_out.double(), dim=-1)
            scores[i] += (1 - cos).sum().cpu()
            counts[i] += cos.numel()
        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    try:
        for b in calib.batches:
            run_model(model, b.to(device))
    finally:
        for h in handles:
            h.remove()
    return (scores / counts.clamp_min(1)).tolist()


def most_important(model: nn.Module, n: int, calib: Calibration) -> list[int]:
    """The ``n`` layers that change the hidden state most (ties keep the earlier layer)."""
    s = layer_importance(model, calib)
    order = sorted(range(len(s)), key=lambda i: (-s[i], i))
    return sorted(order[:n])
