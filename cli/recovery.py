"""Recovery commands: distill, train, eval, generate. Thin shells over gpconv.training / evaluation."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from .app import app, user_errors

# Data options, shared by distill, train and eval ------------------------------------------

_DATA = typer.Option(..., "--data", "-d", help="lamini | dolly | wikitext2 | a hub dataset id | a local .json/.jsonl/.parquet/.csv/.txt file.")
_FORMAT = typer.Option("kphi3", "--format", help="kphi3 (<|user|>...<|end|><|assistant|>...<|end|>, the paper) | chat-template | plain.")
_BLOCK = typer.Option(512, "--block-size", help="Tokens per packed block.")
_VAL = typer.Option(None, "--val-size", help="Held-out rows: an integer count or a fraction like 0.05. [default: 5% up to 1000]")
_SEED = typer.Option(0, "--seed", help="Seed of the split, the data order and the initialisation.")
_RESP = typer.Option(False, "--response-only", help="Count the loss on response tokens only.")
_MAXS = typer.Option(None, "--max-samples", help="Read at most this many rows of the source.")
_PACK = typer.Option(True, "--pack/--no-pack", help="Concatenate samples into blocks, or one padded sample per block.")
_STREAM = typer.Option(None, "--streaming/--no-streaming", help="Read the source lazily. [default: only for lamini]")
_DTYPE = typer.Option("float32", "--dtype", help="Weights as loaded: float32 | bfloat16 | float16 | auto.")

# Training options, shared by distill and train ---------------------------------------------

_TRAIN = typer.Option(None, "--train", help="What trains: grouped (gpconv blocks only) | all | lora. [default: grouped for distill, all for train]")
_STEPS = typer.Option(None, "--max-steps", help="Optimizer steps (needed for streamed data). [default: --epochs passes]")
_EPOCHS = typer.Option(1.0, "--epochs", help="Passes over the training blocks when --max-steps is not given.")
_BS = typer.Option(8, "--batch-size", "-b", help="Blocks per micro-batch per process.")
_ACC = typer.Option(1, "--grad-accum", help="Micro-batches per optimizer step.")
_LR = typer.Option(3e-4, "--lr", help="Peak learning rate (AdamW, linear warm-up, cosine decay to 10%).")
_WARM = typer.Option(0.05, "--warmup-ratio", help="Share of the steps spent warming up.")
_WD = typer.Option(0.0, "--weight-decay", help="AdamW weight decay on matrices.")
_GLR = typer.Option(1.0, "--grouped-lr-scale", help="lr multiplier for the blocks' grouped weights (low-rank factors and the rest keep --lr; 0 freezes them).")
_CLIP = typer.Option(1.0, "--max-grad-norm", help="Gradient clipping (0: off).")
_LORA_R = typer.Option(16, "--lora-r", help="LoRA rank (--train lora).")
_LORA_A = typer.Option(32, "--lora-alpha", help="LoRA alpha (--train lora).")
_PREC = typer.Option("auto", "--precision", help="auto (bf16/fp16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16.")
_GC = typer.Option(False, "--gradient-checkpointing", help="Recompute activations in the backward pass (less memory).")
_SAVE = typer.Option(200, "--save-every", help="Checkpoint every N steps (0: never).")
_KEEP = typer.Option(2, "--keep-checkpoints", help="Checkpoints kept on disk.")
_EVAL = typer.Option(0, "--eval-every", help="Validate every N steps (0: before and after training only).")
_EVALB = typer.Option(None, "--eval-batches", help="Cap on validation micro-batches per evaluation.")
_LOG = typer.Option(10, "--log-every", help="Write a metrics row every N steps.")
_METRICS = typer.Option("jsonl", "--metrics", help="Metrics file format: jsonl | csv.")
_RESUME = typer.Option(False, "--resume", help="Continue from the newest checkpoint in --out.")
_OVER = typer.Option(False, "--overwrite", help="Delete a non-empty --out first.")
_NOPROG = typer.Option(False, "--no-progress", help="No progress bar.")
_OUT = typer.Option(..., "--out", "-o", help="Run directory: checkpoints/, metrics, loss.png and the final model.")


def _val_size(value: Optional[str]):
    from gpconv.errors import GPConvError

    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            raise GPConvError(f"--val-size takes a row count or a fraction like 0.05, got {value!r}") from None


def _main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _rows(data, fmt, val_size, max_samples, streaming, cfg=None):
    """Read (or open the stream of) the data and check its columns: before any model is loaded.
    With the run's ``cfg``, also check that a stream (no length) comes with a step count."""
    from gpconv.data import FORMATS, load_rows
    from gpconv.errors import GPConvError

    if fmt not in FORMATS:
        raise GPConvError(f"unknown data format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    _val_size(val_size)
    rows = load_rows(data, streaming=streaming, max_samples=max_samples)
    if cfg is not None and rows.streaming and not cfg.max_steps:
        raise GPConvError(f"streamed data ({data}) has no length: give --max-steps")
    return rows


def _datasets(tok, rows, fmt, block_size, val_size, seed, response_only, pack):
    import gpconv
    from gpconv.errors import GPConvError

    if tok is None:
        raise GPConvError("the model directory has no tokenizer; pass --tokenizer")
    return gpconv.build_datasets(rows, tok, format=fmt, block_size=block_size, val_size=_val_size(val_size), seed=seed,
                                 response_only=response_only, pack=pack)


def _load_tokenizer(spec: str):
    from gpconv.errors import GPConvError
    from gpconv.models import DEMO_MODELS, byte_tokenizer, load_model, load_tokenizer

    if spec == "tiny-phi3":
        return byte_tokenizer()
    if spec in DEMO_MODELS or spec.endswith(".gguf"):
        return load_model(spec)[1]
    tok = load_tokenizer(spec)
    if tok is None:
        raise GPConvError(f"cannot load a tokenizer from {spec!r}")
    return tok


def _load(spec: str, dtype: str):
    """``(model, tokenizer)``; a ``config.json`` file builds a randomly initialised model (from scratch)."""
    import gpconv
    from gpconv.errors import GPConvError
    from gpconv.models import parse_dtype

    path = Path(spec).expanduser()
    if path.suffix == ".json" and path.is_file():
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        raw = json.loads(path.read_text())
        if "model_type" not in raw:
            raise GPConvError(f"{spec} has no model_type; not a transformers config")
        cfg = AutoConfig.for_model(raw.pop("model_type"), **raw)
        return AutoModelForCausalLM.from_config(cfg, dtype=parse_dtype(dtype) or torch.float32), None
    return gpconv.load_model(spec, dtype=dtype)


# The training options distill and train share, as their parameters are named; each becomes the
# TrainConfig field of the same name, except the three _config renames.
_SHARED = ("max_steps", "epochs", "batch_size", "grad_accum", "lr", "warmup_ratio", "weight_decay", "max_grad_norm",
           "grouped_lr_scale", "lora_r", "lora_alpha", "precision", "gradient_checkpointing", "save_every",
           "keep_checkpoints", "eval_every", "eval_batches", "log_every", "metrics", "resume", "overwrite",
           "no_progress", "seed")


def _config(options: dict, **fields):
    """The run's TrainConfig from a command's parameters (``locals()``): the shared options, plus
    ``fields`` (a command's own). Three CLI names differ from TrainConfig's: --metrics
    (metrics_format), --no-progress (progress) and --max-grad-norm 0 (None: off); --train is
    ``train_mode`` here, as ``train`` is the command."""
    from gpconv.training import TrainConfig, check_run_dir

    shared = {name: options[name] for name in _SHARED}
    metrics, no_progress, max_grad_norm = shared.pop("metrics"), shared.pop("no_progress"), shared.pop("max_grad_norm")
    out = options["out"]
    cfg = TrainConfig(out_dir=str(out), train=options["train_mode"], metrics_format=metrics, progress=not no_progress,
                      max_grad_norm=max_grad_norm or None, **shared, **fields)
    check_run_dir(out, cfg.resume, cfg.overwrite)  # before loading anything
    return cfg


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
def distill(
    student: str = typer.Argument(..., help="The shrunk model: a gpconv checkpoint directory (gpconv shrink), or any model spec."),
    teacher: str = typer.Option(..., "--teacher", help="The original model: hub id, local directory, .gguf, or built-in name."),
    data: str = _DATA,
    out: Path = _OUT,
    kl_weight: float = typer.Option(1.0, "--kl-weight", help="a: weight of KL(teacher || student)."),
    ce_weight: float = typer.Option(0.0, "--ce-weight", help="b: weight of the cross-entropy on the data."),
    hidden_weight: float = typer.Option(0.0, "--hidden-weight", help="c: weight of the relative hidden-state error |h_s-h_t|²/|h_t|² (mean over decoder layers)."),
    temperature: float = typer.Option(1.0, "--temperature", help="Softmax temperature of the KL term."),
    teacher_top_k: int = typer.Option(0, "--teacher-top-k", help="KL on the teacher's top-k tokens + one bucket for the rest, each block's computed once and cached (0: the whole vocabulary, the teacher runs on every block)."),
    teacher_cache: Optional[Path] = typer.Option(None, "--teacher-cache", help="Directory of a teacher cache: read it if it exists (no teacher loaded when it holds every training block), and save it, with the blocks this run added, at the end. Needs --teacher-top-k to start a new one."),
    train_mode: Optional[str] = _TRAIN,
    fmt: str = _FORMAT, block_size: int = _BLOCK, val_size: Optional[str] = _VAL, seed: int = _SEED,
    response_only: bool = _RESP, max_samples: Optional[int] = _MAXS, pack: bool = _PACK, streaming: Optional[bool] = _STREAM,
    max_steps: Optional[int] = _STEPS, epochs: float = _EPOCHS, batch_size: int = _BS, grad_accum: int = _ACC,
    lr: float = _LR, warmup_ratio: float = _WARM, weight_decay: float = _WD, max_grad_norm: float = _CLIP,
    grouped_lr_scale: float = _GLR,
    lora_r: int = _LORA_R, lora_alpha: int = _LORA_A, precision: str = _PREC, gradient_checkpointing: bool = _GC,
    save_every: int = _SAVE, keep_checkpoints: int = _KEEP, eval_every: int = _EVAL, eval_batches: Optional[int] = _EVALB,
    log_every: int = _LOG, metrics: str = _METRICS, resume: bool = _RESUME, overwrite: bool = _OVER,
    no_progress: bool = _NOPROG, dtype: str = _DTYPE,
):
    """Distil a shrunk student from its teacher (loss a·KL + b·CE + c·hidden-state error); the teacher stays frozen."""
    import gpconv

    cfg = _config(locals(), kl_weight=kl_weight, ce_weight=ce_weight, hidden_weight=hidden_weight,
                  temperature=temperature, teacher_top_k=teacher_top_k)
    rows = _rows(data, fmt, val_size, max_samples, streaming, cfg)
    cache = _open_teacher_cache(teacher_cache, cfg)
    s_model, s_tok = _load(student, dtype)
    train = val = t_model = t_tok = None
    if s_tok is not None:  # data first: a cache holding every block makes the teacher unnecessary
        train, val = _datasets(s_tok, rows, fmt, block_size, val_size, seed, response_only, pack)
    if cache is not None and train is not None and cache.covers(train):
        typer.echo(f"teacher cache {teacher_cache} holds all {len(train):,} training blocks: the teacher is not loaded")
    else:
        t_model, t_tok = gpconv.load_model(teacher, dtype=dtype)
        if train is None:  # the student has no tokenizer: the teacher's
            train, val = _datasets(t_tok, rows, fmt, block_size, val_size, seed, response_only, pack)
        if cache is not None:
            cache.check_teacher(t_model)
        elif teacher_top_k:
            cache = gpconv.TeacherCache(t_model, teacher_top_k, temperature)
    res = gpconv.distill(s_model, t_model if cache is None else cache, train, cfg, val_data=val, tokenizer=s_tok or t_tok,
                         teacher_tokenizer=t_tok)
    _finish_teacher_cache(cache, teacher_cache)
    _summary(res)


def _open_teacher_cache(path: Optional[Path], cfg):
    """The teacher cache at ``path`` when it exists (checked against the run's settings before any
    model loads), else None; refuses settings that cannot make or use one."""
    import gpconv
    from gpconv.errors import GPConvError
    from gpconv.teacher_cache import check_settings

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
def train(
    model: str = typer.Argument(..., help="Model to train: directory, hub id, .gguf, built-in name, or a config.json (random init)."),
    data: str = _DATA,
    out: Path = _OUT,
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Tokenizer to use when the model has none (e.g. from a config)."),
    train_mode: Optional[str] = _TRAIN,
    fmt: str = _FORMAT, block_size: int = _BLOCK, val_size: Optional[str] = _VAL, seed: int = _SEED,
    response_only: bool = _RESP, max_samples: Optional[int] = _MAXS, pack: bool = _PACK, streaming: Optional[bool] = _STREAM,
    max_steps: Optional[int] = _STEPS, epochs: float = _EPOCHS, batch_size: int = _BS, grad_accum: int = _ACC,
    lr: float = _LR, warmup_ratio: float = _WARM, weight_decay: float = _WD, max_grad_norm: float = _CLIP,
    grouped_lr_scale: float = _GLR,
    lora_r: int = _LORA_R, lora_alpha: int = _LORA_A, precision: str = _PREC, gradient_checkpointing: bool = _GC,
    save_every: int = _SAVE, keep_checkpoints: int = _KEEP, eval_every: int = _EVAL, eval_batches: Optional[int] = _EVALB,
    log_every: int = _LOG, metrics: str = _METRICS, resume: bool = _RESUME, overwrite: bool = _OVER,
    no_progress: bool = _NOPROG, dtype: str = _DTYPE,
):
    """Train with plain next-token cross-entropy: fine-tune, or train from scratch from a config."""
    import gpconv

    cfg = _config(locals())
    rows = _rows(data, fmt, val_size, max_samples, streaming, cfg)
    m, tok = _load(model, dtype)
    if tokenizer is not None:
        tok = _load_tokenizer(tokenizer)
    train_blocks, val = _datasets(tok, rows, fmt, block_size, val_size, seed, response_only, pack)
    res = gpconv.train(m, train_blocks, cfg, val_data=val, tokenizer=tok)
    _summary(res)


@app.command(
    name="eval",
    epilog="""**Examples**

    gpconv eval smol-kd --teacher smollm2-135m-instruct --data alpaca.json --block-size 256

    gpconv eval smol-kd --data wikitext2.txt --split all --json
""",
)
@user_errors
def eval_(
    model: str = typer.Argument(..., help="Model to evaluate (directory, hub id, .gguf, built-in name)."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Also evaluate this model, side by side."),
    data: str = _DATA,
    split: str = typer.Option("val", "--split", help="val: the held-out rows of the same split training used | all: every row."),
    fmt: str = _FORMAT, block_size: int = _BLOCK, val_size: Optional[str] = _VAL, seed: int = _SEED,
    response_only: bool = _RESP, max_samples: Optional[int] = _MAXS, pack: bool = _PACK,
    batch_size: int = typer.Option(8, "--batch-size", "-b", help="Blocks per forward pass."),
    max_batches: Optional[int] = typer.Option(None, "--max-batches", help="Evaluate at most this many batches."),
    dtype: str = _DTYPE,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """Loss, perplexity and next-token accuracy on held-out data; with --teacher, side by side."""
    import gpconv
    from gpconv.errors import GPConvError
    from gpconv.training import _check_vocab

    if split not in ("val", "all"):
        raise GPConvError(f"--split must be val or all, got {split!r}")
    val_size = "0" if split == "all" else val_size
    rows = _rows(data, fmt, val_size, max_samples, None)
    m, tok = gpconv.load_model(model, dtype=dtype)
    models = {"student" if teacher else "model": m}
    t_tok = None
    if teacher:
        t_model, t_tok = gpconv.load_model(teacher, dtype=dtype)
        _check_vocab(m, t_model, tok, t_tok)
        models["teacher"] = t_model
    tok = tok or t_tok
    train, val = _datasets(tok, rows, fmt, block_size, val_size, seed, response_only, pack)
    blocks = train if split == "all" else val
    if blocks is None:
        raise GPConvError("the validation split is empty; pass --val-size or use --split all")
    if not isinstance(blocks, gpconv.TokenBlocks):
        raise GPConvError("--split all on a streamed dataset never ends; use --split val or --max-samples")
    results = gpconv.compare(models, blocks, batch_size=batch_size, max_batches=max_batches)
    if as_json:
        typer.echo(json.dumps({"data": data, "split": split, "block_size": block_size, "format": fmt,
                               "response_only": response_only, **results}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{data} ({split}, {fmt}, block {block_size}{', responses only' if response_only else ''})")
    table.add_column("metric")
    for name in results:
        table.add_column(name, justify="right")
    for key, fmt_ in (("loss", "{:.4f}"), ("perplexity", "{:.2f}"), ("accuracy", "{:.3f}"), ("tokens", "{:,}")):
        table.add_row(key, *(fmt_.format(r[key]) for r in results.values()))
    Console().print(table)


@app.command(
    epilog="""**Examples**

    gpconv generate smollm2-135m-instruct "What is the capital of France?"

    gpconv generate smol-kd "Write a haiku about pruning." --do-sample --temperature 0.2 --top-p 0.9 --max-new-tokens 64
"""
)
@user_errors
def generate(
    model: str = typer.Argument(..., help="Model (directory, hub id, .gguf, built-in name)."),
    prompt: str = typer.Argument(..., help="The user message."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Tokens to generate at most."),
    do_sample: bool = typer.Option(False, "--do-sample", help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(0.2, "--temperature", help="Sampling temperature (with --do-sample)."),
    top_p: float = typer.Option(0.9, "--top-p", help="Nucleus sampling mass (with --do-sample)."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="Above 1 discourages repeats."),
    system: Optional[str] = typer.Option(None, "--system", help="A system message (chat templates that support one)."),
    no_chat: bool = typer.Option(False, "--no-chat", help="Feed the prompt as raw text, not through the chat template."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for sampling."),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16."),
):
    """Reply to a prompt through the model's chat template."""
    import gpconv

    m, tok = gpconv.load_model(model, dtype=dtype)
    typer.echo(gpconv.generate(m, tok, prompt, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                               top_p=top_p, repetition_penalty=repetition_penalty, system=system, chat=not no_chat, seed=seed))
