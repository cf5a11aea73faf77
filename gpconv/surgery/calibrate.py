"""Calibration: what each layer actually sees, measured with forward hooks.

The data-aware inits and the budget solver need, per linear layer, the second moment of its
input ``C = E[x x^T]`` (``in x in``, float64). Everything here collects those from a few
calibration batches of token ids, split into a *fit* part (used to fit blocks) and a *held-out*
part (used to report honest reconstruction errors and to choose between options).

Two modes:

* **parallel** - one pass over the dense model; every layer's statistics come from dense inputs.
* **sequential** - layers are fitted in forward order and each one's statistics come from the
  *already shrunk* prefix, so later layers learn to correct what earlier ones lost. For models
  built as a stack of decoder layers, the inputs of each decoder layer are cached (as in GPTQ),
  so the calibration data goes through each layer a handful of times, not through the whole
  model once per layer.

Layers that read the same tensor (q/k/v, gate/up) share one statistic: it is computed once.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from ..data import DataConfig, build_datasets
from ..errors import GPConvError
from ..schema import updated
from ..fitting import ridge_lambda, token_relative_error
from ..layers import is_gpconv_module


@dataclass
class LayerStats:
    """Input second moments of one layer: ``E[x x^T]`` on fit and on held-out tokens.

    In sequential mode ``cross`` is ``E[x_dense x^T]``: what the *dense* model fed this layer,
    against what the shrunk prefix feeds it now. Fitting to :meth:`target` instead of ``W``
    then makes the block reproduce the dense model's output, correcting the prefix's errors.
    """

    fit: torch.Tensor
    held_out: torch.Tensor | None
    tokens_fit: int
    tokens_held_out: int
    cross: torch.Tensor | None = None

    def target(self, weight: torch.Tensor, ridge: float) -> torch.Tensor:
        """The matrix to fit: ``W`` itself, or with ``cross`` the corrected
        ``M = W (C_ds + lambda I)(C_ss + lambda I)^-1``, since
        ``E||W x_d - B x_s||^2 + lambda||W - B||^2 = const + tr((B - M)(C_ss + lambda I)(B - M)^T)``."""
        if self.cross is None:
            return weight
        w = weight.detach().to(torch.float64)
        lam = ridge_lambda(self.fit, ridge)
        eye = torch.eye(self.fit.shape[0], dtype=torch.float64, device=self.fit.device)
        rhs = w @ (self.cross + lam * eye)  # (out, in)
        m = torch.linalg.solve(self.fit + lam * eye, rhs.t()).t()  # rhs (C_ss + lambda I)^-1 (symmetric)
        return m.to(weight.dtype)


@dataclass(frozen=True)
class CalibrationConfig:
    """Where calibration tokens come from and how they are used: the CLI's ``--calibration-*``
    options, a recipe's ``surgery.calibration`` section, and :func:`calibration_from_source`."""

    source: str | None = None
    """A local json/jsonl/csv/parquet/txt file, a hub dataset id, or an alias like lamini."""
    blocks: int = 32
    """Calibration blocks (a quarter is held out to measure errors)."""
    block_size: int = 256
    """Tokens per calibration block."""
    format: str = "chat-template"
    """kphi3 | chat-template | plain."""
    batch_size: int = 4
    """Blocks per forward pass while collecting statistics."""
    sequential: bool = False
    """Fit layer by layer on the already-shrunk prefix."""
    refine_steps: int = 0
    """With sequential: Adam steps per decoder layer after the closed-form fit, matching the
    dense layer's output (kept only where held-out error drops)."""
    refine_lr: float = 1e-4
    """Adam learning rate of the refinement. Small: it starts from the closed-form optimum of
    every linear map and only has to correct their interplay."""

    def __post_init__(self):
        for name in ("blocks", "block_size", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise GPConvError(f"calibration {name} must be a positive integer, got {v!r}")
        check_refine(self.refine_steps, self.refine_lr, self.sequential)


@dataclass
class Calibration:
    """Calibration inputs for :func:`gpconv.shrink`.

    ``batches``: token-id tensors ``(B, T)`` without padding (packed text blocks).
    Every ``holdout_every``-th batch is held out from fitting and used only to measure errors.
    ``sequential=True`` fits layer by layer on the shrunk prefix's outputs.
    """

    batches: Sequence[torch.Tensor]
    sequential: bool = CalibrationConfig.sequential
    holdout_every: int = 4
    correct: bool = True
    """Sequential mode: fit each layer to reproduce the *dense* model's output of that layer
    (from the shrunk prefix's inputs), not just its own map. See :meth:`LayerStats.target`."""
    refine_steps: int = CalibrationConfig.refine_steps
    """Sequential mode: after a decoder layer's blocks are fitted in closed form, this many Adam
    steps on those blocks so that the whole decoder layer reproduces the dense layer's output
    (see :func:`refine_layer`). 0: closed form only."""
    refine_lr: float = CalibrationConfig.refine_lr
    """The refinement's Adam learning rate."""

    def __post_init__(self):
        if not self.batches:
            raise GPConvError("calibration needs at least one batch of token ids")
        check_refine(self.refine_steps, self.refine_lr, self.sequential)
        if len(self.batches) < 2:
            self.holdout_every = 0  # one batch: nothing to hold out

    def is_held_out(self, i: int) -> bool:
        """Is batch ``i`` held out (errors only, never fitted)?"""
        return self.holdout_every > 0 and i % self.holdout_every == self.holdout_every - 1


def check_refine(steps, lr, sequential: bool,
                 names: tuple[str, str, str] = ("refine_steps", "refine_lr", "sequential calibration (the layer's "
                                                "inputs come from the shrunk prefix)")):
    """Refuse bad refinement settings: in :class:`Calibration`, and before any work in a recipe
    and on the command line. ``names``: how the caller spells the steps, the learning rate and
    the sequential switch in its messages (a recipe's keys, the CLI's flags)."""
    steps_name, lr_name, sequential_name = names
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise GPConvError(f"{steps_name} must be a non-negative integer, got {steps!r}")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr <= 0:
        raise GPConvError(f"{lr_name} must be a positive number, got {lr!r}")
    if steps and not sequential:
        raise GPConvError(f"{steps_name} needs {sequential_name}")


def token_batches(tokenizer, texts: Iterable[str], block_size: int = 256, num_blocks: int = 32, batch_size: int = 4):
    """Pack ``texts`` (joined with the end-of-text token) into ``num_blocks`` blocks of
    ``block_size`` tokens, grouped in batches of ``batch_size``: the usual calibration input."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    need = block_size * num_blocks
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if len(ids) >= need:
            break
    n = len(ids) // block_size
    if n == 0:
        raise GPConvError(f"calibration text is shorter than one block of {block_size} tokens")
    blocks = torch.tensor(ids[: n * block_size]).view(n, block_size)  # (n*T,) -> (n, T)
    return [blocks[i:i + batch_size] for i in range(0, n, batch_size)]


# --------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------


class _Accumulator:
    """Sums x^T x over tokens for a set of modules, one sum per distinct input tensor."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        self.sums: dict[str, list] = {}  # key module name -> [fit_sum, fit_n, held_sum, held_n, cross_sum]
        self.owner: dict[str, str] = {}  # module name -> name of the module whose sum it shares
        self.held_out = False
        self.dense_inputs: dict[str, torch.Tensor] | None = None  # sequential: the dense model's inputs
        self._seen: dict[tuple, str] = {}
        self._handles = []
        for name in names:
            mod = model.get_submodule(name)
            self._handles.append(mod.register_forward_pre_hook(self._hook(name)))

    def new_batch(self, held_out: bool):
        self.held_out = held_out
        self._seen.clear()

    def _hook(self, name):
        def hook(mod, args):
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape), x._version)
            seen = self._seen.get(key)
            if seen is not None and seen[1] is x:  # same tensor as an earlier layer (q/k/v, gate/up): share
                self.owner.setdefault(name, seen[0])
                return
            # hold x until the batch ends: a freed tensor's address could be reused by another
            # tensor of the same shape, which would then look "shared"
            self._seen[key] = (name, x)
            self.owner.setdefault(name, name)
            x2 = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)  # (..., in) -> (N, in)
            acc = self.sums.get(name)
            if acc is None:
                n_in = x.shape[-1]
                z = lambda: torch.zeros(n_in, n_in, dtype=torch.float64, device=x.device)  # noqa: E731
                acc = self.sums[name] = [z(), 0, z(), 0, z() if self.dense_inputs is not None else None]
            i = 2 if self.held_out else 0
            acc[i].addmm_(x2.t(), x2)
            acc[i + 1] += x2.shape[0]
            if self.dense_inputs is not None and not self.held_out:
                xd = self.dense_inputs[name].reshape(-1, x.shape[-1]).to(torch.float64)
                acc[4].addmm_(xd.t(), x2)  # E[x_dense x^T]

        return hook

    def close(self) -> dict[str, LayerStats]:
        for h in self._handles:
            h.remove()
        per_owner = {}
        for owner, (fs, fn, hs, hn, xs) in self.sums.items():
            if fn == 0:  # everything was held out (single batch): fit on it too
                fs, fn, xs = hs, hn, None
            per_owner[owner] = LayerStats(fs / fn, hs / hn if hn else None, fn, hn, None if xs is None else xs / fn)
        return {name: per_owner[owner] for name, owner in self.owner.items()}


def run_model(model, batch):
    """One no-grad forward pass of ``model`` on a batch of ids (no KV cache)."""
    kw = {}
    if hasattr(model, "config") and hasattr(model, "generation_config"):
        kw["use_cache"] = False  # a KV cache would grow when layers are re-run
    with torch.no_grad():
        if isinstance(batch, dict):
            return model(**batch, **kw)
        return model(batch, **kw)


def collect_stats(model: nn.Module, calib: Calibration, names: Sequence[str]) -> dict[str, LayerStats]:
    """Parallel mode: one pass over ``calib.batches`` through ``model`` as it is."""
    device = next(model.parameters()).device
    acc = _Accumulator(model, names)
    try:
        for i, b in enumerate(calib.batches):
            acc.new_batch(calib.is_held_out(i))
            run_model(model, b.to(device))
    finally:
        stats = acc.close()
    missing = [n for n in names if n not in stats]
    if missing:
        raise GPConvError(f"calibration never reached {missing[0]!r} (is it used in forward?)")
    return stats


# --------------------------------------------------------------------------------------------
# Sequential mode
# --------------------------------------------------------------------------------------------


class _Stop(Exception):
    pass


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The stack of decoder layers: the longest ``nn.ModuleList`` of identical, callable blocks."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            kinds = {type(m) for m in mod}
            if len(kinds) == 1 and type(mod[0]).forward is not nn.Module.forward and not isinstance(mod[0], nn.ModuleDict):
                if best is None or len(mod) > len(best[1]):
                    best = (name, mod)
    return best


def _forward_order(model, batch, names):
    """The order in which ``names`` first run, and which of them read the same input tensor."""
    order, groups, seen = [], {}, {}
    handles = []
    for name in names:
        def hook(mod, args, name=name):
            x = args[0]
            if name not in groups:
                hit = next((n for n, t in seen.items() if t is x), None)  # identity, not address
                groups[name] = hit or name
                seen.setdefault(groups[name], x)
                order.append(name)
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        run_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    # stages: modules sharing an input, in first-use order
    stages: dict[str, list[str]] = {}
    for n in order:
        stages.setdefault(groups[n], []).append(n)
    return list(stages.values())


def run_sequential(
    model: nn.Module,
    calib: Calibration,
    names: Sequence[str],
    on_stage: Callable[[dict[str, LayerStats]], None],
    on_refined: Callable[[int, float, float], None] | None = None,
) -> None:
    """Call ``on_stage(stats)`` for each group of layers that share an input, in forward order,
    with statistics taken from the model *as modified by the earlier calls*. With
    ``calib.refine_steps``, each decoder layer is refined once its blocks are in and
    ``on_refined(layer index, held-out error before, after)`` is called."""
    device = next(model.parameters()).device
    batches = [b.to(device) for b in calib.batches]
    stages = _forward_order(model, batches[0], names)
    found = decoder_layers(model)
    if found is None and calib.refine_steps:  # refused before any layer changes
        raise GPConvError("refine_steps needs a model built as a stack of decoder layers (an nn.ModuleList of "
                          f"identical blocks); {type(model).__name__} has none")
    if found is None:
        for stage in stages:  # generic: a full pass per stage
            on_stage(collect_stats(model, calib, stage))
        return
    prefix, layers = found
    in_layer = {}
    for stage in stages:
        idx = None
        if stage[0].startswith(prefix + "."):
            idx = int(stage[0][len(prefix) + 1:].split(".", 1)[0])
        in_layer.setdefault(idx, []).append(stage)
    for stage in in_layer.pop(None, []):  # layers outside the stack (rare): generic path
        on_stage(collect_stats(model, calib, stage))

    # cache what enters the first decoder layer, per batch
    cached = []
    def grab(mod, args, kwargs):
        cached.append((args, kwargs))
        raise _Stop

    h = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for b in batches:
            try:
                run_model(model, b)
            except _Stop:
                pass
    finally:
        h.remove()

    dense_cached = cached  # what the dense model feeds each layer (identical at layer 0)
    for li, layer in enumerate(layers):
        stages_here = in_layer.get(li, [])
        # a dense copy of this layer (one layer at a time: cheap) gives the dense model's inputs
        # (refinement needs it too: its target is the dense layer's output)
        dense_layer = copy.deepcopy(layer) if stages_here and (calib.correct or calib.refine_steps) else None
        dense_inputs = None
        if dense_layer is not None and calib.correct:  # one pass gives every target's dense input, per batch
            rel = {n: n[len(prefix) + 1:].split(".", 1)[1] for st in stages_here for n in st}  # "3.mlp.up" -> "mlp.up"
            dense_inputs = [_inputs_of(dense_layer, rel, call) for call in dense_cached]
        for stage in stages_here:
            acc = _Accumulator(model, stage)
            try:
                for bi, (args, kwargs) in enumerate(cached):
                    if dense_inputs is not None:
                        acc.dense_inputs = dense_inputs[bi]
                    acc.new_batch(calib.is_held_out(bi))
                    with torch.no_grad():
                        layer(*args, **kwargs)
            finally:
                stats = acc.close()
            on_stage(stats)
        if calib.refine_steps and dense_layer is not None:
            errors = refine_layer(layer, dense_layer, cached, dense_cached, calib)
            if on_refined is not None and errors is not None:
                on_refined(li, *errors)
        if li + 1 < len(layers):  # this layer is final now: its outputs feed the next one
            # until a layer has been changed, the dense and the shrunk stream are the same
            diverged = dense_cached is not cached or dense_layer is not None
            new_cached = _advance(layer, cached)
            if diverged and calib.correct:
                dense_cached = _advance(dense_layer if dense_layer is not None else layer, dense_cached)
            else:
                dense_cached = new_cached
            cached = new_cached


def _hidden(out):
    return out[0] if isinstance(out, tuple) else out


def refine_layer(layer, dense_layer, cached, dense_cached, calib: Calibration) -> tuple[float, float] | None:
    """Tune the gpconv blocks inside one decoder ``layer`` so that ``layer(shrunk-prefix inputs)``
    matches ``dense_layer(dense inputs)``: Adam on the layer output's error relative to the dense
    one, token by token (:func:`gpconv.fitting.token_relative_error`), on the fit batches. The
    closed-form fits make each linear map right on its own; this step accounts for what happens
    between them (attention's softmax, the MLP's gate). The held-out
    batches decide: if their error did not drop, the closed-form weights are put back.
    Returns the held-out error before and after, as the root of the mean per-token relative
    squared error (None: the layer has no blocks)."""
    params = [p for m in layer.modules() if is_gpconv_module(m) for p in m.parameters()]
    if not params:
        return None
    with torch.no_grad():
        targets = [_hidden(dense_layer(*a, **k)).detach() for a, k in dense_cached]
    held = [i for i in range(len(cached)) if calib.is_held_out(i)]
    fit = [i for i in range(len(cached)) if i not in held] or list(range(len(cached)))
    held = held or fit

    def error(idx):
        total = count = 0.0
        with torch.no_grad():
            for i in idx:
                a, k = cached[i]
                err = token_relative_error(_hidden(layer(*a, **k)), targets[i])  # (B, T)
                total, count = total + float(err.sum()), count + err.numel()
        return (total / max(count, 1)) ** 0.5

    before = error(held)
    saved = [p.detach().clone() for p in params]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=calib.refine_lr)
    try:
        with torch.enable_grad():
            for step in range(calib.refine_steps):
                i = fit[step % len(fit)]
                a, k = cached[i]
                y = _hidden(layer(*a, **k))
                loss = token_relative_error(y, targets[i]).mean()
                # grads of the blocks only (the rest of the layer may require grad too)
                for p, g in zip(params, torch.autograd.grad(loss, params)):
                    p.grad = g
                opt.step()
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
            p.grad = None
    after = error(held)
    if not after < before:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        after = before
    return before, after


def _advance(layer, cached):
    """Run ``layer`` on every cached input; its outputs become the next layer's inputs."""
    new = []
    with torch.no_grad():
        for args, kwargs in cached:
            out = layer(*args, **kwargs)
            h_out = out[0] if isinstance(out, tuple) else out
            if args:
                new.append(((h_out,) + tuple(args[1:]), kwargs))
            else:  # hidden states passed by keyword
                new.append((args, dict(kwargs, hidden_states=h_out)))
    return new


def _inputs_of(layer, rel: dict[str, str], call) -> dict[str, torch.Tensor]:
    """The inputs the modules ``rel`` (full name -> name inside ``layer``) see in ``layer(*call)``."""
    got: dict[str, torch.Tensor] = {}
    handles = [layer.get_submodule(r).register_forward_pre_hook(
        lambda m, a, full=full: got.setdefault(full, a[0].detach())) for full, r in rel.items()]
    try:
        with torch.no_grad():
            layer(*call[0], **call[1])
    finally:
        for h in handles:
            h.remove()
    return got


def calibration_from_source(config: CalibrationConfig | str, tokenizer, *, seed: int = 0, **changes) -> Calibration:
    """A :class:`Calibration` from any data source :func:`gpconv.build_datasets` reads (a local
    json/jsonl/csv/parquet/txt file, a hub dataset id, or an alias like ``lamini``). ``config``
    is a :class:`CalibrationConfig` or just the source; keyword arguments change its fields."""
    if isinstance(config, str):
        config = CalibrationConfig(source=config)
    c = updated(config, changes, "calibration")
    if c.source is None:
        raise GPConvError("calibration needs a data source")
    if tokenizer is None:
        raise GPConvError("calibration data needs the model's tokenizer, and this model has none")
    fmt = c.format
    if fmt == "chat-template" and not getattr(tokenizer, "chat_template", None):
        fmt = "kphi3"  # no template to render with: the paper's format
    rows_needed = max(64, c.blocks * c.block_size // 32)  # generous: rows are usually > 32 tokens
    train, _ = build_datasets(c.source, tokenizer, DataConfig(format=fmt, block_size=c.block_size, val_size=0,
                                                              max_samples=rows_needed), seed=seed)
    ids = []
    for i, item in enumerate(train):
        if i >= c.blocks:
            break
        ids.append(item["input_ids"])
    if not ids:
        raise GPConvError(f"{c.source}: no calibration tokens")
    blocks = torch.stack(ids)  # (n, T)
    return Calibration([blocks[i:i + c.batch_size] for i in range(0, len(blocks), c.batch_size)],
                       sequential=c.sequential, refine_steps=c.refine_steps, refine_lr=c.refine_lr)
