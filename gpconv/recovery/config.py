"""What a recovery run is told (:class:`TrainConfig`) and what it gives back (:class:`TrainResult`)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..errors import GPConvError

TRAIN_MODES = ("grouped", "all", "lora")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DISTRIBUTED = ("auto", "ddp", "fsdp")
TRACKERS = ("tensorboard", "wandb")
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
    """Passes over the training blocks when max_steps is not given."""
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
    """AdamW's moment decay rates."""
    grouped_lr_scale: float = 1.0
    """Multiplier of ``lr`` for the grouped weights of gpconv blocks (G1/G2); low-rank factors,
    biases and every other parameter keep ``lr``. 1: one learning rate for all; 0: the grouped
    weights stay as initialised and get no gradient (their backward GEMMs are skipped). For fitted
    hybrid blocks 0.3 recovered better on SmolLM2 after 30,720 tokens, and no better than 1 after
    153,600 (docs/results.md, "The grouped weights' learning rate"). A guess at why: the grouped
    part fits what the low-rank term leaves, with large weights that partly cancel, which
    full-size Adam steps disturb."""
    max_grad_norm: float | None = 1.0
    """Gradient clipping by global norm (None: off)."""

    # -- distillation loss: a*KL(teacher||student) at temperature T + b*CE + c*hidden-state error
    kl_weight: float = 1.0
    """a: weight of KL(teacher || student)."""
    ce_weight: float = 0.0
    """b: weight of the cross-entropy on the data."""
    hidden_weight: float = 0.0
    """Weight of the relative hidden-state error: per token ``|h_s - h_t|^2 / |h_t|^2``, mean over
    decoder layers (same depth and width only). Relative, so that one weight suits any model
    whatever the scale of its activations."""
    temperature: float = 1.0
    """Softmax temperature of the KL term."""
    teacher_top_k: int = 0
    """Distil against the teacher's top-k next tokens + one bucket for the rest, cached per block
    (:class:`gpconv.TeacherCache`), so that a block seen again costs no teacher forward. 0: the
    exact KL over the whole vocabulary, the teacher run on every block."""

    # -- LoRA (train='lora')
    lora_r: int = 16
    """LoRA rank (train='lora')."""
    lora_alpha: int = 32
    """LoRA alpha (train='lora')."""
    lora_dropout: float = 0.0
    """LoRA dropout (train='lora')."""

    # -- hardware
    precision: str = "auto"
    """'auto' (bf16 on a GPU that has it, else fp16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory)."""
    seed: int = 0
    """Seed of the initialisation, the data order and the split."""
    distributed: str = "auto"
    """Several processes: 'ddp' (each holds the whole model), 'fsdp' (FSDP2: parameters, gradients
    and optimizer state sharded per decoder layer over the processes, the teacher too), or 'auto'
    (fsdp when accelerate launch is configured for FSDP, else ddp). One process: neither."""

    # -- bookkeeping
    save_every: int = 200
    """Checkpoint every N steps (0: never); needs out_dir."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk."""
    eval_every: int = 0
    """Validate every N steps; 0: before and after training only."""
    eval_batches: int | None = None
    """Cap on validation micro-batches per evaluation (None: the whole validation set)."""
    log_every: int = 10
    """Write a metrics row every N steps."""
    metrics_format: str = "jsonl"
    """Metrics file format: jsonl | csv."""
    report_to: str = "none"
    """Experiment trackers (accelerate's) fed the logged metrics: tensorboard | wandb | none, or a
    comma-separated list. TensorBoard writes OUT/tensorboard/gpconv/."""
    resume: bool = False
    """Continue from the newest complete checkpoint in out_dir; refused where there is none (start again with overwrite)."""
    overwrite: bool = False
    """Delete a non-empty out_dir first."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self):
        if isinstance(self.betas, list):
            object.__setattr__(self, "betas", tuple(self.betas))
        if self.train is not None and self.train not in TRAIN_MODES:
            raise GPConvError(f"unknown train mode {self.train!r}; choose one of: {', '.join(TRAIN_MODES)}")
        if self.precision not in PRECISIONS:
            raise GPConvError(f"unknown precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}")
        if self.distributed not in DISTRIBUTED:
            raise GPConvError(f"unknown distributed mode {self.distributed!r}; choose one of: {', '.join(DISTRIBUTED)}")
        if self.trackers and self.out_dir is None:
            raise GPConvError(f"report_to {self.report_to!r} needs out_dir (the trackers write beside the metrics)")
        for name in self.trackers:  # before any model loads: accelerate would only warn and log nothing
            if importlib.util.find_spec(name) is None:
                raise GPConvError(f"report_to {name} needs the {name} package: pip install {name}")
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

    @property
    def trackers(self) -> tuple[str, ...]:
        """The trackers ``report_to`` names (checked; empty for 'none')."""
        names = tuple(dict.fromkeys(t.strip().lower() for t in self.report_to.split(",") if t.strip()))
        if names in ((), ("none",)):
            return ()
        bad = [t for t in names if t not in TRACKERS]
        if bad:
            raise GPConvError(f"unknown tracker {bad[0]!r} in report_to; choose from: {', '.join(TRACKERS)}, none")
        return names


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
