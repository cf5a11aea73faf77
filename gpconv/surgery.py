"""Surgery: one config, one walk over any ``nn.Module``, dense layers swapped in place.

``shrink(model, GPConvConfig(...))`` first plans every replacement and checks everything (the
patterns match, the sizes divide, tied weights are left alone); only then does it touch the model.
A failed check raises :class:`~gpconv.errors.GPConvError` and leaves the model as it was.
Running it twice changes nothing: converted layers are recognised and reported as ``already``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .errors import GPConvError
from .grouping import group_count
from .init import INITS, init_block_
from .layers import VARIANTS, BlockSpec, is_gpconv_module
from .report import ModuleReport, ParamCounts, ShrinkReport, count_parameters, linear_shape, module_kind, output_embedding

PRESETS = ("all-linear", "attention", "mlp")
PLAN_FORMAT = 1

Patterns = str | Sequence[str]


@dataclass(frozen=True)
class GPConvConfig:
    """Everything that decides which layers become which blocks.

    Patterns (``target_modules``, ``exclude_modules`` and the keys of
    ``min_channels_per_group_overrides``) follow one rule: a pattern matches a module whose full
    dotted name equals it, ends with ``"." + pattern``, or fully matches it as a regular
    expression. The presets ``"all-linear"``, ``"attention"`` and ``"mlp"`` select by role;
    presets never select the output layer (``lm_head``). A list matches if any entry does.
    """

    target_modules: Patterns = "all-linear"
    """Which linear layers to replace (GPT-2's Conv1D counts as linear)."""
    exclude_modules: Patterns | None = None
    """Layers never to touch, even when a target pattern matches them."""
    min_channels_per_group: int = 256
    """The paper's knob: groups = largest common divisor of in and out <= in // this."""
    min_channels_per_group_overrides: Mapping[str, int] = field(default_factory=dict)
    """Per-pattern values of ``min_channels_per_group``; the first matching pattern wins."""
    variant: str = "io"
    """'io' (G1(x) + G2(interleave(x)), the report's default), 'chained', 'hybrid' or 'lowrank'."""
    init: str = "random"
    """'random' (train from scratch), 'project' (closest in weights) or 'fit' (closest on data)."""
    rank: float | int | None = None
    """Low-rank size for 'hybrid' / 'lowrank': an int rank, or a float in (0, 1] = fraction of the
    layer's dense parameters to spend on the low-rank term. For 'lowrank' with None, the rank that
    matches the io block's size at ``min_channels_per_group``."""
    ridge: float = 1e-2
    """Ridge of the least-squares fits, relative to the mean input energy."""

    def __post_init__(self):
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if isinstance(self.exclude_modules, list):
            object.__setattr__(self, "exclude_modules", tuple(self.exclude_modules))
        if not isinstance(self.min_channels_per_group, int) or self.min_channels_per_group <= 0:
            raise GPConvError(f"min_channels_per_group must be a positive integer, got {self.min_channels_per_group!r}")
        for pat, v in self.min_channels_per_group_overrides.items():
            if not isinstance(v, int) or v <= 0:
                raise GPConvError(f"min_channels_per_group override {pat!r}={v!r} must be a positive integer")
        if self.variant not in VARIANTS:
            raise GPConvError(f"unknown variant {self.variant!r}; choose one of: {', '.join(VARIANTS)}")
        if self.init not in INITS:
            raise GPConvError(f"unknown init {self.init!r}; choose one of: {', '.join(INITS)}")
        if self.variant == "hybrid" and self.rank is None:
            raise GPConvError("variant 'hybrid' needs rank (an int, or a fraction of each layer's parameters)")
        if self.rank is not None and not (
            (isinstance(self.rank, int) and self.rank > 0) or (isinstance(self.rank, float) and 0 < self.rank <= 1)
        ):
            raise GPConvError(f"rank must be a positive int or a fraction in (0, 1], got {self.rank!r}")
        for pats in (self.target_modules, self.exclude_modules or (), *self.min_channels_per_group_overrides):
            for p in _as_list(pats):
                _compile(p)

    def settings(self) -> dict:
        d = asdict(self)
        d["min_channels_per_group_overrides"] = dict(self.min_channels_per_group_overrides)
        for k in ("target_modules", "exclude_modules"):
            if isinstance(d[k], tuple):
                d[k] = list(d[k])
        return d


# --------------------------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------------------------


def _as_list(patterns) -> list[str]:
    if patterns is None:
        return []
    return [patterns] if isinstance(patterns, str) else list(patterns)


_REGEX_CACHE: dict[str, re.Pattern | None] = {}


def _compile(pattern: str) -> re.Pattern | None:
    if pattern in PRESETS:
        return None
    if pattern not in _REGEX_CACHE:
        try:
            _REGEX_CACHE[pattern] = re.compile(pattern)
        except re.error as e:
            raise GPConvError(f"pattern {pattern!r} is neither a module name nor a valid regex ({e})") from None
    return _REGEX_CACHE[pattern]


def pattern_matches(pattern: str, name: str, kind: str, is_output: bool) -> bool:
    if pattern in PRESETS:
        if is_output:
            return False
        return pattern == "all-linear" or pattern == kind
    if name == pattern or name.endswith("." + pattern):
        return True
    rx = _compile(pattern)
    return bool(rx.fullmatch(name))


def _first_match(patterns, name, kind, is_output) -> str | None:
    for p in _as_list(patterns):
        if pattern_matches(p, name, kind, is_output):
            return p
    return None


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------


@dataclass
class _Planned:
    name: str
    module: nn.Module
    kind: str
    in_features: int
    out_features: int
    source: str
    spec: BlockSpec | None  # None: stays dense
    status: str
    reason: str = ""


def _lowrank_rank(cfg: GPConvConfig, n_in: int, n_out: int, groups: int) -> int:
    dense = n_in * n_out
    if isinstance(cfg.rank, int):
        return cfg.rank
    if cfg.rank is not None:
        return max(1, int(cfg.rank * dense // (n_in + n_out)))
    # match the io block of this size: 2*in*out/g parameters
    return max(1, (2 * dense // max(groups, 1)) // (n_in + n_out))


def plan_module(cfg: GPConvConfig, name: str, n_in: int, n_out: int, bias: bool, source: str) -> tuple[BlockSpec | None, str]:
    """The block one layer becomes under ``cfg``, or ``(None, why it stays dense)``."""
    mcpg = cfg.min_channels_per_group
    for pat, v in cfg.min_channels_per_group_overrides.items():
        if pattern_matches(pat, name, module_kind(name), False):
            mcpg = v
            break
    g = group_count(n_in, n_out, mcpg)
    dense = n_in * n_out
    if cfg.variant == "lowrank":
        r = _lowrank_rank(cfg, n_in, n_out, g)
        spec = BlockSpec(n_in, n_out, "lowrank", 1, r, bias, source)
    elif cfg.variant == "hybrid":
        if g <= 1:
            return None, f"no common divisor of {n_in} and {n_out} in 2..{n_in // mcpg} (in // min_channels_per_group)"
        spec = BlockSpec(n_in, n_out, "hybrid", g, _lowrank_rank(cfg, n_in, n_out, g), bias, source)
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


def _plan(model: nn.Module, cfg: GPConvConfig, filter_fn) -> tuple[list[_Planned], list[str]]:
    out_emb = output_embedding(model)
    emb_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    planned: list[_Planned] = []
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
        pat = _first_match(cfg.target_modules, name, kind, is_output)
        if pat is None:
            continue
        used_patterns.add(pat)
        if _first_match(cfg.exclude_modules, name, kind, is_output) is not None:
            continue
        if filter_fn is not None and not filter_fn(mod, name):
            continue
        n_in, n_out = shape
        if converted:
            planned.append(_Planned(name, mod, kind, n_in, n_out, mod.source, mod.spec, "already", "converted earlier"))
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
            _Planned(name, mod, kind, n_in, n_out, source, spec, "replaced" if spec else "dense", reason)
        )
    unmatched = [p for p in _as_list(cfg.target_modules) if p not in used_patterns]
    return planned, unmatched


def _module_report(p: _Planned) -> ModuleReport:
    dense = p.in_features * p.out_features
    if p.spec is None:
        return ModuleReport(p.name, p.kind, p.in_features, p.out_features, p.status, "dense", 1, 0, dense, dense, p.reason)
    bias = p.out_features if p.spec.bias else 0
    return ModuleReport(
        p.name, p.kind, p.in_features, p.out_features, p.status, p.spec.variant, p.spec.groups, p.spec.rank,
        dense, p.spec.num_params - bias, p.reason,
    )


def _dense_weight(mod: nn.Module, source: str) -> torch.Tensor:
    return mod.weight.t() if source == "conv1d" else mod.weight  # -> (out, in)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def shrink(
    model: nn.Module,
    config: GPConvConfig | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    *,
    calibration: Mapping[str, torch.Tensor] | None = None,
    dry_run: bool = False,
    model_name: str | None = None,
) -> ShrinkReport:
    """Replace ``model``'s dense layers by grouped pointwise blocks, in place.

    Args:
        model: any ``nn.Module`` (a transformers model stays its own class).
        config: what to replace and how; ``GPConvConfig()`` replaces every linear layer but
            ``lm_head`` with the paper's io block at ``min_channels_per_group=256``.
        filter_fn: ``filter_fn(module, name) -> bool``, a further say on each matched layer.
        calibration: for ``init="fit"``: input second moments ``E[x x^T]`` per module name, as
            :func:`gpconv.calibrate.input_covariances` returns them.
        dry_run: plan and report only; the model is not touched.

    Returns:
        a :class:`~gpconv.report.ShrinkReport` whose counts are recounted from the model.
    """
    cfg = config or GPConvConfig()
    planned, unmatched = _plan(model, cfg, filter_fn)
    if not planned:
        raise GPConvError(
            f"no module matched target_modules={_show(cfg.target_modules)}"
            + (f" (exclude_modules={_show(cfg.exclude_modules)})" if cfg.exclude_modules else "")
            + f"; linear layers here are named like: {_examples(model)}"
        )
    todo = [p for p in planned if p.status == "replaced"]
    if cfg.init == "fit" and todo:
        missing = [p.name for p in todo if calibration is None or p.name not in calibration]
        if missing:
            raise GPConvError(
                f"init='fit' needs calibration statistics; none for {len(missing)} layer(s), e.g. {missing[0]!r}"
            )
    before = count_parameters(model)
    name = model_name or getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    modules = [_module_report(p) for p in planned]
    if dry_run:
        saved = sum(m.dense_params - m.kept_params for m in modules if m.status == "replaced")
        flops = 2 * saved
        after = ParamCounts(
            before.total - saved, before.embedding, before.non_embedding - saved,
            before.linear_flops_per_token - flops,
        )
        return ShrinkReport(name, cfg.settings(), before, after, modules, unmatched, dry_run=True)

    for p in todo:
        old = p.module
        w = old.weight
        new = p.spec.build(device=w.device, dtype=w.dtype)
        if w.device.type != "meta":
            cov = calibration.get(p.name) if calibration is not None else None
            init_block_(new, _dense_weight(old, p.source), getattr(old, "bias", None), cfg.init, cov, cfg.ridge)
        new.train(old.training)
        _set_submodule(model, p.name, new)
        p.module = new
    record_plan(model)
    after = count_parameters(model)
    return ShrinkReport(name, cfg.settings(), before, after, modules, unmatched)


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
    if plan.get("format") != PLAN_FORMAT:
        raise GPConvError(f"unsupported gpconv plan format {plan.get('format')!r} (this gpconv reads {PLAN_FORMAT})")
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
        _set_submodule(model, name, new)
    record_plan(model)
    return model


def _show(patterns) -> str:
    return repr(patterns if isinstance(patterns, str) else list(patterns))


def _examples(model: nn.Module, n: int = 4) -> str:
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
            p = _Planned(name, mod, module_kind(name), s.in_features, s.out_features, s.source, s, "already")
        elif (shape := linear_shape(mod)) is not None:
            p = _Planned(name, mod, module_kind(name), shape[0], shape[1], "", None, "dense")
        else:
            continue
        modules.append(_module_report(p))
    counts = count_parameters(model)
    name = model_name or getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    return ShrinkReport(name, {}, counts, counts, modules)
