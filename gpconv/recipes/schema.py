"""The recipe format: sections that are config dataclasses, read from YAML and ``--set`` overrides.

A recipe has these sections (every key is optional unless marked; ``docs/recipes.md`` has the
full reference and the bundled recipes live in ``gpconv/recipes/data/``)::

    name: JP47D55C
    seed: 0
    model:    {name: SPEC} or {config: {model_type: phi3, ...}, tokenizer: SPEC}; dtype
    teacher:  null | SPEC | {name: SPEC, dtype: ...}; SPEC "model" = a copy before surgery
    surgery:  null (stay dense) | GPConvConfig fields, plus calibration: CalibrationConfig fields
    data:     source (required) and DataConfig fields, plus filter: {column: [values]}
    train:    null (no training) | TrainConfig fields (out_dir, seed, resume, overwrite excepted)
    eval:     null | batch_size, max_batches, prompts, max_new_tokens
    output:   dir, overwrite, resume

Each section is a dataclass (:class:`GPConvConfig`, :class:`TrainConfig`, ... or one of the small
ones below), so a recipe key, the Python field and the command-line option are one definition:
its default, type and documentation are read from the class. ``load_recipe(name_or_path,
overrides)`` reads a recipe, applies ``key.sub=value`` overrides and checks every key and value
(:mod:`gpconv.schema`); a mistake is one :class:`GPConvError` line naming the key.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from ..data import DataConfig
from ..errors import GPConvError
from ..hfutil import parse_dtype
from ..recovery import TrainConfig
from ..schema import coerce, defaults, unknown_key, validate
from ..surgery import CalibrationConfig, GPConvConfig
from ..surgery.calibrate import check_refine

MISSING = "???"  # a value the user must give (--set key=value), as in OmegaConf
TEACHER_IS_MODEL = "model"  # teacher: model -> a copy of the model taken before surgery
TOP = ("name", "description", "seed", "model", "teacher", "surgery", "data", "train", "eval", "output")
# TrainConfig fields a recipe sets elsewhere: the run directory and its handling come from
# `output`, the seed from the top level (one seed for the init, the split and the data order)
TRAIN_ELSEWHERE = {"out_dir": "output.dir", "resume": "output.resume", "overwrite": "output.overwrite", "seed": "seed"}


@dataclass(frozen=True)
class ModelSection:
    """The model a recipe starts from."""

    name: str | None = None
    """A model spec to load (a built-in name, a directory, a .gguf, a hub id)."""
    config: dict | None = None
    """Or a transformers config to build from scratch: model_type + fields, or base (a model
    whose config to start from) + the fields to change."""
    tokenizer: str | None = None
    """A model spec to take the tokenizer from, or byte (gpconv's byte-level tokenizer)."""
    dtype: str = "float32"
    """float32 | bfloat16 | float16 | auto (as loaded)."""

    def __post_init__(self):
        if (self.name is None) == (self.config is None):
            raise GPConvError("recipe model needs exactly one of model.name (a model to load) or model.config (from scratch)")
        if self.config is not None:
            if not ("model_type" in self.config or "base" in self.config):
                raise GPConvError("recipe model.config must be a mapping with model_type (or base: a model whose config to start from)")
            if self.tokenizer is None:
                raise GPConvError("a model built from model.config needs model.tokenizer (a model spec, or 'byte')")
        parse_dtype(self.dtype)


@dataclass(frozen=True)
class TeacherSection:
    """The teacher of a distillation."""

    name: str | None = None
    """A model spec, or model (a copy of the model taken before surgery)."""
    dtype: str | None = None
    """Its dtype (None: the model's)."""

    def __post_init__(self):
        if self.name is None:
            raise GPConvError("recipe teacher needs teacher.name (a model spec, or 'model' for the model before surgery)")
        if self.dtype is not None:
            parse_dtype(self.dtype)


@dataclass(frozen=True)
class DataSection(DataConfig):
    """A recipe's data: a source and how it becomes blocks."""

    source: str = MISSING
    """lamini | dolly | wikitext2 | a hub dataset id | a local .json/.jsonl/.parquet/.csv/.txt file."""
    filter: dict[str, Any] | None = None
    """Keep only rows whose column has one of these values: {column: value or [values]}."""

    def __post_init__(self):
        super().__post_init__()
        if self.filter is not None and not all(isinstance(v, (list, str, int)) for v in self.filter.values()):
            raise GPConvError("recipe key data.filter: a mapping column -> value or list of values to keep")


@dataclass(frozen=True)
class EvalSection:
    """Held-out evaluation after the run, and a few generations."""

    batch_size: int = 8
    """Blocks per forward pass."""
    max_batches: int | None = None
    """Evaluate at most this many batches (None: every held-out block)."""
    prompts: list[str] = field(default_factory=list)
    """Prompts to answer with the final model (results.json keeps the replies)."""
    max_new_tokens: int = 64
    """Tokens per reply at most."""


@dataclass(frozen=True)
class OutputSection:
    """Where a recipe's outputs go."""

    dir: str | None = None
    """Output directory: the model, the run's checkpoints and metrics, results.json."""
    overwrite: bool = False
    """Replace a non-empty output directory."""
    resume: bool = False
    """Continue from the newest checkpoint in the output directory."""

    def __post_init__(self):
        if self.overwrite and self.resume:
            raise GPConvError("output.overwrite and output.resume exclude each other")


# --------------------------------------------------------------------------------------------
# Finding and reading recipes
# --------------------------------------------------------------------------------------------


def recipe_dirs() -> list[Path]:
    """Where bundled recipes live: ``gpconv/recipes/data``, package data of the wheel."""
    here = Path(__file__).resolve().parent / "data"
    return [here] if here.is_dir() else []


def list_recipes() -> dict[str, Path]:
    """Bundled recipe name -> file (the first directory of :func:`recipe_dirs` wins)."""
    found: dict[str, Path] = {}
    for d in recipe_dirs():
        for f in sorted(d.glob("*.yaml")):
            found.setdefault(f.stem, f)
    return found


def find_recipe(spec: str | os.PathLike) -> Path:
    """A recipe file: ``spec`` itself if it is a file, else the bundled recipe of that name."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    bundled = list_recipes()
    if str(spec) in bundled:
        return bundled[str(spec)]
    if path.suffix in (".yaml", ".yml") or os.sep in str(spec):
        raise GPConvError(f"no such recipe file: {spec}")
    names = ", ".join(bundled) or "none found"
    raise GPConvError(f"unknown recipe {str(spec)!r}: not a file, nor a bundled recipe ({names})")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-4`` as a string (it wants ``1.0e-4``); recipes are full of learning
    rates, so exponent-only floats are floats here."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+|\.[0-9_]+[eE][-+]?[0-9]+)$"),
    list("-+0123456789."),
)


def parse_value(text: str) -> Any:
    """One ``--set`` value, read as YAML: ``3e-4`` -> float, ``null`` -> None, ``[a, b]`` -> list."""
    try:
        return yaml.load(text, Loader=_Loader) if text.strip() else ""
    except yaml.YAMLError:
        return text  # not YAML: take it as the string it is


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except UnicodeDecodeError as e:
        raise GPConvError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()
        raise GPConvError(f"{path} is not valid YAML ({' '.join(first[:2])})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise GPConvError(f"{path}: a recipe is a mapping of sections (model, data, train, ...), not {type(data).__name__}")
    return data


# --------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------


def parse_overrides(items: Iterable[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """``["train.lr=3e-4", "surgery=null"]`` (or a dict) -> ``{"train.lr": 3e-4, "surgery": None}``."""
    if not items:
        return {}
    if isinstance(items, Mapping):
        return dict(items)
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise GPConvError(f"--set takes KEY=VALUE with a dotted key like train.lr=3e-4, got {item!r}")
        out[key] = parse_value(value)
    return out


def apply_overrides(recipe: dict, overrides: Mapping[str, Any]) -> dict:
    """A copy of ``recipe`` with each dotted key set; missing or null parents become mappings
    (so ``surgery.min_channels_per_group=64`` turns a dense recipe into a grouped one)."""
    out = copy.deepcopy(recipe)
    for key, value in overrides.items():
        parts = key.split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None or nxt == MISSING:
                nxt = node[part] = {}
            elif isinstance(nxt, str) and i == 0 and part == "teacher":
                nxt = node[part] = {"name": nxt}  # teacher: SPEC shorthand, then teacher.dtype=...
            if not isinstance(nxt, dict):
                raise GPConvError(f"cannot set {key}: {'.'.join(parts[:i + 1])} is {nxt!r}, not a section")
            node = nxt
        node[parts[-1]] = copy.deepcopy(value)
    return out


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _plain(value):
    """Tuples as lists, so that a resolved recipe dumps as plain YAML."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _section(raw, name: str, cls, exclude: Iterable[str] = (), nullable: bool = True) -> dict | None:
    """Section ``name`` of a recipe: its keys over ``cls``'s defaults, each value checked against
    the field's type and the whole built once as ``cls`` (whose own checks then run)."""
    if raw is None:
        if not nullable:
            raise GPConvError(f"recipe section {name} cannot be null")
        return None
    if not isinstance(raw, dict):
        raise GPConvError(f"recipe section {name} must be a mapping of keys, got {raw!r}")
    known = defaults(cls, exclude)
    for k in raw:
        if k not in known:
            raise unknown_key(name, k, known, "recipe key")
    values = {**known, **coerce(cls, raw, f"recipe key {name}")}
    validate(cls, values, f"recipe section {name}")
    return _plain(values)


def resolve(raw: dict, name: str = "recipe") -> dict:
    """The full recipe: every section present, defaults filled in, every key and value checked.

    Values still ``???`` are left for :func:`check_complete` (a dry run may show them)."""
    for k in raw:
        if k not in TOP:
            raise unknown_key("", k, TOP, "recipe key")
    r: dict[str, Any] = {"name": raw.get("name") or name, "description": raw.get("description") or ""}
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise GPConvError(f"recipe key seed: {seed!r} is not an integer")
    r["seed"] = seed
    r["model"] = _section(raw.get("model", {}), "model", ModelSection, nullable=False)
    teacher = raw.get("teacher")
    r["teacher"] = _section({"name": teacher} if isinstance(teacher, str) else teacher, "teacher", TeacherSection)

    surgery = raw.get("surgery")
    calib = surgery.get("calibration") if isinstance(surgery, dict) else None
    if isinstance(surgery, dict):
        surgery = {k: v for k, v in surgery.items() if k != "calibration"}
    r["surgery"] = _section(surgery, "surgery", GPConvConfig)
    if r["surgery"] is not None:
        c = None
        if calib is not None:
            if isinstance(calib, dict):  # the recipe's own names in the refinement's messages
                key = "recipe key surgery.calibration."
                check_refine(calib.get("refine_steps", CalibrationConfig.refine_steps),
                             calib.get("refine_lr", CalibrationConfig.refine_lr), calib.get("sequential", False),
                             (key + "refine_steps", key + "refine_lr", "surgery.calibration.sequential: true"))
            c = _section(calib, "surgery.calibration", CalibrationConfig, nullable=False)
        r["surgery"]["calibration"] = c

    r["data"] = _section(raw.get("data"), "data", DataSection)
    train = raw.get("train")
    for k in train if isinstance(train, dict) else ():
        if k in TRAIN_ELSEWHERE:
            raise GPConvError(f"set train's {k} through {TRAIN_ELSEWHERE[k]}, not train.{k}")
    r["train"] = _section(train, "train", TrainConfig, exclude=TRAIN_ELSEWHERE)
    ev = raw["eval"] if "eval" in raw else ({} if r["data"] else None)
    if isinstance(ev, dict) and isinstance(ev.get("prompts"), str):
        ev = {**ev, "prompts": [ev["prompts"]]}
    r["eval"] = _section(ev, "eval", EvalSection)
    r["output"] = _section(raw.get("output", {}), "output", OutputSection, nullable=False)

    if (r["train"] is not None or r["eval"] is not None) and r["data"] is None:
        raise GPConvError("training and evaluation need data: give data.source, or set train and eval to null")
    if r["teacher"] is not None and r["train"] is None:
        raise GPConvError("a teacher is only used for distillation: give a train section, or set teacher to null")
    return r


def missing_keys(recipe: Mapping, prefix: str = "") -> list[str]:
    """Dotted keys whose value is still ``???``."""
    out = []
    for k, v in recipe.items():
        if v == MISSING:
            out.append(prefix + k)
        elif isinstance(v, dict):
            out += missing_keys(v, f"{prefix}{k}.")
    return out


def check_complete(recipe: Mapping) -> None:
    todo = missing_keys(recipe)
    if todo:
        sets = " ".join(f"--set {k}=..." for k in todo)
        raise GPConvError(f"recipe {recipe['name']} needs a value for {', '.join(todo)} ({sets})")


def load_recipe(spec: str | os.PathLike | Mapping, overrides: Iterable[str] | Mapping[str, Any] | None = None) -> dict:
    """Read a recipe (a file, a bundled name, or a dict), apply ``overrides`` and resolve it."""
    if isinstance(spec, Mapping):
        raw, name = dict(spec), str(spec.get("name") or "recipe")
    else:
        path = find_recipe(spec)
        raw, name = read_yaml(path), path.stem
    return resolve(apply_overrides(raw, parse_overrides(overrides)), name)


def dump(recipe: Mapping) -> str:
    """The resolved recipe as YAML (what ``--dry-run`` prints and ``recipe.yaml`` holds)."""
    return yaml.safe_dump(dict(recipe), sort_keys=False, default_flow_style=False, width=100, allow_unicode=True)
