"""What trains and how: the trainable parameters of a mode, the optimizer, the schedule, the
mixed precision, gradient checkpointing."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ..errors import GPConvError
from accelerate.state import AcceleratorState

from ..hfutil import conv1d_types, is_transformers, output_embedding, unwrap
from ..layers import GroupedLinear, GroupedPointwiseBlock, is_gpconv_module
from .config import TrainConfig


def dense_linears(model: nn.Module) -> list[str]:
    """Names of the dense layers LoRA can adapt: nn.Linear / GPT-2 Conv1D, never the output layer."""
    head = output_embedding(model)
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, *conv1d_types())) and m is not head and n]


def select_trainable(model: nn.Module, mode: str, cfg: TrainConfig) -> nn.Module:
    """Set ``requires_grad`` for ``mode``; 'lora' returns the peft-wrapped model."""
    blocks = [m for m in model.modules() if is_gpconv_module(m)]
    if mode in ("grouped", "lora") and not blocks:
        raise GPConvError(f"--train {mode}: the model has no gpconv blocks (shrink it first, or use --train all)")
    if mode == "all":
        model.requires_grad_(True)
        return model
    model.requires_grad_(False)
    if mode == "lora":
        import peft  # optional heavy dependency, needed for --train lora only

        targets = dense_linears(model)
        if not targets:
            raise GPConvError("--train lora: no dense Linear layer is left besides the output layer; use --train grouped")
        lcfg = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets)
        model = peft.get_peft_model(model, lcfg)  # freezes everything but the adapters...
    for b in blocks:
        b.requires_grad_(True)  # ...and the grouped blocks train fully
    return model


def freeze_grouped_weights(model: nn.Module, cfg: TrainConfig) -> None:
    """``grouped_lr_scale == 0``: the grouped weights (G1/G2) keep their init and need no gradient
    (their backward GEMMs are skipped); low-rank factors, biases and the rest train as the mode says."""
    if cfg.grouped_lr_scale:
        return
    for p in grouped_weights(model):
        p.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise GPConvError("grouped_lr_scale 0 freezes the grouped weights and nothing else would train "
                          "(pure grouped blocks: give a scale > 0, or train more with --train all)")


def grouped_weights(model: nn.Module) -> list[nn.Parameter]:
    """The 3-d weights of the grouped maps inside gpconv blocks (io blocks, their hybrids, GroupedLinear)."""
    return [m.weight for m in model.modules() if isinstance(m, (GroupedPointwiseBlock, GroupedLinear))
            and isinstance(getattr(m, "weight", None), nn.Parameter)]


def enable_checkpointing(model: nn.Module) -> None:
    inner = unwrap(model)
    if not is_transformers(inner):
        raise GPConvError(f"gradient checkpointing needs a transformers model, not {type(inner).__name__}")
    kw = {"use_reentrant": False}  # works with frozen embeddings and DDP
    if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5.x name
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    grouped = {id(p) for p in grouped_weights(model)}
    blocks = [p for p in params if id(p) in grouped]  # grouped 3-d weights: their own lr
    decay = [p for p in params if p.dim() >= 2 and id(p) not in grouped]  # other matrices, never biases/norms
    rest = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": blocks, "weight_decay": cfg.weight_decay, "lr": cfg.lr * cfg.grouped_lr_scale},
              {"params": rest, "weight_decay": 0.0}]
    # the fused kernel (one pass over all tensors) where torch has it for these parameters
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, fused=fused or None)


def lr_factor(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    warmup = int(cfg.warmup_ratio * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def forget_other_precision(wanted: str) -> None:
    """accelerate keeps one process-wide AcceleratorState and refuses a second Accelerator with
    another mixed precision ("restart your runtime"). Runs in one process are independent here
    (an fp32 run, then a bf16 one, in one notebook), so drop the old state when its precision
    differs; the process group (PartialState) is kept."""
    old = AcceleratorState._shared_state.get("_mixed_precision")
    if old is not None and old != wanted:
        AcceleratorState._reset_state(reset_partial_state=False)


def mixed_precision(precision: str) -> str:
    if precision == "auto":
        if not torch.cuda.is_available():
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
