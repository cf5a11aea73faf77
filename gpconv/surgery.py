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
from .init import DEFAULT_RIDGE, INITS
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
    """'io' (G1(x) + G2(interleave(x)), the report's default), 'chained', 'hybrid' or 'lowrank'.
    'hybrid' without ``rank``: each layer gets the io block's budget (at ``min_channels_per_group``)
    and spends it on the least-error of low-rank, io, or io with g groups + low-rank, g allowed
    down to ``gpconv.budget.HYBRID_MIN_CHANNELS`` channels per group."""
    init: str = "random"
    """'random' (train from scratch), 'project' (closest in weights) or 'fit' (closest on data)."""
    rank: float | int | None = None
    """Low-rank size for 'hybrid' / 'lowrank': an int rank, or a float in (0, 1] = fraction of the
    layer's dense parameters to spend on the low-rank term. For 'lowrank' with None, the rank that
    matches the io block's size at ``min_channels_per_group``."""
    ridge: float = DEFAULT_RIDGE
    """Strength of the fits' pull toward the dense weights, relative to the mean input energy
    (``lambda = ridge * mean(diag E[x x^T])``). Larger is closer to ``project`` and more robust
    to inputs that drift from the calibration data (docs/quality.md)."""
    permute: bool = False
    """io / hybrid: also try a channel order per layer that keeps correlated inputs in one group
    (stored as an index, free at run time); kept only where it lowers the measured error."""
    target_params: float | int | str | None = None
    """Land at or just under this many non-embedding parameters: a fraction (0.25) or a count
    ("53M"). The budget solver then picks each layer's block from its menu (see gpconv.budget),
    ``min_channels_per_group`` acting as the smallest group size allowed."""
    num_layers: int | None = None
    """Depth truncation: keep this many decoder layers (the first ones, or the most important
    ones with ``layer_selection="importance"``)."""
    keep_layers: tuple[int, ...] | None = None
    """Depth truncation: keep exactly these decoder layers (0-based)."""
    layer_selection: str = "first"
    """'first' (the paper's cut) or 'importance' (needs calibration: drop the layers that change
    the hidden state least)."""
    measure_options: bool = False
    """Also report, per replaced layer, the held-out error of the other options at the same size
    (io project / io fit / low-rank / hybrid). Costs a few extra fits per layer."""

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
        if self.keep_layers is not None:
            object.__setattr__(self, "keep_layers", tuple(self.keep_layers))
        if self.num_layers is not None and (not isinstance(self.num_layers, int) or self.num_layers < 1):
            raise GPConvError(f"num_layers must be a positive integer, got {self.num_layers!r}")
        if self.num_layers is not None and self.keep_layers is not None:
            raise GPConvError("give num_layers or keep_layers, not both")
        if self.layer_selection not in ("first", "importance"):
            raise GPConvError(f"layer_selection must be 'first' or 'importance', got {self.layer_selection!r}")
        if self.target_params is not None:
            from .budget import parse_target

            parse_target(self.target_params, 10**18)  # syntax check; the model is not known yet
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
        for k in ("target_modules", "exclude_modules", "keep_layers"):
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
    error: float | None = None  # relative reconstruction error after init (held-out when measured)
    options: dict | None = None  # measure_options: error of each alternative at the same size


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
    mcpg = _mcpg(cfg, name)
    g = group_count(n_in, n_out, mcpg)
    dense = n_in * n_out
    if cfg.variant == "lowrank":
        r = _lowrank_rank(cfg, n_in, n_out, g)
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
        return ModuleReport(p.name, p.kind, p.in_features, p.out_features, p.status, "dense", 1, 0, dense, dense,
                            p.reason, p.error, p.options)
    bias = p.out_features if p.spec.bias else 0
    return ModuleReport(
        p.name, p.kind, p.in_features, p.out_features, p.status, p.spec.variant, p.spec.groups, p.spec.rank,
        dense, p.spec.num_params - bias, p.reason + (", permuted" if p.spec.permuted else ""), p.error, p.options,
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
    calibration=None,
    dry_run: bool = False,
    model_name: str | None = None,
) -> ShrinkReport:
    """Replace ``model``'s dense layers by grouped pointwise blocks, in place.

    Args:
        model: any ``nn.Module`` (a transformers model stays its own class).
        config: what to replace and how; ``GPConvConfig()`` replaces every linear layer but
            ``lm_head`` with the paper's io block at ``min_channels_per_group=256``.
        filter_fn: ``filter_fn(module, name) -> bool``, a further say on each matched layer.
        calibration: a :class:`gpconv.calibrate.Calibration` (token batches; ``sequential=True``
            fits layer by layer on the shrunk prefix). Needed by ``init="fit"`` and by
            ``layer_selection="importance"``; makes budget choices and reported errors data-aware.
        dry_run: plan and report only; the model is not touched.

    Returns:
        a :class:`~gpconv.report.ShrinkReport` whose counts are recounted from the model.
    """
    from .calibrate import Calibration

    cfg = config or GPConvConfig()
    if calibration is not None and not isinstance(calibration, Calibration):
        raise GPConvError("calibration must be a gpconv.calibrate.Calibration (token batches)")
    if cfg.init == "fit" and calibration is None:
        raise GPConvError("init='fit' needs calibration data (a gpconv.calibrate.Calibration of token batches)")
    if cfg.layer_selection == "importance" and (cfg.num_layers or cfg.keep_layers) and calibration is None:
        raise GPConvError("layer_selection='importance' needs calibration data")
    name = model_name or getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    before = count_parameters(model)
    meta = any(p.is_meta for p in model.parameters())

    # 1. depth: truncation changes which layers exist, so it comes first
    keep = _layers_to_keep(model, cfg, calibration)
    if keep is not None:
        from .depth import truncate

        if dry_run:
            model = _copy_for_dry_run(model)
        truncate(model, keep)

    # 2. plan: which layers match, what block each gets by the group rule
    planned, unmatched = _plan(model, cfg, filter_fn)
    if not planned and keep is None:
        raise GPConvError(
            f"no module matched target_modules={_show(cfg.target_modules)}"
            + (f" (exclude_modules={_show(cfg.exclude_modules)})" if cfg.exclude_modules else "")
            + f"; linear layers here are named like: {_examples(model)}"
        )
    fresh = [p for p in planned if p.status != "already"]

    # 3. allocation: a parameter target, or the hybrid's grouped / low-rank split
    stats = None
    needs_alloc = cfg.target_params is not None or (cfg.variant == "hybrid" and cfg.rank is None)
    if calibration is not None and not meta and fresh and (needs_alloc or not calibration.sequential):
        from .calibrate import collect_stats

        stats = collect_stats(model, calibration, [p.name for p in fresh])
    target = None
    if needs_alloc and fresh:
        target = _allocate(model, cfg, fresh, planned, stats, before, meta)

    todo = [p for p in planned if p.status == "replaced"]
    if dry_run:
        after = count_parameters(model) if keep is not None else before
        saved = sum(p.in_features * p.out_features - _kept(p) for p in todo)
        after = ParamCounts(after.total - saved, after.embedding, after.non_embedding - saved,
                            after.linear_flops_per_token - 2 * saved)
        return ShrinkReport(name, cfg.settings(), before, after, [_module_report(p) for p in planned], unmatched,
                            dry_run=True, target_non_embedding=target, layers_kept=keep)

    # 4. fit and swap, layer by layer (sequentially on the shrunk prefix if asked)
    refined = None
    if not meta and todo:
        if calibration is not None and calibration.sequential:
            from .calibrate import run_sequential

            by_name = {p.name: p for p in todo}
            layers_refined: list[dict] = []
            run_sequential(model, calibration, list(by_name),
                           lambda st: [_fit_swap(model, by_name[n], cfg, st[n]) for n in st],
                           on_refined=lambda li, b, a: layers_refined.append({"layer": li, "before": b, "after": a}))
            refined = layers_refined or None
        else:
            for p in todo:
                _fit_swap(model, p, cfg, stats.get(p.name) if stats else None)
    elif todo:  # meta: shapes only
        for p in todo:
            _swap(model, p, p.spec.build(device="meta", dtype=p.module.weight.dtype))
    record_plan(model)
    after = count_parameters(model)
    return ShrinkReport(name, cfg.settings(), before, after, [_module_report(p) for p in planned], unmatched,
                        target_non_embedding=target, layers_kept=keep, refined=refined)


def _kept(p: _Planned) -> int:
    return p.spec.num_params - (p.out_features if p.spec.bias else 0)


def _copy_for_dry_run(model):
    import copy

    return copy.deepcopy(model)


def _layers_to_keep(model, cfg: GPConvConfig, calibration) -> list[int] | None:
    from .depth import check_keep, most_important, num_layers

    if cfg.keep_layers is not None:
        return check_keep(model, cfg.keep_layers)
    if cfg.num_layers is None:
        return None
    n = num_layers(model)
    if cfg.num_layers > n:
        raise GPConvError(f"num_layers={cfg.num_layers} but the model has only {n} decoder layers")
    if cfg.layer_selection == "importance":
        return most_important(model, cfg.num_layers, calibration)
    return list(range(cfg.num_layers))


def _swap(model, p: _Planned, new: nn.Module) -> None:
    new.train(p.module.training)
    _set_submodule(model, p.name, new)
    p.module = new
    p.spec = new.spec


def _fit_swap(model, p: _Planned, cfg: GPConvConfig, stats) -> None:
    from .init import fit_layer

    old = p.module
    weight = _dense_weight(old, p.source)
    if stats is not None and stats.cross is not None and cfg.init != "random":
        weight = stats.target(weight, cfg.ridge)  # sequential: match the dense model's output
    new, err = fit_layer(p.spec, weight, getattr(old, "bias", None), cfg.init, stats, cfg.ridge, cfg.permute)
    if cfg.measure_options and cfg.init != "random":
        from .budget import option_errors

        p.options = option_errors(new.spec, weight, stats, _split_mcpg(cfg, p.name), cfg.ridge)
    p.error = err
    _swap(model, p, new)


def _allocate(model, cfg: GPConvConfig, fresh: list[_Planned], planned, stats, before, meta) -> int | None:
    """Pick each fresh layer's block from its menu (budget solver), updating ``p.spec`` in place.

    Returns the non-embedding target, or None for the hybrid split (no global target).
    """
    from .budget import bounded, layer_options, parse_target, solve

    family = cfg.variant
    if cfg.target_params is None:  # hybrid split within the io block's budget: no menus needed
        for p in fresh:
            if p.spec is not None:
                _split(p, _kept(p), cfg, stats, meta)
        return None
    by_role = meta or cfg.init == "random"  # no per-layer signal: same choice for same-role layers
    menus = {}
    for p in fresh:
        w = None if meta else _dense_weight(p.module, p.source)
        cov = stats[p.name].fit if stats else None
        held = stats[p.name].held_out if stats else None
        bias = getattr(p.module, "bias", None) is not None
        menus[p.name] = layer_options(family, p.in_features, p.out_features, bias, p.source, w, cov,
                                      _mcpg(cfg, p.name), cfg.ridge, cov_eval=held)
    fixed = count_parameters(model).non_embedding - sum(p.in_features * p.out_features for p in fresh)
    target = parse_target(cfg.target_params, before.non_embedding)
    if by_role:
        roles: dict[tuple, list[_Planned]] = {}
        for p in fresh:
            roles.setdefault((p.name.rsplit(".", 1)[-1], p.in_features, p.out_features), []).append(p)
        merged = {}
        for key, ps in roles.items():
            merged[key] = _merge_menus([menus[p.name] for p in ps])
        choice = solve(bounded(merged, target - fixed), target - fixed)
        picks = {p.name: choice[key][i] for key, ps in roles.items() for i, p in enumerate(ps)}
    else:
        picks = solve(bounded(menus, target - fixed), target - fixed)
    for p in fresh:
        opt = picks[p.name]
        p.spec = opt.spec
        if opt.spec is None:
            p.status, p.reason = "dense", "budget solver kept it dense"
        else:
            p.status, p.reason = "replaced", ""
            if family == "hybrid":  # the solver gave this layer a budget: split it by error
                _split(p, opt.params, cfg, stats, meta)
    return target


def _split_mcpg(cfg: GPConvConfig, name: str) -> int:
    """The narrowest group a hybrid split of layer ``name`` may use. With ``target_params``,
    ``min_channels_per_group`` is that limit; without it, it sets the layer's budget (the io
    block's), and the split's grouped part may go down to ``HYBRID_MIN_CHANNELS`` per group."""
    from .budget import HYBRID_MIN_CHANNELS

    mcpg = _mcpg(cfg, name)
    return mcpg if cfg.target_params is not None else min(mcpg, HYBRID_MIN_CHANNELS)


def _split(p: _Planned, budget: int, cfg: GPConvConfig, stats, meta: bool) -> None:
    """Set ``p.spec`` to the least-error grouped / low-rank / hybrid block within ``budget``,
    grouped parts no narrower than :func:`_split_mcpg` allows."""
    from .budget import best_split, layer_options

    bias = getattr(p.module, "bias", None) is not None
    if meta:  # no weights: the largest pure option that fits (the size-only menu)
        menu = layer_options("hybrid", p.in_features, p.out_features, bias, p.source, None, None, _mcpg(cfg, p.name))
        fits = [o for o in menu if o.spec is not None and o.params <= budget]
        if fits:
            p.spec = max(fits, key=lambda o: (o.params, -o.error)).spec
        return
    st = stats[p.name] if stats else None
    best = best_split(p.in_features, p.out_features, bias, p.source, _dense_weight(p.module, p.source),
                      st.fit if st else None, budget, _split_mcpg(cfg, p.name), cfg.ridge, cfg.permute,
                      cov_eval=st.held_out if st else None)
    if best is not None:
        p.spec = best.spec


def _merge_menus(menus):
    """Menus of same-shaped layers as one menu of per-layer option lists (same choice for all)."""
    first = menus[0]
    merged = []
    for i, o in enumerate(first):
        opts = [m[i] for m in menus]
        merged.append(_RoleOption(o.spec, sum(x.params for x in opts), sum(x.error for x in opts), opts))
    return merged


@dataclass
class _RoleOption:
    spec: object
    params: int
    error: float
    members: list

    def __getitem__(self, i):
        return self.members[i]


def _mcpg(cfg: GPConvConfig, name: str) -> int:
    for pat, v in cfg.min_channels_per_group_overrides.items():
        if pattern_matches(pat, name, module_kind(name), False):
            return v
    return cfg.min_channels_per_group


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
