"""Recipes: one YAML file names a whole pipeline, and :func:`run_recipe` runs it.

    model (or a config: from scratch) -> surgery -> data -> training or distillation
        -> evaluation -> outputs

A recipe has these sections (every key is optional unless marked; ``docs/recipes.md`` has the
full reference and the bundled recipes live in ``recipes/``)::

    name: JP47D55C
    seed: 0
    model:    {name: SPEC} or {config: {model_type: phi3, ...}, tokenizer: SPEC}; dtype
    teacher:  null | SPEC | {name: SPEC, dtype: ...}; SPEC "model" = a copy before surgery
    surgery:  null (stay dense) | GPConvConfig fields, plus calibration: {...} for data-aware inits
    data:     source (required), format, block_size, val_size, max_samples, response_only, pack,
              streaming, split, filter: {column: [values]}
    train:    null (no training) | TrainConfig fields (out_dir, seed, resume, overwrite excepted)
    eval:     null | batch_size, max_batches, prompts, max_new_tokens
    output:   dir, overwrite, resume

``load_recipe(name_or_path, overrides)`` reads a recipe (a path, or the name of a bundled one),
applies ``key.sub=value`` overrides and checks every key and value; a mistake is one
:class:`GPConvError` line naming the key. The runner below is deliberately a plain script over
the public API (``gpconv.load_model``, ``shrink``, ``build_datasets``, ``train``/``distill``,
``evaluate``, ``save_pretrained``): reading it tells you exactly what a recipe does.
"""

from __future__ import annotations

import collections.abc
import copy
import dataclasses
import difflib
import json
import math
import os
import platform
import re
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
import yaml

from .errors import GPConvError

MISSING = "???"  # a value the user must give (--set key=value), as in OmegaConf
TEACHER_IS_MODEL = "model"  # teacher: model -> a copy of the model taken before surgery
BYTE_TOKENIZER = "byte"  # tokenizer: byte -> gpconv.models.byte_tokenizer()

# Sections with a fixed set of keys, and their defaults. `surgery` and `train` take the fields of
# GPConvConfig and TrainConfig (read from the dataclasses, so new fields work in recipes at once).
MODEL = {"name": None, "config": None, "tokenizer": None, "dtype": "float32"}
TEACHER = {"name": None, "dtype": None}
DATA = {
    "source": MISSING, "format": "kphi3", "block_size": 512, "val_size": None, "max_samples": None,
    "response_only": False, "pack": True, "streaming": None, "split": None, "filter": None,
}
CALIBRATION = {"source": None, "blocks": 32, "block_size": 256, "format": "chat-template", "sequential": False,
               "refine_steps": 0, "refine_lr": 1e-4}
EVAL = {"batch_size": 8, "max_batches": None, "prompts": [], "max_new_tokens": 64}
OUTPUT = {"dir": None, "overwrite": False, "resume": False}
TOP = ("name", "description", "seed", "model", "teacher", "surgery", "data", "train", "eval", "output")
# TrainConfig fields a recipe sets elsewhere: the run directory and its handling come from
# `output`, the seed from the top level (one seed for the init, the split and the data order)
TRAIN_ELSEWHERE = {"out_dir": "output.dir", "resume": "output.resume", "overwrite": "output.overwrite", "seed": "seed"}


# --------------------------------------------------------------------------------------------
# Finding and reading recipes
# --------------------------------------------------------------------------------------------


def recipe_dirs() -> list[Path]:
    """Where bundled recipes live: ``gpconv/recipes_data`` in an installed wheel (pyproject maps
    the repository's ``recipes/`` there), ``recipes/`` beside the package in a source checkout
    or an editable install."""
    here = Path(__file__).resolve().parent
    return [d for d in (here / "recipes_data", here.parent / "recipes") if d.is_dir()]


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


def _fields(cls, exclude=()) -> dict[str, Any]:
    """Field name -> default of a config dataclass."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        if f.default is not dataclasses.MISSING:
            out[f.name] = list(f.default) if isinstance(f.default, tuple) else f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
        else:
            out[f.name] = None
    return out


def _surgery_keys() -> dict[str, Any]:
    from .surgery import GPConvConfig

    return {**_fields(GPConvConfig), "calibration": None}


def _train_keys() -> dict[str, Any]:
    from .training import TrainConfig

    return _fields(TrainConfig, exclude=TRAIN_ELSEWHERE)


def _unknown(where: str, key: str, known: Iterable[str]) -> GPConvError:
    known = list(known)
    hint = difflib.get_close_matches(key, known, n=1)
    extra = f"; did you mean {where + '.' if where else ''}{hint[0]}?" if hint else f"; known: {', '.join(known)}"
    return GPConvError(f"unknown recipe key {where + '.' if where else ''}{key}{extra}")


def _section(value, name: str, defaults: Mapping[str, Any], nullable: bool) -> dict | None:
    """The section ``name`` (its value ``value``) merged over ``defaults``; unknown keys refused."""
    if value is None:
        if not nullable:
            raise GPConvError(f"recipe section {name} cannot be null")
        return None
    if not isinstance(value, dict):
        raise GPConvError(f"recipe section {name} must be a mapping of keys, got {value!r}")
    for k in value:
        if k in TRAIN_ELSEWHERE and name == "train":
            raise GPConvError(f"set train's {k} through {TRAIN_ELSEWHERE[k]}, not train.{k}")
        if k not in defaults:
            raise _unknown(name, k, defaults)
    return {**copy.deepcopy(dict(defaults)), **value}


def _type_ok(value, hint) -> bool:
    """Loose check of a YAML value against a dataclass annotation (enough to catch typos)."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    base = origin or hint
    if base in (tuple, list, collections.abc.Sequence):
        return isinstance(value, (list, tuple))
    if base in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    return True


def _typed(cls, section: str, values: dict) -> dict:
    """``values`` checked against ``cls``'s annotations; ints become floats where floats are due."""
    hints = typing.get_type_hints(cls)
    out = {}
    for k, v in values.items():
        hint = hints.get(k, Any)
        if not _type_ok(v, hint):
            want = str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")
            raise GPConvError(f"recipe key {section}.{k}: {v!r} is not a valid value (expected {want})")
        if hint is float and isinstance(v, int):
            v = float(v)
        out[k] = v
    return out


def _require(value, where: str, kinds: tuple, what: str):
    """``value`` must be None or one of ``kinds`` (a bool is not an int here, YAML's true is no 1)."""
    if value is None:
        return value
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise GPConvError(f"recipe key {where}: {value!r} is not {what}")
    return value


def resolve(raw: dict, name: str = "recipe") -> dict:
    """The full recipe: every section present, defaults filled in, every key and value checked.

    Values still ``???`` are left for :func:`check_complete` (a dry run may show them)."""
    for k in raw:
        if k not in TOP:
            raise _unknown("", k, TOP)
    r: dict[str, Any] = {"name": raw.get("name") or name, "description": raw.get("description") or ""}
    r["seed"] = _require(raw.get("seed", 0), "seed", (int,), "an integer")

    model = _section(raw.get("model", {}), "model", MODEL, nullable=False)
    if (model["name"] is None) == (model["config"] is None):
        raise GPConvError("recipe model needs exactly one of model.name (a model to load) or model.config (from scratch)")
    if model["config"] is not None:
        if not isinstance(model["config"], dict) or not ("model_type" in model["config"] or "base" in model["config"]):
            raise GPConvError("recipe model.config must be a mapping with model_type (or base: a model whose config to start from)")
        if model["tokenizer"] is None:
            raise GPConvError("a model built from model.config needs model.tokenizer (a model spec, or 'byte')")
    for k in ("name", "tokenizer"):
        _require(model[k], f"model.{k}", (str,), "a model spec string")
    from .models import parse_dtype

    parse_dtype(model["dtype"])
    r["model"] = model

    teacher = raw.get("teacher")
    if isinstance(teacher, str):
        teacher = {"name": teacher}
    if teacher is not None:
        teacher = _section(teacher, "teacher", TEACHER, nullable=True)
        _require(teacher["name"], "teacher.name", (str,), "a model spec string (or 'model')")
        if teacher["name"] is None:
            raise GPConvError("recipe teacher needs teacher.name (a model spec, or 'model' for the model before surgery)")
        if teacher["dtype"] is not None:
            parse_dtype(teacher["dtype"])
    r["teacher"] = teacher

    surgery = _section(raw.get("surgery"), "surgery", _surgery_keys(), nullable=True)
    if surgery is not None:
        calib = surgery.pop("calibration")
        from .surgery import GPConvConfig

        _build(GPConvConfig, "surgery", surgery)  # checks every value now
        surgery["calibration"] = None if calib is None else _section(calib, "surgery.calibration", CALIBRATION, False)
        if calib is not None:
            from .calibrate import check_refine

            c = surgery["calibration"]
            key = "recipe key surgery.calibration."
            check_refine(c["refine_steps"], c["refine_lr"], c["sequential"],
                         (key + "refine_steps", key + "refine_lr", "surgery.calibration.sequential: true"))
    r["surgery"] = surgery

    data = _section(raw.get("data"), "data", DATA, nullable=True)
    if data is not None:
        from .data import FORMATS

        if data["format"] not in FORMATS:
            raise GPConvError(f"recipe key data.format: unknown format {data['format']!r}; choose one of: {', '.join(FORMATS)}")
        _require(data["block_size"], "data.block_size", (int,), "an integer")
        if data["block_size"] < 2:
            raise GPConvError(f"recipe key data.block_size must be at least 2, got {data['block_size']}")
        _require(data["val_size"], "data.val_size", (int, float), "a row count or a fraction")
        _require(data["max_samples"], "data.max_samples", (int,), "an integer")
        for k in ("response_only", "pack"):
            _require(data[k], f"data.{k}", (bool,), "true or false")
        _require(data["streaming"], "data.streaming", (bool,), "true, false or null")
        if data["filter"] is not None and not (isinstance(data["filter"], dict) and all(
                isinstance(v, (list, str, int)) for v in data["filter"].values())):
            raise GPConvError("recipe key data.filter: a mapping column -> value or list of values to keep")
    r["data"] = data

    train = _section(raw.get("train"), "train", _train_keys(), nullable=True)
    if train is not None:
        from .training import TrainConfig

        _build(TrainConfig, "train", train)
    r["train"] = train

    ev = _section(raw["eval"] if "eval" in raw else ({} if r["data"] else None), "eval", EVAL, nullable=True)
    if ev is not None:
        _require(ev["batch_size"], "eval.batch_size", (int,), "an integer")
        _require(ev["max_batches"], "eval.max_batches", (int,), "an integer")
        _require(ev["max_new_tokens"], "eval.max_new_tokens", (int,), "an integer")
        if isinstance(ev["prompts"], str):
            ev["prompts"] = [ev["prompts"]]
        if not isinstance(ev["prompts"], list) or not all(isinstance(p, str) for p in ev["prompts"]):
            raise GPConvError("recipe key eval.prompts: a list of prompt strings")
    r["eval"] = ev

    out = _section(raw.get("output", {}), "output", OUTPUT, nullable=False)
    _require(out["dir"], "output.dir", (str,), "a directory path")
    for k in ("overwrite", "resume"):
        _require(out[k], f"output.{k}", (bool,), "true or false")
    if out["overwrite"] and out["resume"]:
        raise GPConvError("output.overwrite and output.resume exclude each other")
    r["output"] = out

    if (r["train"] is not None or r["eval"] is not None) and r["data"] is None:
        raise GPConvError("training and evaluation need data: give data.source, or set train and eval to null")
    if r["teacher"] is not None and r["train"] is None:
        raise GPConvError("a teacher is only used for distillation: give a train section, or set teacher to null")
    return r


def _build(cls, section: str, values: dict):
    """``cls(**values)`` with one-line errors; the config classes check their own values."""
    values = _typed(cls, section, values)
    try:
        return cls(**values)
    except GPConvError as e:
        raise GPConvError(f"recipe section {section}: {e}") from None
    except (TypeError, ValueError) as e:
        raise GPConvError(f"recipe section {section}: {e}") from None


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


# --------------------------------------------------------------------------------------------
# Building the pieces
# --------------------------------------------------------------------------------------------


def model_config(section: Mapping):
    """A transformers config from ``model.config``: ``model_type`` + fields, or ``base`` (a model
    spec whose config to start from) + the fields to change."""
    from transformers import AutoConfig

    values = dict(section)
    base = values.pop("base", None)
    if base is not None:
        from .models import load_config

        cfg = load_config(str(base))
        values.pop("model_type", None)
        for k, v in values.items():
            setattr(cfg, k, v)
        return cfg
    model_type = values.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **values)
    except (ValueError, TypeError, KeyError) as e:
        raise GPConvError(f"recipe model.config: cannot build a {model_type!r} config ({e})") from None


def load_tokenizer(spec: str):
    """``byte`` (gpconv's byte-level tokenizer), a built-in model name, a .gguf, a directory or hub id."""
    from .models import DEMO_MODELS, byte_tokenizer, load_model
    from .models import load_tokenizer as _load

    if spec in (BYTE_TOKENIZER, "tiny-phi3"):
        return byte_tokenizer()
    if spec in DEMO_MODELS or spec.endswith(".gguf"):
        return load_model(spec)[1]
    tok = _load(spec)
    if tok is None:
        raise GPConvError(f"cannot load a tokenizer from {spec!r}")
    return tok


def build_model(recipe: Mapping, meta: bool = False):
    """``(model, tokenizer)`` of ``recipe["model"]``; ``meta=True``: shapes only, no weights, no tokenizer."""
    import gpconv
    from .models import build_meta, parse_dtype

    m = recipe["model"]
    if m["config"] is not None:
        cfg = model_config(m["config"])
        if meta:
            return build_meta(cfg), None
        from transformers import AutoModelForCausalLM

        from .models import _quiet

        torch.manual_seed(recipe["seed"])  # from scratch: the seed decides the init
        try:
            with _quiet():
                model = AutoModelForCausalLM.from_config(cfg, dtype=parse_dtype(m["dtype"]) or torch.float32)
        except (AssertionError, ValueError, TypeError, KeyError) as e:  # e.g. a pad id outside the vocabulary
            raise GPConvError(f"recipe model.config: cannot build the model ({str(e).strip() or type(e).__name__})") from None
        model.config._name_or_path = recipe["name"]
        tok = load_tokenizer(m["tokenizer"])
        _fit_tokenizer(model, tok)
        return model.eval(), tok
    if meta:
        return gpconv.load_model(m["name"], meta=True)
    model, tok = gpconv.load_model(m["name"], dtype=m["dtype"])
    if m["tokenizer"] is not None:
        tok = load_tokenizer(m["tokenizer"])
    return model, tok


def _fit_tokenizer(model, tok) -> None:
    """A model built from a config must predict every token of its tokenizer; ids the config
    names (eos, pad) follow the tokenizer, so generation stops where the data ends."""
    from .report import output_embedding

    head = output_embedding(model)
    vocab = head.weight.shape[0] if head is not None else None
    if vocab is not None and len(tok) > vocab:
        raise GPConvError(f"the tokenizer has {len(tok):,} tokens but model.config.vocab_size is {vocab:,}; raise vocab_size")
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        if tok.eos_token_id is not None:
            gen.eos_token_id = tok.eos_token_id
        if tok.pad_token_id is not None:
            gen.pad_token_id = tok.pad_token_id


def surgery_config(recipe: Mapping):
    from .surgery import GPConvConfig

    s = {k: v for k, v in recipe["surgery"].items() if k != "calibration"}
    return _build(GPConvConfig, "surgery", s)


def train_config(recipe: Mapping, progress: bool | None = None):
    from .training import TrainConfig

    t = dict(recipe["train"])
    if progress is not None:
        t["progress"] = progress
    o = recipe["output"]
    return _build(TrainConfig, "train", {**t, "out_dir": o["dir"], "resume": o["resume"], "overwrite": o["overwrite"],
                                        "seed": recipe["seed"]})


def _rows(data: Mapping):
    """The data rows, filtered (``data.filter``) before the split, so held-out rows obey it too."""
    from .data import Rows, load_rows

    rows = load_rows(str(data["source"]), split=data["split"], streaming=data["streaming"], max_samples=data["max_samples"])
    if not data["filter"]:
        return rows
    keep = {c: set(v) if isinstance(v, list) else {v} for c, v in data["filter"].items()}

    def ok(row):
        return all(row.get(c) in vals for c, vals in keep.items())

    if rows.streaming:
        return Rows(rows.rows.filter(ok), rows.schema, rows.name)
    first = rows.rows[0] if rows.rows else {}
    for c in keep:
        if c not in first:
            raise GPConvError(f"data.filter: {rows.name} has no column {c!r} (columns: {', '.join(first)})")
    kept = [r for r in rows.rows if ok(r)]
    if not kept:
        raise GPConvError(f"data.filter {data['filter']} keeps no row of {rows.name}")
    return Rows(kept, rows.schema, rows.name)


def build_data(recipe: Mapping, tokenizer, rows=None):
    """``(train_blocks, val_blocks)`` as ``gpconv.build_datasets`` makes them (from ``rows``
    when they were read already)."""
    import gpconv

    d = recipe["data"]
    if tokenizer is None:
        raise GPConvError("this model has no tokenizer; set model.tokenizer")
    return gpconv.build_datasets(
        rows if rows is not None else _rows(d), tokenizer, format=d["format"], block_size=d["block_size"], val_size=d["val_size"],
        seed=recipe["seed"], response_only=d["response_only"], pack=d["pack"],
    )


def plan(recipe: Mapping):
    """The parameter budget of a recipe, on the meta device (no weights, no data, no training):
    a :class:`~gpconv.report.ShrinkReport` with surgery, else the dense model's ParamCounts."""
    import gpconv
    from .surgery import describe

    model, _ = build_model(recipe, meta=True)
    if recipe["surgery"] is None:
        return describe(model, model_name=recipe["name"])
    cfg = dataclasses.replace(surgery_config(recipe), init="random", layer_selection="first")  # counts don't depend on either
    return gpconv.shrink(model, cfg, model_name=recipe["name"])


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@dataclass
class RecipeResult:
    recipe: dict
    model: torch.nn.Module
    tokenizer: Any
    report: Any = None
    """The ShrinkReport of the surgery (None for a dense recipe)."""
    train: Any = None
    """The TrainResult (None without a train section)."""
    metrics: dict = field(default_factory=dict)
    """``{"model": {...}, "teacher": {...}}``: gpconv.evaluate on the held-out blocks."""
    generations: list = field(default_factory=list)
    out_dir: Path | None = None
    wall_s: float = 0.0
    summary: dict = field(default_factory=dict)
    """What ``results.json`` holds."""


def _machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        info["loadavg"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def run_recipe(recipe: str | os.PathLike | Mapping, overrides=None, *, progress: bool | None = None,
               say: Callable[[str], None] = print) -> RecipeResult:
    """Run a recipe end to end and return what it made (see the module docs for the steps)."""
    import gpconv
    from .training import check_run_dir

    t_start = time.perf_counter()
    r = load_recipe(recipe, overrides)  # a resolved recipe resolves to itself
    check_complete(r)
    out = r["output"]["dir"]
    out_dir = Path(out).expanduser() if out else None
    if out_dir is not None:  # refuse a clobbered or unresumable directory before any work
        check_run_dir(out_dir, r["output"]["resume"], r["output"]["overwrite"])
    tcfg = train_config(r, progress) if r["train"] is not None else None
    machine = _machine()
    # the data rows are read (or the stream opened) first: a wrong file fails before any model loads
    rows = _rows(r["data"]) if r["data"] is not None else None

    # 1. model (and the teacher: a copy taken before surgery, or another model)
    m = r["model"]
    say(f"[{r['name']}] model: {m['name'] or 'built from model.config (random init)'}")
    model, tok = build_model(r)
    teacher = None
    teacher_tok = tok
    if r["teacher"] is not None:
        t = r["teacher"]
        if t["name"] == TEACHER_IS_MODEL:
            teacher = copy.deepcopy(model)
            if t["dtype"] is not None:
                from .models import parse_dtype

                teacher.to(parse_dtype(t["dtype"]))
        else:
            say(f"[{r['name']}] teacher: {t['name']}")
            teacher, teacher_tok = gpconv.load_model(t["name"], dtype=t["dtype"] or r["model"]["dtype"])
    before = gpconv.count_parameters(model)

    # 2. surgery
    report = None
    if r["surgery"] is not None:
        calib = None
        c = r["surgery"]["calibration"]
        cfg = surgery_config(r)
        if c is None and (cfg.init == "fit" or (cfg.layer_selection == "importance" and (cfg.num_layers or cfg.keep_layers))):
            c = dict(CALIBRATION)  # data-aware settings need calibration data: the recipe's data
        if c is not None:
            from .calibrate import calibration_from_source

            source = c["source"] or (r["data"] or {}).get("source")
            if not source or source == MISSING:
                raise GPConvError("surgery.calibration needs a source (surgery.calibration.source or data.source)")
            calib = calibration_from_source(str(source), tok, format=c["format"], block_size=c["block_size"],
                                            num_blocks=c["blocks"], sequential=c["sequential"], seed=r["seed"],
                                            refine_steps=c["refine_steps"], refine_lr=c["refine_lr"])
        report = gpconv.shrink(model, cfg, calibration=calib, model_name=r["name"])
        say(f"[{r['name']}] surgery: non-embedding parameters {report.before.non_embedding:,} -> "
            f"{report.after.non_embedding:,} ({report.after.non_embedding / max(report.before.non_embedding, 1):.1%})")
    after = gpconv.count_parameters(model)

    # 3. data
    train_blocks = val_blocks = None
    if r["data"] is not None:
        train_blocks, val_blocks = build_data(r, tok, rows)
        n_train = len(train_blocks) if isinstance(train_blocks, gpconv.TokenBlocks) else "streamed"
        say(f"[{r['name']}] data: {r['data']['source']} -> {n_train} training blocks, "
            f"{0 if val_blocks is None else len(val_blocks)} validation blocks of {r['data']['block_size']} tokens")

    # 4. training or distillation (writes the run directory: checkpoints, metrics, loss.png, model)
    res = None
    if tcfg is not None:
        if teacher is not None:
            res = gpconv.distill(model, teacher, train_blocks, tcfg, val_data=val_blocks, tokenizer=tok, teacher_tokenizer=teacher_tok)
        else:
            res = gpconv.train(model, train_blocks, tcfg, val_data=val_blocks, tokenizer=tok)
        model = res.model
    elif out_dir is not None:
        gpconv.save_pretrained(model, out_dir, tok, overwrite=r["output"]["overwrite"])

    # 5. evaluation on the held-out blocks, and a few generations
    metrics: dict[str, dict] = {}
    generations = []
    if r["eval"] is not None:
        ev = r["eval"]
        if val_blocks is not None and len(val_blocks):
            models = {"model": model, **({"teacher": teacher} if teacher is not None else {})}
            if res is not None and res.val is not None and _same_eval(r, tcfg):
                # training's last validation already was gpconv.evaluate on all these blocks in fp32
                metrics["model"] = {**res.val, "blocks": len(val_blocks)}
                del models["model"]
            metrics.update(gpconv.compare(models, val_blocks, batch_size=ev["batch_size"], max_batches=ev["max_batches"]))
            for k, m in metrics.items():
                say(f"[{r['name']}] {k}: validation loss {m['loss']:.4f}, perplexity {m['perplexity']:.2f}, "
                    f"accuracy {m['accuracy']:.3f} ({m['tokens']:,} tokens)")
        for p in ev["prompts"]:
            text = gpconv.generate(model, tok, p, max_new_tokens=ev["max_new_tokens"])
            generations.append({"prompt": p, "reply": text})
            say(f"[{r['name']}] {p!r} -> {text!r}")

    wall = time.perf_counter() - t_start
    summary = {
        "recipe": r["name"],
        "mode": "none" if res is None else ("distill" if teacher is not None else "train"),
        "params": {"before": before.to_dict(), "after": after.to_dict()},
        "val": metrics.get("model"),
        "teacher_val": metrics.get("teacher"),
        "steps": None if res is None else res.steps,
        "tokens": None if res is None else res.tokens,
        "train_s": None if res is None else round(res.train_s, 3),
        "wall_s": round(wall, 3),
        "generations": generations,
        "machine": {**machine, "loadavg_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
    }
    # 6. outputs beside the model: the resolved recipe, the surgery report, the results
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_text(out_dir / "recipe.yaml", dump(r))
        if report is not None:
            _write_text(out_dir / "gpconv_report.json", report.to_json() + "\n")
            _write_text(out_dir / "gpconv_report.md", report.to_markdown())
        _write_text(out_dir / "results.json", json.dumps(summary, indent=2, default=_json_default) + "\n")
        say(f"[{r['name']}] outputs in {out_dir}  (load: gpconv.from_pretrained({str(out_dir)!r}))")
    return RecipeResult(r, model, tok, report, res, metrics, generations, out_dir, wall, summary)


def _same_eval(r: Mapping, tcfg) -> bool:
    """Did training's final validation compute exactly what the eval step would (every block, fp32)?"""
    from .training import _mixed_precision

    return r["eval"]["max_batches"] is None and tcfg.eval_batches is None and _mixed_precision(tcfg.precision) == "no"


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    return str(o)
