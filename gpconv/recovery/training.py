"""Recovery training: distil a shrunk student from its teacher, or train with plain cross-entropy.

    train, val = gpconv.build_datasets("data.jsonl", tok, block_size=512)
    cfg = gpconv.TrainConfig(out_dir="kphi3-kd", max_steps=2000, batch_size=8, lr=3e-4)
    gpconv.distill(student, teacher, train, cfg, val_data=val, tokenizer=tok)   # KD
    gpconv.train(model, train, cfg, val_data=val, tokenizer=tok)                # cross-entropy
    cache = gpconv.TeacherCache(teacher, top_k=64)                               # KD on the teacher's top 64,
    gpconv.distill(student, cache, train, cfg)                                   # each block's computed once

The student is any causal-LM-like ``nn.Module``: a transformers model, or a module whose
forward takes ``(B, T)`` ids and returns logits (or an output with ``.logits``). It is trained
in place and returned (LoRA adapters merged); under FSDP the module stays sharded and a whole
copy, gathered at the end, is returned.

One optimizer step (the *global batch* is ``batch_size x grad_accum x processes`` blocks):

1. :class:`BatchPlan` picks the step's blocks from ``(seed, step)`` alone, so a resumed run
   sees exactly the blocks an uninterrupted one would, and process ``r`` of ``W`` takes its
   slices of the same global batch that one process would take in ``W x grad_accum`` pieces.
2. Each micro-batch adds ``a*KL + b*CE + c*hidden`` (sums over counted tokens, :mod:`gpconv.losses`)
   divided by the counted tokens of the whole global batch, times ``W`` because DDP averages
   gradients over processes. So the gradient is the same for any split of the global batch.
3. The loss is checked before the update: NaN/inf stops the run, and the weights, like the last
   checkpoint, are those of the last good step.
4. Clip, step, schedule (linear warm-up, cosine decay), log, evaluate, checkpoint.

Built on accelerate: ``accelerate launch`` / ``torchrun`` give DDP over GPUs or CPU processes
(gloo), or FSDP2 (``distributed='fsdp'``, :mod:`.fsdp`); mixed precision is accelerate's autocast
(bf16/fp16 on GPU, fp32 on CPU); ``report_to`` feeds accelerate's trackers (:mod:`.trackers`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, set_seed
from torch import nn

from ..data import StreamingBlocks
from ..errors import GPConvError
from ..fsutil import check_output_dir
from ..hfutil import vocab_size
from ..hub import PLAN_FILE, save_pretrained
from .batching import BatchPlan, as_train_data
from .checkpoints import latest_checkpoint, load_checkpoint, remove_partial, rng_state, save_checkpoint
from .config import RUN_FILE, TrainConfig, TrainingDiverged, TrainResult
from . import trackers
from .evaluation import eval_sums, metrics_from_sums
from .fsdp import clip_grad_norm, device_mesh, gather_into, idle_forwards, meta_copy, shard, wants_fsdp
from .losses import loss_sums, model_outputs, teacher_targets
from .sharded_checkpoints import is_sharded, load_sharded_checkpoint, save_sharded_checkpoint
from .teacher_cache import TeacherCache, check_settings
from .trainable import (enable_checkpointing, forget_other_precision, freeze_grouped_weights, lr_factor, mixed_precision,
                        make_optimizer, select_trainable)
from .trainlog import MetricsLog, Progress, plot_losses


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def distill(student: nn.Module, teacher: nn.Module, train_data, config: TrainConfig | None = None, val_data=None, *,
            tokenizer=None, teacher_tokenizer=None, callbacks: Sequence[Callable[[int, dict], None]] = ()) -> TrainResult:
    """Train ``student`` to match ``teacher`` (frozen, eval mode, no grad) on ``train_data``.

    ``teacher`` is a model, or a :class:`gpconv.TeacherCache` (the teacher's top-k per block,
    filled as training meets new blocks, reusable by later runs on the same data).

    ``train_data`` / ``val_data``: blocks from :func:`gpconv.build_datasets` or an
    ``(n_blocks, block_size)`` id tensor. Passing both tokenizers lets a vocabulary mismatch be
    refused before any work. ``callbacks(step, row)`` run after every optimizer step.
    """
    if teacher is None:
        raise GPConvError("distill needs a teacher model")
    cfg = config or TrainConfig()
    teacher = _teacher_source(teacher, cfg)
    check_vocab(student, teacher, tokenizer, teacher_tokenizer)
    return _run(student, teacher, train_data, cfg, val_data, tokenizer, callbacks)


def train(model: nn.Module, train_data, config: TrainConfig | None = None, val_data=None, *,
          tokenizer=None, callbacks: Sequence[Callable[[int, dict], None]] = ()) -> TrainResult:
    """Train ``model`` with next-token cross-entropy (fine-tuning, or from scratch from a config)."""
    return _run(model, None, train_data, config or TrainConfig(), val_data, tokenizer, callbacks)


# --------------------------------------------------------------------------------------------
# Models: what trains, the teacher, vocabularies
# --------------------------------------------------------------------------------------------


def _teacher_source(teacher, cfg: TrainConfig):
    """The teacher model, or a :class:`TeacherCache` (given, or made here for ``teacher_top_k``)."""
    given = isinstance(teacher, TeacherCache)
    if not given and not cfg.teacher_top_k:
        return teacher
    check_settings(cfg, teacher if given else None)
    return teacher if given else TeacherCache(teacher, cfg.teacher_top_k, cfg.temperature)


def check_vocab(student, teacher, tok, teacher_tok) -> None:
    if tok is not None and teacher_tok is not None and tok.get_vocab() != teacher_tok.get_vocab():
        raise GPConvError(
            f"teacher and student tokenizers differ ({len(teacher_tok)} vs {len(tok)} tokens); "
            "distillation compares next-token distributions, so both need the same vocabulary"
        )
    vs = vocab_size(student)
    vt = teacher.vocab_size if isinstance(teacher, TeacherCache) else vocab_size(teacher)
    if vs is not None and vt is not None and vs != vt:
        raise GPConvError(f"teacher predicts {vt} tokens, the student {vs}: distillation needs the same vocabulary")


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def check_run_dir(out_dir, resume: bool = False, overwrite: bool = False) -> Path:
    """Refuse a run directory that would be clobbered or cannot be resumed (touches nothing)."""
    out = Path(out_dir).expanduser()
    if resume:
        if out.exists() and not out.is_dir():
            raise GPConvError(f"output path {out} exists and is not a directory")
        if not out.is_dir() or not any(out.iterdir()):
            raise GPConvError(f"nothing to resume in {out}: no such run (the directory is missing or empty); "
                              "drop --resume to start one")
        if not (out / RUN_FILE).is_file():
            raise GPConvError(f"nothing to resume in {out}: it is not a gpconv training run ({RUN_FILE} missing)")
        if latest_checkpoint(out) is None:  # a resumed run would silently start again from step 0
            raise GPConvError(f"nothing to resume in {out}: the run saved no complete checkpoint "
                              "(checkpoints/step-*); start it afresh with --overwrite instead of --resume")
        return out
    return check_output_dir(out, overwrite=overwrite)


def _prepare_out_dir(cfg: TrainConfig, main: bool) -> Path | None:
    """Check (before any work) and create the run directory; only the main process touches disk."""
    if cfg.out_dir is None:
        return None
    out = check_run_dir(cfg.out_dir, cfg.resume, cfg.overwrite)
    if main:
        if cfg.overwrite and out.is_dir():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    return out


def _publish(model: nn.Module, tokenizer, out: Path) -> None:
    """Put the final model into ``out`` beside the run files; ``config.json`` arrives last, so a
    half-moved model never looks loadable."""
    staging = out / ".final-model"
    shutil.rmtree(staging, ignore_errors=True)
    save_pretrained(model, staging, tokenizer)
    markers = ("config.json", PLAN_FILE)
    for name in markers:
        (out / name).unlink(missing_ok=True)
    for old in [*out.glob("*.safetensors"), *out.glob("*.safetensors.index.json")]:
        old.unlink()  # weights of an earlier publish (maybe sharded differently)
    for f in sorted(staging.iterdir(), key=lambda p: p.name in markers):
        os.replace(f, out / f.name)
    staging.rmdir()


def _run(student, teacher, train_data, cfg: TrainConfig, val_data, tokenizer, callbacks) -> TrainResult:
    mode = cfg.train or ("grouped" if teacher is not None else "all")
    data = as_train_data(train_data)
    val = None if val_data is None else as_train_data(val_data)
    if isinstance(val, StreamingBlocks):
        raise GPConvError("validation data must be in memory (gpconv.build_datasets returns it so)")

    # several processes without a GPU (torchrun on CPU): accelerate only picks gloo when told cpu=True
    cpu_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    mixed = mixed_precision(cfg.precision)
    forget_other_precision(mixed)
    acc = Accelerator(mixed_precision=mixed, cpu=cpu_group, **trackers.accelerator_kwargs(cfg))
    fsdp = wants_fsdp(cfg.distributed, acc.num_processes)
    if fsdp and mixed == "fp16":
        raise GPConvError("fsdp runs in bf16 or fp32 (fp16 would need a gradient scaler across shards); use --precision bf16")
    if acc.distributed_type == DistributedType.FSDP and not fsdp:
        raise GPConvError("accelerate is configured for FSDP but distributed is 'ddp'; use --distributed fsdp (or auto)")
    out = _prepare_out_dir(cfg, acc.is_main_process)
    acc.wait_for_everyone()
    save_every = cfg.save_every if out is not None else 0
    set_seed(cfg.seed)
    plan = BatchPlan(data, cfg.batch_size, cfg.grad_accum, acc.num_processes, acc.process_index, cfg.seed)
    if cfg.max_steps:
        total = cfg.max_steps
    elif plan.streaming:
        raise GPConvError("streamed data has no length: give max_steps (--max-steps)")
    else:
        total = math.ceil(cfg.epochs * len(data) / plan.global_batch)

    was_trainable = {id(p): p.requires_grad for p in student.parameters()}
    trainable_by_name = {n: p.requires_grad for n, p in student.named_parameters()}  # for a gathered copy
    model = select_trainable(student, mode, cfg)
    freeze_grouped_weights(model, cfg)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    live = teacher.teacher if isinstance(teacher, TeacherCache) else teacher  # the model, if any
    if live is not None:
        live.eval().requires_grad_(False)
    skeleton = None
    if fsdp:  # in place: parameters become this process's shards on acc.device
        skeleton = meta_copy(model)
        mesh = device_mesh(acc.device, acc.num_processes)
        shard(model, mesh)
        if live is not None and not isinstance(teacher, TeacherCache):
            shard(live, mesh)
    if live is not None and not (fsdp and live is teacher):
        live.to(acc.device)
    want_hidden = teacher is not None and cfg.hidden_weight > 0
    trainable = [p for p in model.parameters() if p.requires_grad]

    optimizer = make_optimizer(model, cfg)
    # stepped by hand: accelerate's prepared scheduler steps once per process, which would make
    # the schedule depend on the number of processes
    lr_schedule = lr_factor(cfg, total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule)
    if fsdp:
        core = model  # sharded already: accelerate's prepare would wrap it in DDP on CPU
    else:
        model, optimizer = acc.prepare(model, optimizer)
        core = acc.unwrap_model(model)

    step, tokens, train_s, teacher_s = 0, 0, 0.0, 0.0
    run_state = {"global_batch": plan.global_batch, "train_blocks": plan.blocks, "train": mode}
    resumed_from = None
    if out is not None and cfg.resume:
        if acc.is_main_process:
            remove_partial(out)
        acc.wait_for_everyone()
        ckpt = latest_checkpoint(out)
        if ckpt is not None:
            if is_sharded(ckpt) != fsdp:
                was = ("an FSDP run; resume it with --distributed fsdp" if is_sharded(ckpt)
                       else "an unsharded run; resume it with --distributed ddp")
                raise GPConvError(f"{ckpt} was written by {was}")
            if fsdp:
                state = load_sharded_checkpoint(ckpt, model, optimizer, scheduler, acc.process_index)
            else:
                state = load_checkpoint(ckpt, core, optimizer, scheduler, acc.process_index)
            for k, v in run_state.items():
                if state.get(k) != v:
                    raise GPConvError(f"{ckpt} was written with {k}={state.get(k)}, this run has {v}; resume with the same settings")
            step, tokens = state["step"], state["tokens"]
            train_s, teacher_s = state.get("train_s", 0.0), state.get("teacher_s", 0.0)
            resumed_from = ckpt
    if out is not None and acc.is_main_process:
        (out / RUN_FILE).write_text(json.dumps({**asdict(cfg), "train": mode, "total_steps": total, **run_state}, indent=1) + "\n")
    log = MetricsLog(out if acc.is_main_process else None, cfg.metrics_format, resume_step=step if resumed_from else None)
    trackers.start(acc, cfg, out, step if resumed_from else None, out.name if out is not None else "run")

    def record(row: dict) -> None:
        log.log(row)
        trackers.log(acc, cfg, row)
    bar = Progress(total, step, cfg.progress and acc.is_main_process, "distill" if teacher is not None else "train")
    if resumed_from is not None:
        bar.print(f"resumed from {resumed_from} (step {step})")

    def validate(at: int) -> dict | None:
        if val is None or len(val) == 0:
            return None
        n = len(val) if cfg.eval_batches is None else min(len(val), cfg.eval_batches * cfg.batch_size)
        sums = eval_sums(model, val, range(acc.process_index, n, acc.num_processes), cfg.batch_size, acc.autocast)
        if fsdp:  # every process joins as many sharded forwards as the busiest one
            batches = [math.ceil(len(range(r, n, acc.num_processes)) / cfg.batch_size) for r in range(acc.num_processes)]
            idle_forwards(model, max(batches) - batches[acc.process_index], val.batch(torch.tensor([0]))[0].to(acc.device))
        m = metrics_from_sums(acc.reduce(sums, "sum"))
        row = {"step": at, "split": "val", "loss": m["loss"], "ce": m["loss"], "perplexity": m["perplexity"],
               "accuracy": m["accuracy"], "tokens": tokens}
        record(row)
        bar.print(f"step {at}: validation loss {m['loss']:.4f}, perplexity {m['perplexity']:.2f}, accuracy {m['accuracy']:.3f}")
        return m

    W = acc.num_processes
    weights = (cfg.kl_weight, cfg.ce_weight, cfg.hidden_weight) if teacher is not None else (0.0, 1.0, 0.0)
    window = torch.zeros(5, dtype=torch.float64)  # objective, kl, ce, hidden, counted tokens since the last log
    window_tokens, window_s = 0, 0.0
    last_val = None
    try:
        if resumed_from is None:
            last_val = validate(0)  # the starting point: post-surgery quality
        while step < total:
            t0 = time.perf_counter()
            micro = plan.micro_batches(step)
            sums, n_global, t_s = _accumulate(acc, model, teacher, micro, weights, want_hidden, cfg.temperature, fsdp)
            teacher_s += t_s
            loss = float(sums[0]) / max(n_global, 1.0)
            if not math.isfinite(loss):
                raise _diverged("loss", loss, step + 1, out)
            grad_norm = None
            if cfg.max_grad_norm:
                grad_norm = (clip_grad_norm(trainable, cfg.max_grad_norm) if fsdp
                             else float(acc.clip_grad_norm_(trainable, cfg.max_grad_norm)))
                if not math.isfinite(grad_norm):
                    raise _diverged("gradient norm", grad_norm, step + 1, out)
            lr = cfg.lr * lr_schedule(scheduler.last_epoch)  # the base lr (grouped weights get x grouped_lr_scale)
            optimizer.step()
            if not acc.optimizer_step_was_skipped:  # fp16 overflow: the scale shrinks, the schedule waits
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_tokens = sum(ids.numel() for ids, _ in micro) * W
            tokens += step_tokens
            dt = time.perf_counter() - t0
            train_s += dt
            window += torch.cat([sums.cpu(), torch.tensor([n_global], dtype=torch.float64)])
            window_tokens += step_tokens
            window_s += dt
            bar.update(step, loss, window_tokens / max(window_s, 1e-9))
            row = {"step": step, "split": "train", "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                   "epoch": plan.epoch(step)}
            if step % cfg.log_every == 0 or step == total:
                n = max(float(window[4]), 1.0)
                row.update(loss=float(window[0]) / n, kl=float(window[1]) / n, ce=float(window[2]) / n, hidden=float(window[3]) / n,
                           tokens_per_s=window_tokens / max(window_s, 1e-9), elapsed_s=train_s, teacher_s=teacher_s)
                record(row)
                window.zero_()
                window_tokens, window_s = 0, 0.0
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                last_val = validate(step)
            if save_every and step % save_every == 0 and step < total:
                rngs = gather_object([rng_state()])
                extra = {**run_state, "tokens": tokens, "train_s": train_s, "teacher_s": teacher_s}
                if fsdp:  # every process writes its shards
                    save_sharded_checkpoint(out, step, model, optimizer, scheduler, rngs, extra, cfg.keep_checkpoints,
                                            acc.is_main_process)
                elif acc.is_main_process:
                    save_checkpoint(out, step, core, optimizer, scheduler, rngs, extra, cfg.keep_checkpoints)
                acc.wait_for_everyone()
            for cb in callbacks:
                cb(step, row)
        last_val = validate(step)
    finally:
        bar.close()
        trackers.finish(acc, cfg)

    # FSDP: the whole trained model, gathered into a plain copy (the sharded one stays sharded)
    whole = gather_into(skeleton, model) if fsdp else core
    # LoRA merged back: the result is the student's own architecture again
    final = whole.merge_and_unload() if mode == "lora" else whole
    for n, p in final.named_parameters():
        p.requires_grad_(was_trainable.get(id(p), trainable_by_name.get(n, True)))
    final.eval()
    if out is not None and acc.is_main_process:
        _publish(final, tokenizer, out)
        plot_losses(log.rows, out / "loss.png", title=f"{type(final).__name__} · {mode} · {total} steps")
    acc.wait_for_everyone()
    acc.free_memory()
    return TrainResult(final, step, tokens, log.rows, last_val, out, train_s, teacher_s)


def _accumulate(acc, model, teacher, micro, weights, want_hidden: bool, temperature: float, fsdp: bool = False):
    """Forward and backward over this process's micro-batches of one step; gradients are left
    accumulated (synchronised across processes on the last micro-batch only; FSDP reduce-scatters
    every micro-batch into the sharded gradients, so that no process holds a whole gradient).

    Returns the step's summed ``[objective, kl, ce, hidden]`` over all processes, the number of
    counted tokens in the whole global batch, and the seconds spent in the teacher (its forward
    pass and its softmax).
    """
    W = acc.num_processes
    counted = sum(int((lab[:, 1:] != -100).sum()) for _, lab in micro)
    n_global = float(acc.reduce(torch.tensor(counted, dtype=torch.float64, device=acc.device), "sum"))
    scale = W / max(n_global, 1.0)  # per-token mean over the global batch; DDP then averages over W
    sums = torch.zeros(4, dtype=torch.float64, device=acc.device)
    teacher_s = 0.0
    for i, (ids, labels) in enumerate(micro):
        ids, labels = ids.to(acc.device), labels.to(acc.device)
        last = i == len(micro) - 1
        with contextlib.nullcontext() if last or fsdp else acc.no_sync(model):
            with acc.autocast():
                logits, hidden = model_outputs(model, ids, want_hidden)
                target = t_hidden = None
                if isinstance(teacher, TeacherCache):  # cached top-k (the teacher runs on misses only)
                    t0 = time.perf_counter()
                    target = teacher.targets(ids, labels, temperature)
                    teacher_s += time.perf_counter() - t0
                elif teacher is not None:  # the teacher's forward and softmax, timed apart
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        t_logits, t_hidden = model_outputs(teacher, ids, want_hidden)
                        target = teacher_targets(t_logits, labels, temperature)
                        del t_logits
                    if acc.device.type == "cuda":
                        torch.cuda.synchronize()
                    teacher_s += time.perf_counter() - t0
                s = loss_sums(logits, labels, target, hidden, t_hidden)
                # only weighted terms enter the graph: a 0-weighted term would still cost a backward pass
                objective = sum(w * term for w, term in zip(weights, (s.kl, s.ce, s.hidden)) if w)
            acc.backward(objective * scale)
        sums += torch.stack([objective.detach(), s.kl.detach(), s.ce.detach(), s.hidden.detach()]).double()
    return acc.reduce(sums, "sum"), n_global, teacher_s


def _diverged(what: str, value: float, step: int, out: Path | None) -> TrainingDiverged:
    ckpt = latest_checkpoint(out) if out is not None else None
    where = (f"the last good checkpoint is {ckpt} (resume with --resume, perhaps with a lower --lr)"
             if ckpt is not None else "no checkpoint was written before it")
    return TrainingDiverged(f"{what} is {value} at step {step}; stopped before applying it, {where}")
