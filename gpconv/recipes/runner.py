"""The recipe runner: one YAML file names a whole pipeline, and :func:`run_recipe` runs it.

    model (or a config: from scratch) -> surgery -> data -> training or distillation
        -> evaluation -> outputs

The format is :mod:`gpconv.recipes.schema`. The runner is deliberately a plain script over the
library (``load_model``, ``shrink``, ``build_datasets``, ``train``/``distill``, ``evaluate``,
``save_pretrained``): reading it tells you exactly what a recipe does.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from transformers import AutoModelForCausalLM

from ..data import DataConfig, Rows, TokenBlocks, build_datasets, load_rows
from ..errors import GPConvError
from ..fsutil import write_text_atomic
from ..hfutil import CONFIG_ERRORS, config_for, first_line, output_embedding, parse_dtype, quiet
from ..hub import build_meta, load_config, load_model, load_tokenizer, save_pretrained
from ..recovery import TrainConfig, check_run_dir, compare, distill, generate, train
from ..recovery.trainable import mixed_precision
from ..schema import validate
from ..surgery import CalibrationConfig, GPConvConfig, calibration_from_source, count_parameters, describe, shrink
from ..system import machine_info
from .schema import MISSING, TEACHER_IS_MODEL, check_complete, dump, load_recipe


def model_config(section: Mapping):
    """A transformers config from ``model.config``: ``model_type`` + fields, or ``base`` (a model
    spec whose config to start from) + the fields to change."""
    values = dict(section)
    base = values.pop("base", None)
    if base is not None:
        cfg = load_config(str(base))
        values.pop("model_type", None)
        for k, v in values.items():
            try:
                setattr(cfg, k, v)
            except CONFIG_ERRORS as e:
                raise GPConvError(f"recipe model.config.{k}: {first_line(e)}") from None
        return cfg
    return config_for(values.pop("model_type"), values, "recipe model.config")


def build_model(recipe: Mapping, meta: bool = False):
    """``(model, tokenizer)`` of ``recipe["model"]``; ``meta=True``: shapes only, no weights, no tokenizer."""
    m = recipe["model"]
    if m["config"] is not None:
        cfg = model_config(m["config"])
        if meta:
            return build_meta(cfg), None
        torch.manual_seed(recipe["seed"])  # from scratch: the seed decides the init
        try:
            with quiet():
                model = AutoModelForCausalLM.from_config(cfg, dtype=parse_dtype(m["dtype"]) or torch.float32)
        except (AssertionError, *CONFIG_ERRORS) as e:  # e.g. a pad id outside the vocabulary
            raise GPConvError(f"recipe model.config: cannot build the model ({str(e).strip() or type(e).__name__})") from None
        model.config._name_or_path = recipe["name"]
        tok = load_tokenizer(m["tokenizer"], required=True)
        _fit_tokenizer(model, tok)
        return model.eval(), tok
    if meta:
        return load_model(m["name"], meta=True)
    model, tok = load_model(m["name"], dtype=m["dtype"])
    if m["tokenizer"] is not None:
        tok = load_tokenizer(m["tokenizer"], required=True)
    return model, tok


def _fit_tokenizer(model, tok) -> None:
    """A model built from a config must predict every token of its tokenizer; ids the config
    names (eos, pad) follow the tokenizer, so generation stops where the data ends."""
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


def surgery_config(recipe: Mapping) -> GPConvConfig:
    s = {k: v for k, v in recipe["surgery"].items() if k != "calibration"}
    return validate(GPConvConfig, s, "recipe section surgery")


def train_config(recipe: Mapping, progress: bool | None = None) -> TrainConfig:
    t = dict(recipe["train"])
    if progress is not None:
        t["progress"] = progress
    o = recipe["output"]
    return validate(TrainConfig, {**t, "out_dir": o["dir"], "resume": o["resume"], "overwrite": o["overwrite"],
                                "seed": recipe["seed"]}, "recipe section train")


def _rows(data: Mapping):
    """The data rows, filtered (``data.filter``) before the split, so held-out rows obey it too."""
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
    d = recipe["data"]
    if tokenizer is None:
        raise GPConvError("this model has no tokenizer; set model.tokenizer")
    cfg = DataConfig(format=d["format"], block_size=d["block_size"], val_size=d["val_size"],
                     response_only=d["response_only"], pack=d["pack"])
    return build_datasets(rows if rows is not None else _rows(d), tokenizer, cfg, seed=recipe["seed"])


def plan(recipe: Mapping):
    """The parameter budget of a recipe, on the meta device (no weights, no data, no training):
    a :class:`~gpconv.ShrinkReport` with surgery, else the dense model's ParamCounts."""
    model, _ = build_model(recipe, meta=True)
    if recipe["surgery"] is None:
        return describe(model, model_name=recipe["name"])
    cfg = dataclasses.replace(surgery_config(recipe), init="random", layer_selection="first")  # counts don't depend on either
    return shrink(model, cfg, model_name=recipe["name"])


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


def run_recipe(recipe: str | os.PathLike | Mapping, overrides=None, *, progress: bool | None = None,
               say: Callable[[str], None] = print) -> RecipeResult:
    """Run a recipe end to end and return what it made (see the module docs for the steps)."""
    t_start = time.perf_counter()
    r = load_recipe(recipe, overrides)  # a resolved recipe resolves to itself
    check_complete(r)
    out = r["output"]["dir"]
    out_dir = Path(out).expanduser() if out else None
    if out_dir is not None:  # refuse a clobbered or unresumable directory before any work
        check_run_dir(out_dir, r["output"]["resume"], r["output"]["overwrite"])
    tcfg = train_config(r, progress) if r["train"] is not None else None
    machine = machine_info()
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
                teacher.to(parse_dtype(t["dtype"]))
        else:
            say(f"[{r['name']}] teacher: {t['name']}")
            teacher, teacher_tok = load_model(t["name"], dtype=t["dtype"] or r["model"]["dtype"])
    before = count_parameters(model)

    # 2. surgery
    report = None
    if r["surgery"] is not None:
        calib = None
        c = r["surgery"]["calibration"]
        cfg = surgery_config(r)
        if c is None and (cfg.init == "fit" or (cfg.layer_selection == "importance" and (cfg.num_layers or cfg.keep_layers))):
            c = dataclasses.asdict(CalibrationConfig())  # data-aware settings need calibration data: the recipe's data
        if c is not None:
            source = c["source"] or (r["data"] or {}).get("source")
            if not source or source == MISSING:
                raise GPConvError("surgery.calibration needs a source (surgery.calibration.source or data.source)")
            calib = calibration_from_source(CalibrationConfig(**{**c, "source": str(source)}), tok, seed=r["seed"])
        report = shrink(model, cfg, calibration=calib, model_name=r["name"])
        say(f"[{r['name']}] surgery: non-embedding parameters {report.before.non_embedding:,} -> "
            f"{report.after.non_embedding:,} ({report.after.non_embedding / max(report.before.non_embedding, 1):.1%})")
    after = count_parameters(model)

    # 3. data
    train_blocks = val_blocks = None
    if r["data"] is not None:
        train_blocks, val_blocks = build_data(r, tok, rows)
        n_train = len(train_blocks) if isinstance(train_blocks, TokenBlocks) else "streamed"
        say(f"[{r['name']}] data: {r['data']['source']} -> {n_train} training blocks, "
            f"{0 if val_blocks is None else len(val_blocks)} validation blocks of {r['data']['block_size']} tokens")

    # 4. training or distillation (writes the run directory: checkpoints, metrics, loss.png, model)
    res = None
    if tcfg is not None:
        if teacher is not None:
            res = distill(model, teacher, train_blocks, tcfg, val_data=val_blocks, tokenizer=tok, teacher_tokenizer=teacher_tok)
        else:
            res = train(model, train_blocks, tcfg, val_data=val_blocks, tokenizer=tok)
        model = res.model
    elif out_dir is not None:
        save_pretrained(model, out_dir, tok, overwrite=r["output"]["overwrite"])

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
            metrics.update(compare(models, val_blocks, batch_size=ev["batch_size"], max_batches=ev["max_batches"]))
            for k, m in metrics.items():
                say(f"[{r['name']}] {k}: validation loss {m['loss']:.4f}, perplexity {m['perplexity']:.2f}, "
                    f"accuracy {m['accuracy']:.3f} ({m['tokens']:,} tokens)")
        for p in ev["prompts"]:
            text = generate(model, tok, p, max_new_tokens=ev["max_new_tokens"])
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
        write_text_atomic(out_dir / "recipe.yaml", dump(r))
        if report is not None:
            report.save(out_dir)
        write_text_atomic(out_dir / "results.json", json.dumps(summary, indent=2, default=_json_default) + "\n")
        say(f"[{r['name']}] outputs in {out_dir}  (load: gpconv.from_pretrained({str(out_dir)!r}))")
    return RecipeResult(r, model, tok, report, res, metrics, generations, out_dir, wall, summary)


def _same_eval(r: Mapping, tcfg) -> bool:
    """Did training's final validation compute exactly what the eval step would (every block, fp32)?"""
    return r["eval"]["max_batches"] is None and tcfg.eval_batches is None and mixed_precision(tcfg.precision) == "no"


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    return str(o)
