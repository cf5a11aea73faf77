"""What surgery does: :class:`GPConvConfig`, and the rule by which its patterns match layers.

A pattern (``target_modules``, ``exclude_modules``, the keys of
``min_channels_per_group_overrides``) matches a module whose full dotted name equals it, ends
with ``"." + pattern``, or fully matches it as a regular expression. The presets
``"all-linear"``, ``"attention"`` and ``"mlp"`` select by role (:func:`module_kind`), ``"none"`` no layer; presets
never select the output layer (``lm_head``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

from ..errors import GPConvError
from ..fitting import DEFAULT_RIDGE, INITS
from ..layers import VARIANTS

PRESETS = ("all-linear", "attention", "mlp", "none")  # "none": no layer (depth truncation alone)

Patterns = str | Sequence[str]

ATTENTION_LEAVES = {
    "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query", "key", "value", "c_attn",
    "query_key_value", "wqkv", "out_proj", "wq", "wk", "wv", "wo",
}
MLP_LEAVES = {
    "gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2", "c_fc", "w1", "w2", "w3",
    "dense_h_to_4h", "dense_4h_to_h", "fc_in", "fc_out",
}


def module_kind(name: str) -> str:
    """'attention', 'mlp' or 'other', from the module's dotted name.

    A parent named like attention (``self_attn``, ``attention``, GPT-2's ``attn``) or MLP
    (``mlp``, ``ffn``, ``feed_forward``) decides first, so GPT-2's two ``c_proj`` land right;
    otherwise the leaf name is looked up in the usual projection names.
    """
    parts = name.lower().split(".")
    for p in parts[:-1]:
        if "attn" in p or "attention" in p:
            return "attention"
        if p in ("mlp", "ffn", "feed_forward", "feedforward", "moe", "experts") or p.startswith("mlp"):
            return "mlp"
    leaf = parts[-1]
    if leaf in ATTENTION_LEAVES:
        return "attention"
    if leaf in MLP_LEAVES:
        return "mlp"
    return "other"


def parse_target(value, non_embedding: int) -> int:
    """``0.23`` (fraction of non-embedding params), ``"53M"``, ``"1.2B"``, ``"35011584"`` -> count."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        v = float(value)
    else:
        s = str(value).strip().replace(",", "").replace("_", "")
        m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([kKmMbBgG]?)", s)
        if not m:
            raise GPConvError(f"--target-params takes a fraction (0.25) or a count (53M, 1.2B), got {value!r}")
        v = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}[m.group(2).lower()]
    if v <= 0:
        raise GPConvError(f"--target-params must be positive, got {value!r}")
    if v <= 1:
        return int(v * non_embedding)
    if v > non_embedding:
        raise GPConvError(f"target {int(v):,} is above the model's {non_embedding:,} non-embedding parameters")
    return int(v)


@dataclass(frozen=True)
class GPConvConfig:
    """Everything that decides which layers become which blocks.

    Patterns (``target_modules``, ``exclude_modules`` and the keys of
    ``min_channels_per_group_overrides``) follow one rule: a pattern matches a module whose full
    dotted name equals it, ends with ``"." + pattern``, or fully matches it as a regular
    expression. The presets ``"all-linear"``, ``"attention"`` and ``"mlp"`` select by role
    (``"none"``: no layer, for depth truncation alone); presets never select the output layer
    (``lm_head``). A list matches if any entry does.
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
    down to ``gpconv.surgery.HYBRID_MIN_CHANNELS`` channels per group."""
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
    ("53M"). The budget solver then picks each layer's block from its menu (see gpconv.surgery.budget),
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
            parse_target(self.target_params, 10**18)  # syntax check; the model is not known yet
        if self.rank is not None and not (
            (isinstance(self.rank, int) and self.rank > 0) or (isinstance(self.rank, float) and 0 < self.rank <= 1)
        ):
            raise GPConvError(f"rank must be a positive int or a fraction in (0, 1], got {self.rank!r}")
        for pats in (self.target_modules, self.exclude_modules or (), *self.min_channels_per_group_overrides):
            for p in as_list(pats):
                compile_pattern(p)

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


def as_list(patterns) -> list[str]:
    if patterns is None:
        return []
    return [patterns] if isinstance(patterns, str) else list(patterns)


_REGEX_CACHE: dict[str, re.Pattern | None] = {}


def compile_pattern(pattern: str) -> re.Pattern | None:
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
        if is_output or pattern == "none":
            return False
        return pattern == "all-linear" or pattern == kind
    if name == pattern or name.endswith("." + pattern):
        return True
    rx = compile_pattern(pattern)
    return bool(rx.fullmatch(name))


def first_match(patterns, name, kind, is_output) -> str | None:
    for p in as_list(patterns):
        if pattern_matches(p, name, kind, is_output):
            return p
    return None


def mcpg_for(cfg: GPConvConfig, name: str) -> int:
    for pat, v in cfg.min_channels_per_group_overrides.items():
        if pattern_matches(pat, name, module_kind(name), False):
            return v
    return cfg.min_channels_per_group


def show_patterns(patterns) -> str:
    return repr(patterns if isinstance(patterns, str) else list(patterns))
