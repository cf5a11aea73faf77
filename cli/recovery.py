"""Recovery commands: distill, train, eval, generate. Thin shells over gpconv.recovery.

Their data options come from :class:`gpconv.data.DataConfig`, their training options from
:class:`gpconv.TrainConfig` (:mod:`gpconv_cli.options`): a default lives in one place.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

import typer

from gpconv.recovery import TrainConfig
from gpconv.recovery import evaluate as _evaluate_fn
from gpconv.recovery import evaluate_tasks as _evaluate_tasks_fn
from gpconv.recovery import generate as _generate_fn

from .app import DATA, app, user_errors
from .options import Flag, Group, options, signature_group

_DATA = typer.Option(..., "--data", "-d", help="lamini | dolly | wikitext2 | a hub dataset id | a local .json/.jsonl/.parquet/.csv/.txt file.")
_DTYPE = typer.Option("float32", "--dtype", help="Weights as loaded: float32 | bfloat16 | float16 | auto.")

_TRAIN_FLAGS = {
    "out_dir": Flag(("--out", "-o"), Path, str, default=..., param="out",
                    help="Run directory: checkpoints/, metrics, loss.png and the final model."),
    "train": Flag(("--train",), param="train_mode"),
    "batch_size": Flag(("--batch-size", "-b")),
    "max_grad_norm": Flag(parse=lambda v: v or None, help="Gradient clipping (0: off)."),
    "metrics_format": Flag(("--metrics",)),
    "seed": Flag(help="Seed of the split, the data order and the initialisation."),
}
_DISTILL_ONLY = ("kl_weight", "ce_weight", "hidden_weight", "temperature", "teacher_top_k")
DISTILL = Group(TrainConfig, exclude=("betas",), flags=_TRAIN_FLAGS)
TRAIN = Group(TrainConfig, exclude=("betas", *_DISTILL_ONLY), flags=_TRAIN_FLAGS)
EVAL_DATA = dataclasses.replace(DATA, exclude=DATA.exclude + ("streaming",))
EVALUATE = signature_group(_evaluate_fn, flags={"batch_size": Flag(("--batch-size", "-b"), help=(
    "Blocks (--data) or lm-eval requests (--tasks) per forward pass."))})
TASKS = signature_group(_evaluate_tasks_fn, exclude=("batch_size", "manager"))  # --batch-size: EVALUATE's
GENERATE = signature_group(_generate_fn, flags={"chat": Flag(("--chat/--no-chat",), help=(
    "Feed the prompt through the chat template (--no-chat: as raw text)."))})


def _main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _run_config(group: Group, opts: dict) -> TrainConfig:
    """The run's TrainConfig, its directory checked before anything loads."""
    from gpconv.recovery import check_run_dir

    cfg = group.build(opts)
    check_run_dir(cfg.out_dir, cfg.resume, cfg.overwrite)
    return cfg


def _rows(data: str, data_cfg, cfg=None):
    """Read (or open the stream of) the data and check its columns: before any model is loaded.
    With the run's ``cfg``, also check that a stream (no length) comes with a step count."""
    from gpconv.data import load_rows
    from gpconv.errors import GPConvError

    rows = load_rows(data, split=data_cfg.split, streaming=data_cfg.streaming, max_samples=data_cfg.max_samples)
    if cfg is not None and rows.streaming and not cfg.max_steps:
        raise GPConvError(f"streamed data ({data}) has no length: give --max-steps")
    return rows


def _datasets(tok, rows, data_cfg, seed: int, fix: str = "save one beside the model (tokenizer.json)"):
    import gpconv
    from gpconv.errors import GPConvError

    if tok is None:
        raise GPConvError(f"the model has no tokenizer; {fix}")
    return gpconv.build_datasets(rows, tok, data_cfg, seed=seed)


def _load(spec: str, dtype: str):
    """``(model, tokenizer)``; a ``config.json`` file builds a randomly initialised model (from scratch)."""
    import gpconv
    from gpconv.errors import GPConvError
    from gpconv.hfutil import config_for, parse_dtype

    path = Path(spec).expanduser()
    if path.suffix == ".json" and path.is_file():
        import torch
        from transformers import AutoModelForCausalLM

        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:  # not JSON, not UTF-8
            raise GPConvError(f"{spec} is not valid JSON ({e})") from None
        if not isinstance(raw, dict) or "model_type" not in raw:
            raise GPConvError(f"{spec} has no model_type; not a transformers config")
        cfg = config_for(raw.pop("model_type"), raw, spec)
        return AutoModelForCausalLM.from_config(cfg, dtype=parse_dtype(dtype) or torch.float32), None
    return gpconv.load_model(spec, dtype=dtype)


def _summary(res) -> None:
    if not _main_process():
        return
    v = res.val
    line = f"trained {res.steps} steps, {res.tokens:,} tokens in {res.train_s:.0f} s"
    if res.teacher_s:
        line += f" (teacher forward {res.teacher_s:.0f} s)"
    typer.echo(line)
    if v:
        typer.echo(f"validation: loss {v['loss']:.4f}, perplexity {v['perplexity']:.2f}, accuracy {v['accuracy']:.3f}")
    typer.echo(f"saved to {res.out_dir}  (load: gpconv.from_pretrained({str(res.out_dir)!r}))")


@app.command(
    epilog="""**Examples**

    gpconv shrink smollm2-135m-instruct --out smol-kp -m 64 --init project
    gpconv distill smol-kp --teacher smollm2-135m-instruct --data alpaca.json --out smol-kd --max-steps 300 --block-size 256

    gpconv distill kphi3-mini --teacher microsoft/Phi-3-mini-4k-instruct --data lamini --out kphi3-mini-kd --max-steps 20000

    gpconv distill kphi3-mini --teacher microsoft/Phi-3-mini-4k-instruct --data lamini --out kphi3-mini-kd --max-steps 20000 --resume

    accelerate launch --multi_gpu --num_processes 8 -m gpconv_cli distill ... (several GPUs; DDP)

    torchrun --nproc_per_node 2 -m gpconv_cli distill ... (several CPU processes; gloo)
"""
)
@user_errors
@options(DISTILL, DATA)
def distill(
    student: str = typer.Argument(..., help="The shrunk model: a gpconv checkpoint directory (gpconv shrink), or any model spec."),
    teacher: str = typer.Option(..., "--teacher", help="The original model: hub id, local directory, .gguf, or built-in name."),
    data: str = _DATA,
    teacher_cache: Optional[Path] = typer.Option(None, "--teacher-cache", help="Directory of a teacher cache: read it if it exists (no teacher loaded when it holds every training block), and save it, with the blocks this run added, at the end. Needs --teacher-top-k to start a new one."),
    dtype: str = _DTYPE,
    **opts,
):
    """Distil a shrunk student from its teacher (loss a·KL + b·CE + c·hidden-state error); the teacher stays frozen."""
    import gpconv

    cfg = _run_config(DISTILL, opts)
    data_cfg = DATA.build(opts)
    rows = _rows(data, data_cfg, cfg)
    cache = _open_teacher_cache(teacher_cache, cfg)
    s_model, s_tok = _load(student, dtype)
    train = val = t_model = t_tok = None
    if s_tok is not None:  # data first: a cache holding every block makes the teacher unnecessary
        train, val = _datasets(s_tok, rows, data_cfg, cfg.seed)
    if cache is not None and train is not None and cache.covers(train):
        typer.echo(f"teacher cache {teacher_cache} holds all {len(train):,} training blocks: the teacher is not loaded")
    else:
        t_model, t_tok = gpconv.load_model(teacher, dtype=dtype, need_weights=True)
        if train is None:  # the student has no tokenizer: the teacher's
            train, val = _datasets(t_tok, rows, data_cfg, cfg.seed)
        if cache is not None:
            cache.check_teacher(t_model)
        elif cfg.teacher_top_k:
            cache = gpconv.TeacherCache(t_model, cfg.teacher_top_k, cfg.temperature)
    res = gpconv.distill(s_model, t_model if cache is None else cache, train, cfg, val_data=val, tokenizer=s_tok or t_tok,
                         teacher_tokenizer=t_tok)
    _finish_teacher_cache(cache, teacher_cache)
    _summary(res)


def _open_teacher_cache(path: Optional[Path], cfg):
    """The teacher cache at ``path`` when it exists (checked against the run's settings before any
    model loads), else None; refuses settings that cannot make or use one."""
    import gpconv
    from gpconv.errors import GPConvError
    from gpconv.recovery.teacher_cache import check_settings

    if path is None:
        return None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise GPConvError("--teacher-cache needs a single process (each process would cache only its own blocks); "
                          "--teacher-top-k alone works with several")
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        if not cfg.teacher_top_k:
            raise GPConvError(f"teacher cache {path} does not exist; give --teacher-top-k to start one there")
        return None
    cache = gpconv.TeacherCache.load(path)
    check_settings(cfg, cache, ("--teacher-top-k", "--temperature", "--hidden-weight"))
    return cache


def _finish_teacher_cache(cache, path: Optional[Path]) -> None:
    if cache is None or not _main_process():
        return
    line = f"teacher cache: {len(cache):,} blocks, {cache.hits:,} lookups served from it, {cache.misses:,} computed"
    if path is not None:
        cache.save(path)
        line += f"; saved to {path}"
    typer.echo(line)


@app.command(
    epilog="""**Examples**

    gpconv train smol-kp --data alpaca.json --out smol-ft --max-steps 300 --lr 1e-4

    gpconv shrink smollm2-135m-instruct --out smol-mlp -m 64 --targets mlp --init project   (attention stays dense)
    gpconv train smol-mlp --data dolly --out smol-lora --train lora --response-only --format chat-template

    gpconv shrink ./phi3-config-dir --out kphi3-random -m 256   (a config-only directory: random init)
    gpconv train kphi3-random --tokenizer microsoft/Phi-3-mini-4k-instruct --data lamini --out kphi3-scratch --max-steps 50000 --lr 1e-3

    gpconv train ./config.json --tokenizer microsoft/Phi-3-mini-4k-instruct --data lamini --out scratch --max-steps 1000
"""
)
@user_errors
@options(TRAIN, DATA)
def train(
    model: str = typer.Argument(..., help="Model to train: directory, hub id, .gguf, built-in name, or a config.json (random init)."),
    data: str = _DATA,
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Tokenizer to use when the model has none (e.g. from a config)."),
    dtype: str = _DTYPE,
    **opts,
):
    """Train with plain next-token cross-entropy: fine-tune, or train from scratch from a config."""
    import gpconv
    from gpconv.hub import load_tokenizer

    cfg = _run_config(TRAIN, opts)
    data_cfg = DATA.build(opts)
    rows = _rows(data, data_cfg, cfg)
    m, tok = _load(model, dtype)
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer, required=True)
    train_blocks, val = _datasets(tok, rows, data_cfg, cfg.seed, fix="pass --tokenizer")
    res = gpconv.train(m, train_blocks, cfg, val_data=val, tokenizer=tok)
    _summary(res)


@app.command(
    name="eval",
    epilog="""**Examples**

    gpconv eval smol-kd --teacher smollm2-135m-instruct --data alpaca.json --block-size 256

    gpconv eval smol-kd --data wikitext2.txt --split all --json

    gpconv eval smol-kd --teacher smollm2-135m-instruct --tasks hellaswag,arc_easy --limit 200   (lm-eval; needs the hub)

    gpconv eval smol-kd --tasks my_tasks/ppl.yaml,my_tasks/mc.yaml --json   (local task YAMLs: offline)
""",
)
@user_errors
@options(EVAL_DATA, EVALUATE, TASKS)
def eval_(
    model: str = typer.Argument(..., help="Model to evaluate (directory, hub id, .gguf, built-in name)."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Also evaluate this model, side by side."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help=(
        "Held-out data: lamini | dolly | wikitext2 | a hub dataset id | a local .json/.jsonl/.parquet/.csv/.txt file; "
        "or give --tasks.")),
    tasks: Optional[str] = typer.Option(None, "--tasks", help=(
        "lm-eval-harness tasks instead of --data: comma-separated task names (hellaswag, arc_easy, ...), "
        "task YAML files, or directories of them (needs gpconv[eval]).")),
    split: str = typer.Option("val", "--split", help="val: the held-out rows of the same split training used | all: every row."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split (the one training used)."),
    dtype: str = _DTYPE,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    **opts,
):
    """Loss, perplexity and next-token accuracy on held-out data (--data), or lm-eval-harness
    tasks (--tasks); with --teacher, side by side."""
    import gpconv
    from gpconv.errors import GPConvError
    from gpconv.recovery import check_vocab, compare

    if (data is None) == (tasks is None):
        raise GPConvError("give either --data (held-out perplexity) or --tasks (lm-eval tasks)")
    if tasks is not None:
        _eval_tasks(model, teacher, tasks, dtype, as_json, opts)
        return
    if opts["limit"] is not None or opts["num_fewshot"] is not None:
        raise GPConvError("--limit and --num-fewshot apply to --tasks; with --data use --max-batches")
    if split not in ("val", "all"):
        raise GPConvError(f"--split must be val or all, got {split!r}")
    data_cfg = EVAL_DATA.build(opts)
    if split == "all":
        data_cfg = dataclasses.replace(data_cfg, val_size=0)
    rows = _rows(data, data_cfg)
    m, tok = gpconv.load_model(model, dtype=dtype, need_weights=True)
    models = {"student" if teacher else "model": m}
    t_tok = None
    if teacher:
        t_model, t_tok = gpconv.load_model(teacher, dtype=dtype, need_weights=True)
        check_vocab(m, t_model, tok, t_tok)
        models["teacher"] = t_model
    tok = tok or t_tok
    train, val = _datasets(tok, rows, data_cfg, seed)
    blocks = train if split == "all" else val
    if blocks is None:
        raise GPConvError("the validation split is empty; pass --val-size or use --split all")
    if not isinstance(blocks, gpconv.data.TokenBlocks):
        raise GPConvError("--split all on a streamed dataset never ends; use --split val or --max-samples")
    results = compare(models, blocks, **EVALUATE.values(opts))
    if as_json:
        typer.echo(json.dumps({"data": data, "split": split, "block_size": data_cfg.block_size, "format": data_cfg.format,
                               "response_only": data_cfg.response_only, **results}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    resp = ", responses only" if data_cfg.response_only else ""
    table = Table(title=f"{data} ({split}, {data_cfg.format}, block {data_cfg.block_size}{resp})")
    table.add_column("metric")
    for name in results:
        table.add_column(name, justify="right")
    for key, fmt_ in (("loss", "{:.4f}"), ("perplexity", "{:.2f}"), ("accuracy", "{:.3f}"), ("tokens", "{:,}")):
        table.add_row(key, *(fmt_.format(r[key]) for r in results.values()))
    Console().print(table)


def _eval_tasks(model: str, teacher: Optional[str], tasks: str, dtype: str, as_json: bool, opts: dict) -> None:
    """``gpconv eval --tasks``: the tasks checked (and their data loaded) before any model loads."""
    import gpconv
    from gpconv.errors import GPConvError
    from gpconv.recovery import evaluate_tasks, task_manager

    if opts["max_batches"] is not None:
        raise GPConvError("--max-batches applies to --data; with --tasks use --limit")
    names, manager = task_manager(tasks)
    m, tok = gpconv.load_model(model, dtype=dtype, need_weights=True)
    models, toks = {"student" if teacher else "model": m}, {"student" if teacher else "model": tok}
    if teacher:
        models["teacher"], toks["teacher"] = gpconv.load_model(teacher, dtype=dtype, need_weights=True)
    res = evaluate_tasks(models, toks, names, manager=manager, batch_size=opts["batch_size"], **TASKS.values(opts))
    res = {"models": {"student": model, "teacher": teacher} if teacher else {"model": model},
           "limit": opts["limit"], "num_fewshot": opts["num_fewshot"], **res}
    if as_json:
        typer.echo(json.dumps(res, indent=2))
        return
    from rich.console import Console

    Console().print(_task_table(res, list(models)))


def _fmt(v) -> str:
    """4 decimals, or 4 significant digits for the huge perplexities of weak models."""
    return "" if v is None else (f"{v:.4g}" if abs(v) >= 1e5 else f"{v:.4f}")


def _task_table(res: dict, names: list[str]):
    """One row per (task, metric): each model's value and, with a teacher, student - teacher."""
    from rich.table import Table

    limit = f", limit {res['limit']:g}" if res["limit"] is not None else ""
    table = Table(title=f"lm-eval tasks{limit}")
    table.add_column("task")
    table.add_column("metric")
    for name in names:
        table.add_column(name, justify="right")
    if "teacher" in names:
        table.add_column("student - teacher", justify="right")
    for task, metrics in res["tasks"].items():
        for metric, vals in metrics.items():
            arrow = {True: " ↑", False: " ↓"}.get(res["higher_is_better"].get(task, {}).get(metric), "")
            cells = [_fmt(vals.get(n)) for n in names]
            if "teacher" in names and None not in (vals.get("student"), vals.get("teacher")):
                cells.append(_fmt(vals["student"] - vals["teacher"]))
            table.add_row(task, metric + arrow, *cells)
    return table


@app.command(
    epilog="""**Examples**

    gpconv generate smollm2-135m-instruct "What is the capital of France?"

    gpconv generate smol-kd "Write a haiku about pruning." --do-sample --temperature 0.2 --top-p 0.9 --max-new-tokens 64
"""
)
@user_errors
@options(GENERATE)
def generate(
    model: str = typer.Argument(..., help="Model (directory, hub id, .gguf, built-in name), or an ONNX export (gpconv export)."),
    prompt: str = typer.Argument(..., help="The user message."),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16."),
    **opts,
):
    """Reply to a prompt through the model's chat template."""
    import gpconv
    from gpconv.deploy import is_onnx_export
    from gpconv.recovery import generate as reply

    if is_onnx_export(model):  # an ONNX export: ONNX Runtime with its KV cache
        typer.echo(_onnx_reply(model, prompt, GENERATE.values(opts)))
        return
    m, tok = gpconv.load_model(model, dtype=dtype, need_weights=True)
    typer.echo(reply(m, tok, prompt, **GENERATE.values(opts)))


def _onnx_reply(path: str, prompt: str, o: dict) -> str:
    from gpconv.deploy import OnnxCausalLM
    from gpconv.hub import load_tokenizer
    from gpconv.recovery import chat_prompt

    from gpconv.errors import GPConvError

    if o["repetition_penalty"] != 1.0 or o["static_cache"]:
        flag = "--repetition-penalty" if o["repetition_penalty"] != 1.0 else "--static-cache"
        raise GPConvError(f"{flag} is not supported for ONNX exports (greedy, temperature and top-p are)")
    lm = OnnxCausalLM(path)  # first: an incomplete export says what it lacks
    tok = load_tokenizer(path, required=True)
    ids = chat_prompt(tok, prompt, o["system"], o["chat"]).numpy()
    out = lm.generate(ids, o["max_new_tokens"], do_sample=o["do_sample"], temperature=o["temperature"],
                                      top_p=o["top_p"], seed=o["seed"])
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
