"""Surgery: one config, one walk over any ``nn.Module``, dense layers swapped in place.

``shrink(model, GPConvConfig(...))`` first plans every replacement and checks everything (the
patterns match, the sizes divide, tied weights are left alone, a budget is reachable); only
then does it touch the model. A failed check raises :class:`~gpconv.errors.GPConvError` and
leaves the model as it was. Running it twice changes nothing: converted layers are recognised
and reported as ``already``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..errors import GPConvError
from ..fitting import fit_layer
from .budget import HYBRID_MIN_CHANNELS, best_split, bounded, check_reachable, layer_options, option_errors, solve
from .calibrate import Calibration, collect_stats, run_sequential
from .config import GPConvConfig, mcpg_for, parse_target, show_patterns
from .depth import check_keep, most_important, num_layers, truncate
from .plan import (Planned, dense_weight, examples, module_report, plan_model, record_plan, set_submodule)
from .report import ParamCounts, ShrinkReport, count_parameters


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
        if dry_run:
            model = _copy_for_dry_run(model)
        truncate(model, keep)

    # 2. plan: which layers match, what block each gets by the group rule
    planned, unmatched = plan_model(model, cfg, filter_fn)
    if not planned and keep is None:
        raise GPConvError(
            f"no module matched target_modules={show_patterns(cfg.target_modules)}"
            + (f" (exclude_modules={show_patterns(cfg.exclude_modules)})" if cfg.exclude_modules else "")
            + f"; linear layers here are named like: {examples(model)}"
        )
    fresh = [p for p in planned if p.status != "already"]

    # 3. allocation: a parameter target, or the hybrid's grouped / low-rank split
    stats = None
    if cfg.target_params is not None and fresh:
        _check_target(model, cfg, fresh, before)  # from the plan's shapes: before calibration runs (minutes)
    needs_alloc = cfg.target_params is not None or (cfg.variant == "hybrid" and cfg.rank is None)
    if calibration is not None and not meta and fresh and (needs_alloc or not calibration.sequential):
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
        return ShrinkReport(name, cfg.settings(), before, after, [module_report(p) for p in planned], unmatched,
                            dry_run=True, target_non_embedding=target, layers_kept=keep)

    # 4. fit and swap, layer by layer (sequentially on the shrunk prefix if asked)
    refined = None
    if not meta and todo:
        if calibration is not None and calibration.sequential:
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
    return ShrinkReport(name, cfg.settings(), before, after, [module_report(p) for p in planned], unmatched,
                        target_non_embedding=target, layers_kept=keep, refined=refined)


def _kept(p: Planned) -> int:
    return p.spec.num_params - (p.out_features if p.spec.bias else 0)


def _copy_for_dry_run(model):
    return copy.deepcopy(model)


def _layers_to_keep(model, cfg: GPConvConfig, calibration) -> list[int] | None:
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


def _swap(model, p: Planned, new: nn.Module) -> None:
    new.train(p.module.training)
    set_submodule(model, p.name, new)
    p.module = new
    p.spec = new.spec


def _fit_swap(model, p: Planned, cfg: GPConvConfig, stats) -> None:
    old = p.module
    weight = dense_weight(old, p.source)
    if stats is not None and stats.cross is not None and cfg.init != "random":
        weight = stats.target(weight, cfg.ridge)  # sequential: match the dense model's output
    new, err = fit_layer(p.spec, weight, getattr(old, "bias", None), cfg.init, stats, cfg.ridge, cfg.permute)
    if cfg.measure_options and cfg.init != "random":
        p.options = option_errors(new.spec, weight, stats, _split_mcpg(cfg, p.name), cfg.ridge)
    p.error = err
    _swap(model, p, new)


def _allocate(model, cfg: GPConvConfig, fresh: list[Planned], planned, stats, before, meta) -> int | None:
    """Pick each fresh layer's block from its menu (budget solver), updating ``p.spec`` in place.

    Returns the non-embedding target, or None for the hybrid split (no global target).
    """
    family = cfg.variant
    if cfg.target_params is None:  # hybrid split within the io block's budget: no menus needed
        for p in fresh:
            if p.spec is not None:
                _split(p, _kept(p), cfg, stats, meta)
        return None
    by_role = meta or cfg.init == "random"  # no per-layer signal: same choice for same-role layers
    menus = {}
    for p in fresh:
        w = None if meta else dense_weight(p.module, p.source)
        cov = stats[p.name].fit if stats else None
        held = stats[p.name].held_out if stats else None
        bias = getattr(p.module, "bias", None) is not None
        menus[p.name] = layer_options(family, p.in_features, p.out_features, bias, p.source, w, cov,
                                      mcpg_for(cfg, p.name), cfg.ridge, cov_eval=held)
    target, left = _budget_left(model, cfg, fresh, before)
    if by_role:
        roles: dict[tuple, list[Planned]] = {}
        for p in fresh:
            roles.setdefault((p.name.rsplit(".", 1)[-1], p.in_features, p.out_features), []).append(p)
        merged = {}
        for key, ps in roles.items():
            merged[key] = _merge_menus([menus[p.name] for p in ps])
        choice = solve(bounded(merged, left), left)
        picks = {p.name: choice[key][i] for key, ps in roles.items() for i, p in enumerate(ps)}
    else:
        picks = solve(bounded(menus, left), left)
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


def _budget_left(model, cfg: GPConvConfig, fresh: list[Planned], before) -> tuple[int, int]:
    """The non-embedding target and what it leaves for the fresh layers (the rest stays as it is)."""
    fixed = count_parameters(model).non_embedding - sum(p.in_features * p.out_features for p in fresh)
    target = parse_target(cfg.target_params, before.non_embedding)
    return target, target - fixed


def _check_target(model, cfg: GPConvConfig, fresh: list[Planned], before) -> None:
    """Refuse an unreachable target_params from the layers' shapes alone (no weights, no data)."""
    _, left = _budget_left(model, cfg, fresh, before)
    menus = {p.name: layer_options(cfg.variant, p.in_features, p.out_features, getattr(p.module, "bias", None) is not None,
                                   p.source, None, None, mcpg_for(cfg, p.name)) for p in fresh}
    check_reachable(bounded(menus, left), left, cfg.target_params)


def _split_mcpg(cfg: GPConvConfig, name: str) -> int:
    """The narrowest group a hybrid split of layer ``name`` may use. With ``target_params``,
    ``min_channels_per_group`` is that limit; without it, it sets the layer's budget (the io
    block's), and the split's grouped part may go down to ``HYBRID_MIN_CHANNELS`` per group."""
    mcpg = mcpg_for(cfg, name)
    return mcpg if cfg.target_params is not None else min(mcpg, HYBRID_MIN_CHANNELS)


def _split(p: Planned, budget: int, cfg: GPConvConfig, stats, meta: bool) -> None:
    """Set ``p.spec`` to the least-error grouped / low-rank / hybrid block within ``budget``,
    grouped parts no narrower than :func:`_split_mcpg` allows."""
    bias = getattr(p.module, "bias", None) is not None
    if meta:  # no weights: the largest pure option that fits (the size-only menu)
        menu = layer_options("hybrid", p.in_features, p.out_features, bias, p.source, None, None, mcpg_for(cfg, p.name))
        fits = [o for o in menu if o.spec is not None and o.params <= budget]
        if fits:
            p.spec = max(fits, key=lambda o: (o.params, -o.error)).spec
        return
    st = stats[p.name] if stats else None
    best = best_split(p.in_features, p.out_features, bias, p.source, dense_weight(p.module, p.source),
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
