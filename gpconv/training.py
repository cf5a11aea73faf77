"""Recovery training: distil a shrunk student from its teacher, or train with plain cross-entropy.

    train, val = gpconv.build_datasets("data.jsonl", tok, block_size=512)
    cfg = gpconv.TrainConfig(out_dir="kphi3-kd", max_steps=2000, batch_size=8, lr=3e-4)
    gpconv.distill(student, teacher, train, cfg, val_data=val, tokenizer=tok)   # KD
    gpconv.train(model, train, cfg, val_data=val, tokenizer=tok)                # cross-entropy
    cache = gpconv.TeacherCache(teacher, top_k=64)                               # KD on the teacher's top 64,
    gpconv.distill(student, cache, train, cfg)                                   # each block's computed once

The student is any causal-LM-like ``nn.Module``: a transformers model, or a module whose
forward takes ``(B, T)`` ids and returns logits (or an output with ``.logits``). It is trained
in place and returned (LoRA adapters merged).

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
(gloo); mixed precision is accelerate's autocast (bf16/fp16 on GPU, fp32 on CPU).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from .checkpoints import latest_checkpoint, load_checkpoint, remove_partial, rng_state, save_checkpoint
from .data import StreamingBlocks, TokenBlocks
from .errors import GPConvError
from .evaluation import eval_sums, metrics_from_sums
from .io import PLAN_FILE, check_output_dir, save_pretrained
from .layers import GroupedLinear, GroupedPointwiseBlock, is_gpconv_module
from .losses import is_transformers, loss_sums, model_outputs, teacher_targets, unwrap
from .teacher_cache import TeacherCache, check_settings
from .trainlog import MetricsLog, Progress, plot_losses

TRAIN_MODES = ("grouped", "all", "lora")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
RUN_FILE = "train_config.json"  # marks a directory as a training run


@dataclass(frozen=True)
class TrainConfig:
    """Everything a recovery run needs besides the models and the data."""

    out_dir: str | None = None
    """Run directory: checkpoints/, metrics, loss.png and, at the end, the model. None: keep nothing."""
    train: str | None = None
    """What trains: 'grouped' (gpconv blocks only), 'all', or 'lora' (LoRA on the remaining dense
    Linear layers, grouped blocks fully). None: 'grouped' for distill, 'all' for train."""

    # -- steps and batches
    max_steps: int | None = None
    """Optimizer steps; None: ``epochs`` passes over the training blocks (needed for streamed data)."""
    epochs: float = 1.0
    batch_size: int = 8
    """Blocks per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""

    # -- optimizer (AdamW) and schedule
    lr: float = 3e-4
    """Peak learning rate. 3e-4 is a safe peak for long runs; a 16-step probe on projected SmolLM2
    blocks went further at 1e-3 (docs/recovery.md uses 1e-3 for its short CPU run)."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * this."""
    warmup_ratio: float = 0.05
    """Share of the steps spent warming up linearly from ~0."""
    weight_decay: float = 0.0
    """On matrices only (never biases, norms); 0: recovery starts near a good solution."""
    betas: tuple[float, float] = (0.9, 0.95)
    grouped_lr_scale: float = 1.0
    """Multiplier of ``lr`` for the grouped weights of gpconv blocks (G1/G2); low-rank factors,
    biases and every other parameter keep ``lr``. 1: one learning rate for all; 0: the grouped
    weights stay as initialised and get no gradient (their backward GEMMs are skipped). For fitted
    hybrid blocks 0.3 recovered better on SmolLM2 after 30,720 tokens, and no better than 1 after
    153,600 (docs/results.md, "The grouped weights' learning rate"). A guess at why: the grouped
    part fits what the low-rank term leaves, with large weights that partly cancel, which
    full-size Adam steps disturb."""
    max_grad_norm: float | None = 1.0

    # -- distillation loss: a*KL(teacher||student) at temperature T + b*CE + c*hidden-state error
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    hidden_weight: float = 0.0
    """Weight of the relative hidden-state error: per token ``|h_s - h_t|^2 / |h_t|^2``, mean over
    decoder layers (same depth and width only). Relative, so that one weight suits any model
    whatever the scale of its activations."""
    temperature: float = 1.0
    teacher_top_k: int = 0
    """Distil against the teacher's top-k next tokens + one bucket for the rest, cached per block
    (:class:`gpconv.TeacherCache`), so that a block seen again costs no teacher forward. 0: the
    exact KL over the whole vocabulary, the teacher run on every block."""

    # -- LoRA (train='lora')
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0

    # -- hardware
    precision: str = "auto"
    """'auto' (bf16 on a GPU that has it, else fp16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16."""
    gradient_checkpointing: bool = False
    seed: int = 0

    # -- bookkeeping
    save_every: int = 200
    """Checkpoint every N steps (0: never); needs out_dir."""
    keep_checkpoints: int = 2
    eval_every: int = 0
    """Validate every N steps; 0: before and after training only."""
    eval_batches: int | None = None
    """Cap on validation micro-batches per evaluation (None: the whole validation set)."""
    log_every: int = 10
    metrics_format: str = "jsonl"
    resume: bool = False
    """Continue from the newest checkpoint in out_dir (start fresh if there is none)."""
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.betas, list):
            object.__setattr__(self, "betas", tuple(self.betas))
        if self.train is not None and self.train not in TRAIN_MODES:
            raise GPConvError(f"unknown train mode {self.train!r}; choose one of: {', '.join(TRAIN_MODES)}")
        if self.precision not in PRECISIONS:
            raise GPConvError(f"unknown precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}")
        if self.metrics_format not in ("jsonl", "csv"):
            raise GPConvError(f"metrics_format must be jsonl or csv, got {self.metrics_format!r}")
        for name in ("batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise GPConvError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise GPConvError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.max_steps is None and self.epochs <= 0:
            raise GPConvError(f"epochs must be > 0, got {self.epochs}")
        if self.lr <= 0:
            raise GPConvError(f"lr must be > 0, got {self.lr}")
        if self.grouped_lr_scale < 0:
            raise GPConvError(f"grouped_lr_scale must be >= 0 (0: frozen), got {self.grouped_lr_scale}")
        if min(self.kl_weight, self.ce_weight, self.hidden_weight) < 0 or self.kl_weight + self.ce_weight + self.hidden_weight == 0:
            raise GPConvError("loss weights must be >= 0 and not all 0")
        if self.teacher_top_k < 0:
            raise GPConvError(f"teacher_top_k must be >= 0 (0: the whole vocabulary), got {self.teacher_top_k}")
        if self.temperature <= 0:
            raise GPConvError(f"temperature must be > 0, got {self.temperature}")
        if self.resume and self.overwrite:
            raise GPConvError("resume and overwrite exclude each other")
        if self.save_every < 0 or self.eval_every < 0:
            raise GPConvError("save_every and eval_every must be >= 0")
        if self.resume and self.out_dir is None:
            raise GPConvError("resume needs out_dir")


@dataclass
class TrainResult:
    model: nn.Module
    """The trained model (the student object itself; LoRA merged)."""
    steps: int
    tokens: int
    """Input tokens the student processed (all processes)."""
    history: list[dict] = field(default_factory=list)
    val: dict | None = None
    """Final validation metrics (loss, perplexity, accuracy, tokens)."""
    out_dir: Path | None = None
    train_s: float = 0.0
    """Wall time of the training steps (evaluation and checkpoints excluded)."""
    teacher_s: float = 0.0
    """Part of train_s spent in the teacher's forward passes."""


class TrainingDiverged(GPConvError):
    """The loss or the gradient norm became NaN/inf; the weights are those of the last good step."""


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
    _check_vocab(student, teacher, tokenizer, teacher_tokenizer)
    return _run(student, teacher, train_data, cfg, val_data, tokenizer, callbacks)


def train(model: nn.Module, train_data, config: TrainConfig | None = None, val_data=None, *,
          tokenizer=None, callbacks: Sequence[Callable[[int, dict], None]] = ()) -> TrainResult:
    """Train ``model`` with next-token cross-entropy (fine-tuning, or from scratch from a config)."""
    return _run(model, None, train_data, config or TrainConfig(), val_data, tokenizer, callbacks)


# --------------------------------------------------------------------------------------------
# Models: what trains, the teacher, vocabularies
# --------------------------------------------------------------------------------------------


def _out_features(model: nn.Module) -> int | None:
    from .report import output_embedding

    head = output_embedding(unwrap(model))
    w = getattr(head, "weight", None)
    return None if w is None else w.shape[0]


def _teacher_source(teacher, cfg: TrainConfig):
    """The teacher model, or a :class:`TeacherCache` (given, or made here for ``teacher_top_k``)."""
    given = isinstance(teacher, TeacherCache)
    if not given and not cfg.teacher_top_k:
        return teacher
    check_settings(cfg, teacher if given else None)
    return teacher if given else TeacherCache(teacher, cfg.teacher_top_k, cfg.temperature)


def _check_vocab(student, teacher, tok, teacher_tok) -> None:
    if tok is not None and teacher_tok is not None and tok.get_vocab() != teacher_tok.get_vocab():
        raise GPConvError(
            f"teacher and student tokenizers differ ({len(teacher_tok)} vs {len(tok)} tokens); "
            "distillation compares next-token distributions, so both need the same vocabulary"
        )
    vs = _out_features(student)
    vt = teacher.vocab_size if isinstance(teacher, TeacherCache) else _out_features(teacher)
    if vs is not None and vt is not None and vs != vt:
        raise GPConvError(f"teacher predicts {vt} tokens, the student {vs}: distillation needs the same vocabulary")


def _dense_linears(model: nn.Module) -> list[str]:
    """Names of the dense layers LoRA can adapt: nn.Linear / GPT-2 Conv1D, never the output layer."""
    from transformers.pytorch_utils import Conv1D

    from .report import output_embedding

    head = output_embedding(model)
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and m is not head and n]


def _select_trainable(model: nn.Module, mode: str, cfg: TrainConfig) -> nn.Module:
    """Set ``requires_grad`` for ``mode``; 'lora' returns the peft-wrapped model."""
    blocks = [m for m in model.modules() if is_gpconv_module(m)]
    if mode in ("grouped", "lora") and not blocks:
        raise GPConvError(f"--train {mode}: the model has no gpconv blocks (shrink it first, or use --train all)")
    if mode == "all":
        model.requires_grad_(True)
        return model
    model.requires_grad_(False)
    if mode == "lora":
        import peft

        targets = _dense_linears(model)
        if not targets:
            raise GPConvError("--train lora: no dense Linear layer is left besides the output layer; use --train grouped")
        lcfg = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets)
        model = peft.get_peft_model(model, lcfg)  # freezes everything but the adapters...
    for b in blocks:
        b.requires_grad_(True)  # ...and the grouped blocks train fully
    return model


def _freeze_grouped_weights(model: nn.Module, cfg: TrainConfig) -> None:
    """``grouped_lr_scale == 0``: the grouped weights (G1/G2) keep their init and need no gradient
    (their backward GEMMs are skipped); low-rank factors, biases and the rest train as the mode says."""
    if cfg.grouped_lr_scale:
        return
    for p in _grouped_weights(model):
        p.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise GPConvError("grouped_lr_scale 0 freezes the grouped weights and nothing else would train "
                          "(pure grouped blocks: give a scale > 0, or train more with --train all)")


def _grouped_weights(model: nn.Module) -> list[nn.Parameter]:
    """The 3-d weights of the grouped maps inside gpconv blocks (io blocks, their hybrids, GroupedLinear)."""
    return [m.weight for m in model.modules() if isinstance(m, (GroupedPointwiseBlock, GroupedLinear))
            and isinstance(getattr(m, "weight", None), nn.Parameter)]


def _enable_checkpointing(model: nn.Module) -> None:
    inner = unwrap(model)
    if not is_transformers(inner):
        raise GPConvError(f"gradient checkpointing needs a transformers model, not {type(inner).__name__}")
    kw = {"use_reentrant": False}  # works with frozen embeddings and DDP
    if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5.x name
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    grouped = {id(p) for p in _grouped_weights(model)}
    blocks = [p for p in params if id(p) in grouped]  # grouped 3-d weights: their own lr
    decay = [p for p in params if p.dim() >= 2 and id(p) not in grouped]  # other matrices, never biases/norms
    rest = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": blocks, "weight_decay": cfg.weight_decay, "lr": cfg.lr * cfg.grouped_lr_scale},
              {"params": rest, "weight_decay": 0.0}]
    # the fused kernel (one pass over all tensors) where torch has it for these parameters
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, fused=fused or None)


def _lr_factor(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    warmup = int(cfg.warmup_ratio * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _forget_other_precision(wanted: str) -> None:
    """accelerate keeps one process-wide AcceleratorState and refuses a second Accelerator with
    another mixed precision ("restart your runtime"). Runs in one process are independent here
    (an fp32 run, then a bf16 one, in one notebook), so drop the old state when its precision
    differs; the process group (PartialState) is kept."""
    from accelerate.state import AcceleratorState

    old = AcceleratorState._shared_state.get("_mixed_precision")
    if old is not None and old != wanted:
        AcceleratorState._reset_state(reset_partial_state=False)


def _mixed_precision(precision: str) -> str:
    if precision == "auto":
        if not torch.cuda.is_available():
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


# --------------------------------------------------------------------------------------------
# Data: the blocks of each step
# --------------------------------------------------------------------------------------------


def as_train_data(data):
    if isinstance(data, (TokenBlocks, StreamingBlocks)):
        return data
    if isinstance(data, torch.Tensor):
        return TokenBlocks(data)
    raise GPConvError(f"training data must be gpconv token blocks (gpconv.build_datasets) or an id tensor, not {type(data).__name__}")


class BatchPlan:
    """The blocks of every step, a function of ``(seed, step)`` only (so resuming is exact).

    In-memory blocks: epoch ``e`` visits them in ``randperm(n, seed + e)`` order, and a step
    takes the next ``global_batch`` positions of that endless sequence. Streamed blocks: the
    stream in order, reshuffled per epoch by its own seeded buffer; seeking re-reads it.
    """

    def __init__(self, data, batch_size: int, grad_accum: int, world: int, rank: int, seed: int):
        self.data, self.B, self.A, self.W, self.rank, self.seed = data, batch_size, grad_accum, world, rank, seed
        self.global_batch = batch_size * grad_accum * world
        self.streaming = isinstance(data, StreamingBlocks)
        self._order: tuple[int, torch.Tensor] | None = None
        self._it, self._pos, self._epoch = None, 0, 0
        if not self.streaming and len(data) == 0:
            raise GPConvError("the training data holds no blocks")

    @property
    def blocks(self) -> int | None:
        return None if self.streaming else len(self.data)

    def epoch(self, step: int) -> float | None:
        """Passes over the training blocks after ``step`` steps (unknown for a stream)."""
        return None if self.streaming else step * self.global_batch / len(self.data)

    def _perm(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._order = (epoch, torch.randperm(len(self.data), generator=g))
        return self._order[1]

    def _next_streamed(self) -> dict:
        for _ in range(2):
            if self._it is not None:
                item = next(self._it, None)
                if item is not None:
                    self._pos += 1
                    return item
                self._epoch += 1
            self.data.set_epoch(self._epoch)
            self._it = iter(self.data)
        raise GPConvError("the streamed training data yields no blocks")

    def _global(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        G = self.global_batch
        if self.streaming:
            if self._pos != step * G:  # resume: replay the stream up to this step
                self._it, self._pos, self._epoch = None, 0, 0
                for _ in range(step * G):
                    self._next_streamed()
            items = [self._next_streamed() for _ in range(G)]
            return torch.stack([x["input_ids"] for x in items]), torch.stack([x["labels"] for x in items])
        n = len(self.data)
        pos = torch.arange(step * G, (step + 1) * G)
        index = torch.empty(G, dtype=torch.long)
        for e in pos.div(n, rounding_mode="floor").unique().tolist():
            sel = pos // n == e
            index[sel] = self._perm(e)[pos[sel] % n]
        return self.data.batch(index)

    def micro_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This process's ``grad_accum`` micro-batches of ``step``: slice ``i*W + rank`` of the global batch."""
        ids, labels = self._global(step)  # (G, T) each
        out = []
        for i in range(self.A):
            s = (i * self.W + self.rank) * self.B
            out.append((ids[s:s + self.B], labels[s:s + self.B]))
        return out


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def check_run_dir(out_dir, resume: bool = False, overwrite: bool = False) -> Path:
    """Refuse a run directory that would be clobbered or cannot be resumed (touches nothing)."""
    out = Path(out_dir).expanduser()
    if resume:
        if out.is_dir() and any(out.iterdir()) and not (out / RUN_FILE).is_file():
            raise GPConvError(f"nothing to resume in {out}: it is not a gpconv training run ({RUN_FILE} missing)")
        if out.exists() and not out.is_dir():
            raise GPConvError(f"output path {out} exists and is not a directory")
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
    from accelerate import Accelerator
    from accelerate.utils import gather_object, set_seed

    mode = cfg.train or ("grouped" if teacher is not None else "all")
    data = as_train_data(train_data)
    val = None if val_data is None else as_train_data(val_data)
    if isinstance(val, StreamingBlocks):
        raise GPConvError("validation data must be in memory (gpconv.build_datasets returns it so)")

    # several processes without a GPU (torchrun on CPU): accelerate only picks gloo when told cpu=True
    cpu_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    mixed = _mixed_precision(cfg.precision)
    _forget_other_precision(mixed)
    acc = Accelerator(mixed_precision=mixed, cpu=cpu_group)
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
    model = _select_trainable(student, mode, cfg)
    _freeze_grouped_weights(model, cfg)
    if cfg.gradient_checkpointing:
        _enable_checkpointing(model)
    model.train()
    live = teacher.teacher if isinstance(teacher, TeacherCache) else teacher  # the model, if any
    if live is not None:
        live.eval().requires_grad_(False)
        live.to(acc.device)
    want_hidden = teacher is not None and cfg.hidden_weight > 0
    trainable = [p for p in model.parameters() if p.requires_grad]

    optimizer = _optimizer(model, cfg)
    # stepped by hand: accelerate's prepared scheduler steps once per process, which would make
    # the schedule depend on the number of processes
    lr_factor = _lr_factor(cfg, total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
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
    bar = Progress(total, step, cfg.progress and acc.is_main_process, "distill" if teacher is not None else "train")
    if resumed_from is not None:
        bar.print(f"resumed from {resumed_from} (step {step})")

    def validate(at: int) -> dict | None:
        if val is None or len(val) == 0:
            return None
        n = len(val) if cfg.eval_batches is None else min(len(val), cfg.eval_batches * cfg.batch_size)
        sums = eval_sums(model, val, range(acc.process_index, n, acc.num_processes), cfg.batch_size, acc.autocast)
        m = metrics_from_sums(acc.reduce(sums, "sum"))
        row = {"step": at, "split": "val", "loss": m["loss"], "ce": m["loss"], "perplexity": m["perplexity"],
               "accuracy": m["accuracy"], "tokens": tokens}
        log.log(row)
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
            sums, n_global, t_s = _accumulate(acc, model, teacher, micro, weights, want_hidden, cfg.temperature)
            teacher_s += t_s
            loss = float(sums[0]) / max(n_global, 1.0)
            if not math.isfinite(loss):
                raise _diverged("loss", loss, step + 1, out)
            grad_norm = None
            if cfg.max_grad_norm:
                grad_norm = float(acc.clip_grad_norm_(trainable, cfg.max_grad_norm))
                if not math.isfinite(grad_norm):
                    raise _diverged("gradient norm", grad_norm, step + 1, out)
            lr = cfg.lr * lr_factor(scheduler.last_epoch)  # the base lr (grouped weights get x grouped_lr_scale)
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
                log.log(row)
                window.zero_()
                window_tokens, window_s = 0, 0.0
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                last_val = validate(step)
            if save_every and step % save_every == 0 and step < total:
                rngs = gather_object([rng_state()])
                if acc.is_main_process:
                    save_checkpoint(out, step, core, optimizer, scheduler, rngs,
                                    {**run_state, "tokens": tokens, "train_s": train_s, "teacher_s": teacher_s}, cfg.keep_checkpoints)
                acc.wait_for_everyone()
            for cb in callbacks:
                cb(step, row)
        last_val = validate(step)
    finally:
        bar.close()

    # LoRA merged back: the result is the student's own architecture again
    final = core.merge_and_unload() if mode == "lora" else core
    for p in final.parameters():
        p.requires_grad_(was_trainable.get(id(p), True))
    final.eval()
    if out is not None and acc.is_main_process:
        _publish(final, tokenizer, out)
        plot_losses(log.rows, out / "loss.png", title=f"{type(final).__name__} · {mode} · {total} steps")
    acc.wait_for_everyone()
    acc.free_memory()
    return TrainResult(final, step, tokens, log.rows, last_val, out, train_s, teacher_s)


def _accumulate(acc, model, teacher, micro, weights, want_hidden: bool, temperature: float):
    """Forward and backward over this process's micro-batches of one step; gradients are left
    accumulated (synchronised across processes on the last micro-batch only).

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
        with contextlib.nullcontext() if last else acc.no_sync(model):
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

