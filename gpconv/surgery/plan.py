"""Plans: which block each layer becomes, and the resolved plan a checkpoint stores.

A plan is ``{"format": 1, "modules": {module name: BlockSpec as a dict}}``: the *resolved*
blocks, never the user's patterns, so a file loads the same way in later gpconv versions
(docs/compatibility.md). :func:`apply_plan` rebuilds a saved plan's blocks on a freshly
built model; the modeling file inside every saved checkpoint imports it as
``gpconv.surgery.apply_plan``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import nn

from ..errors import GPConvError
from ..hfutil import linear_shape, output_embedding
from ..layers import BlockSpec, group_count, is_gpconv_module
from .config import GPConvConfig, as_list, first_match, mcpg_for, module_kind
from .report import ModuleReport, ShrinkReport, count_parameters

PLAN_FORMAT = 1


@dataclass
class Planned:
    name: str
    module: nn.Module
    kind: str
    in_features: int
    out_features: int
    source: str
    spec: BlockSpec | None  # None: stays dense
    status: str
    reason: str = ""
    error: float | None = None  # relative reconstruction error after init (held-out when measured)
    options: dict | None = None  # measure_options: error of each alternative at the same size


def lowrank_rank(cfg: GPConvConfig, n_in: int, n_out: int, groups: int) -> int:
    dense = n_in * n_out
    if isinstance(cfg.rank, int):
        return cfg.rank
    if cfg.rank is not None:
        return max(1, int(cfg.rank * dense // (n_in + n_out)))
    # match the io block of this size: 2*in*out/g parameters
    return max(1, (2 * dense // max(groups, 1)) // (n_in + n_out))


def plan_module(cfg: GPConvConfig, name: str, n_in: int, n_out: int, bias: bool, source: str) -> tuple[BlockSpec | None, str]:
    """The block one layer becomes under ``cfg``, or ``(None, why it stays dense)``."""
    mcpg = mcpg_for(cfg, name)
    g = group_count(n_in, n_out, mcpg)
    dense = n_in * n_out
    if cfg.variant == "lowrank":
        r = lowrank_rank(cfg, n_in, n_out, g)
        spec = BlockSpec(n_in, n_out, "lowrank", 1, r, bias, source)
    elif cfg.variant == "hybrid":
        if g <= 1:
            return None, f"no common divisor of {n_in} and {n_out} in 2..{n_in // mcpg} (in // min_channels_per_group)"
        if cfg.rank is None:
            # the budget of the paper's io block; shrink() splits it between grouped and low-rank
            if g <= 2:
                return None, f"groups={g}: the io budget 2/{g} is no saving"
            spec = BlockSpec(n_in, n_out, "io", g, 0, bias, source)
        else:
            spec = BlockSpec(n_in, n_out, "hybrid", g, lowrank_rank(cfg, n_in, n_out, g), bias, source)
    else:
        if g <= 1:
            return None, f"no common divisor of {n_in} and {n_out} in 2..{n_in // mcpg} (in // min_channels_per_group)"
        if cfg.variant == "io" and g <= 2:
            return None, f"groups={g}: an io block keeps 2/{g} of the parameters, no saving"
        spec = BlockSpec(n_in, n_out, cfg.variant, g, 0, bias, source)
    kept = spec.num_params - (n_out if bias else 0)
    if kept >= dense:
        return None, f"{spec.variant} block would keep {kept:,} >= {dense:,} dense parameters"
    return spec, ""


def plan_model(model: nn.Module, cfg: GPConvConfig, filter_fn) -> tuple[list[Planned], list[str]]:
    out_emb = output_embedding(model)
    emb_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    planned: list[Planned] = []
    used_patterns: set[str] = set()
    inside_gpconv: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(p + ".") for p in inside_gpconv):
            continue
        converted = is_gpconv_module(mod)
        if converted:
            inside_gpconv.append(name)
        shape = (mod.in_features, mod.out_features) if converted else linear_shape(mod)
        if shape is None or not name:
            continue
        kind = module_kind(name)
        is_output = mod is out_emb
        pat = first_match(cfg.target_modules, name, kind, is_output)
        if pat is None:
            continue
        used_patterns.add(pat)
        if first_match(cfg.exclude_modules, name, kind, is_output) is not None:
            continue
        if filter_fn is not None and not filter_fn(mod, name):
            continue
        n_in, n_out = shape
        if converted:
            planned.append(Planned(name, mod, kind, n_in, n_out, mod.source, mod.spec, "already", "converted earlier"))
            continue
        if id(mod.weight) in emb_weights:
            raise GPConvError(
                f"{name!r} shares its weight with the input embeddings (tied); "
                f"exclude it or untie the weights first (patterns: {cfg.target_modules!r})"
            )
        source = "linear" if isinstance(mod, nn.Linear) else "conv1d"
        bias = getattr(mod, "bias", None) is not None
        spec, reason = plan_module(cfg, name, n_in, n_out, bias, source)
        planned.append(
            Planned(name, mod, kind, n_in, n_out, source, spec, "replaced" if spec else "dense", reason)
        )
    unmatched = [p for p in as_list(cfg.target_modules) if p not in used_patterns and p != "none"]
    return planned, unmatched


def module_report(p: Planned) -> ModuleReport:
    dense = p.in_features * p.out_features
    if p.spec is None:
        return ModuleReport(p.name, p.kind, p.in_features, p.out_features, p.status, "dense", 1, 0, dense, dense,
                            p.reason, p.error, p.options)
    bias = p.out_features if p.spec.bias else 0
    return ModuleReport(
        p.name, p.kind, p.in_features, p.out_features, p.status, p.spec.variant, p.spec.groups, p.spec.rank,
        dense, p.spec.num_params - bias, p.reason + (", permuted" if p.spec.permuted else ""), p.error, p.options,
    )


def dense_weight(mod: nn.Module, source: str) -> torch.Tensor:
    return mod.weight.t() if source == "conv1d" else mod.weight  # -> (out, in)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def record_plan(model: nn.Module) -> dict:
    """Keep the plan of ``model``'s blocks on ``model.config.gpconv`` (what a checkpoint stores)."""
    plan = current_plan(model)
    cfg = getattr(model, "config", None)
    if cfg is not None:
        cfg.gpconv = plan
    else:
        model._gpconv_plan = plan
    return plan


def current_plan(model: nn.Module) -> dict:
    """The plan of the gpconv modules ``model`` holds now (recomputed from the modules)."""
    specs = {}
    for name, mod in model.named_modules():
        if is_gpconv_module(mod):
            specs[name] = mod.spec.to_dict()
    return {"format": PLAN_FORMAT, "modules": specs}


def apply_plan(model: nn.Module, plan: Mapping, *, device=None, dtype=None) -> nn.Module:
    """Rebuild the blocks a saved plan names, in place, without initialising from dense weights.

    Used by loading: the replaced layers get fresh (or meta) parameters of the right shapes, and
    the checkpoint's tensors are loaded into them afterwards.
    """
    if not isinstance(plan, Mapping):
        raise GPConvError(f"the gpconv plan is not a mapping of format and modules (it is a {type(plan).__name__}); "
                          "the checkpoint's metadata is damaged, save it again")
    if plan.get("format") != PLAN_FORMAT:
        raise GPConvError(f"unsupported gpconv plan format {plan.get('format')!r} (this gpconv reads {PLAN_FORMAT})")
    if not isinstance(plan.get("modules"), Mapping):
        raise GPConvError("the gpconv plan has no 'modules' mapping (module name -> block); "
                          "the checkpoint's metadata is damaged, save it again")
    specs = {}
    for name, d in plan["modules"].items():
        try:
            spec = BlockSpec.from_dict(dict(d))
            old = model.get_submodule(name)
        except (ValueError, TypeError, AttributeError) as e:
            raise GPConvError(f"the saved gpconv plan does not fit this model at {name!r}: {e}") from None
        if is_gpconv_module(old):
            if old.spec != spec:
                raise GPConvError(f"{name!r} is already a different gpconv block ({old.spec} vs {spec})")
            continue
        shape = linear_shape(old)
        if shape != (spec.in_features, spec.out_features):
            raise GPConvError(f"the saved gpconv plan expects {name!r} to be {spec.in_features}->{spec.out_features}, got {shape}")
        specs[name] = spec
    for name, spec in specs.items():
        old = model.get_submodule(name)
        w = old.weight
        new = spec.build(device=device or w.device, dtype=dtype or w.dtype)
        set_submodule(model, name, new)
    record_plan(model)
    return model


def examples(model: nn.Module, n: int = 4) -> str:
    names = [name for name, m in model.named_modules() if linear_shape(m) is not None and name]
    if not names:
        return "(none: the model has no nn.Linear or Conv1D layers)"
    leaves = []
    for nm in names:
        leaf = nm.rsplit(".", 1)[-1]
        if leaf not in leaves:
            leaves.append(leaf)
    return ", ".join(leaves[:n]) + (", ..." if len(leaves) > n else "") + f" (e.g. {names[0]!r})"


def iter_blocks(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """``(name, module)`` for every gpconv block in ``model``."""
    for name, mod in model.named_modules():
        if is_gpconv_module(mod):
            yield name, mod


def describe(model: nn.Module, model_name: str | None = None) -> ShrinkReport:
    """A report of ``model`` as it is (no surgery): every linear layer but the output layer,
    dense or already converted, with the model's parameter counts."""
    out_emb = output_embedding(model)
    modules = []
    for name, mod in model.named_modules():
        if mod is out_emb or not name:
            continue
        if is_gpconv_module(mod):
            s = mod.spec
            p = Planned(name, mod, module_kind(name), s.in_features, s.out_features, s.source, s, "already")
        elif (shape := linear_shape(mod)) is not None:
            p = Planned(name, mod, module_kind(name), shape[0], shape[1], "", None, "dense")
        else:
            continue
        modules.append(module_report(p))
    counts = count_parameters(model)
    name = model_name or getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    return ShrinkReport(name, {}, counts, counts, modules)
