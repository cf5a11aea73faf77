"""Held-out quality of a model (and its teacher, side by side) and text generation.

    train, val = gpconv.build_datasets("data.jsonl", tok, block_size=512)
    gpconv.evaluate(student, val)        # {"loss": ..., "perplexity": ..., "accuracy": ..., ...}
    gpconv.compare({"student": student, "teacher": teacher}, val)
    gpconv.generate(student, tok, "What is a grouped convolution?")

Loss is the mean next-token cross-entropy over the tokens the labels count (all tokens, or the
responses only if the blocks were built with ``response_only``); perplexity is ``exp(loss)``;
accuracy is how often the most likely next token is the right one.
"""

from __future__ import annotations

import contextlib
import math
from typing import Mapping

import torch
from torch import nn

from ..data import TokenBlocks, as_blocks
from ..errors import GPConvError
from .losses import loss_sums, model_outputs


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def eval_sums(model: nn.Module, data: TokenBlocks, indices, batch_size: int, autocast=None) -> torch.Tensor:
    """``[summed cross-entropy, counted tokens, correct predictions]`` over ``data[indices]``."""
    device = _device(model)
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    indices = torch.as_tensor(list(indices), dtype=torch.long)
    try:
        for i in range(0, len(indices), batch_size):
            ids, labels = data.batch(indices[i:i + batch_size])
            ids, labels = ids.to(device), labels.to(device)
            with autocast() if autocast else contextlib.nullcontext():
                logits, _ = model_outputs(model, ids)
            s = loss_sums(logits, labels, accuracy=True)
            n = (labels[:, 1:] != -100).sum()
            sums += torch.stack([s.ce.double(), n.double(), s.correct.double()])
    finally:
        model.train(was_training)
    return sums


def metrics_from_sums(sums: torch.Tensor) -> dict:
    ce, n, correct = (float(x) for x in sums)
    if n == 0:
        raise GPConvError("no tokens to evaluate: the data is empty or its labels count nothing")
    loss = ce / n
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "accuracy": correct / n, "tokens": int(n)}


def evaluate(model: nn.Module, data, *, batch_size: int = 8, max_batches: int | None = None) -> dict:
    """Loss, perplexity, next-token accuracy and counted tokens of ``model`` on ``data``.

    Args:
        batch_size: Blocks per forward pass.
        max_batches: Evaluate at most this many batches.
    """
    data = as_blocks(data)
    n = len(data) if max_batches is None else min(len(data), max_batches * batch_size)
    out = metrics_from_sums(eval_sums(model, data, range(n), batch_size))
    out["blocks"] = n
    return out


def compare(models: Mapping[str, nn.Module], data, **kw) -> dict[str, dict]:
    """:func:`evaluate` for several models on the same blocks, e.g. ``{"student": s, "teacher": t}``."""
    return {name: evaluate(m, data, **kw) for name, m in models.items()}


def chat_prompt(tokenizer, prompt: str, system: str | None = None, chat: bool = True) -> torch.Tensor:
    """``(1, T)`` input ids: through the tokenizer's chat template when it has one and ``chat``."""
    if chat and getattr(tokenizer, "chat_template", None):
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 0.2,
    top_p: float = 0.9,
    repetition_penalty: float = 1.0,
    system: str | None = None,
    chat: bool = True,
    seed: int | None = None,
    static_cache: bool = False,
) -> str:
    """The model's reply to ``prompt`` (only the new text). Greedy unless ``do_sample``.

    Args:
        max_new_tokens: Tokens to generate at most.
        do_sample: Sample instead of greedy decoding.
        temperature: Sampling temperature (with do_sample).
        top_p: Nucleus sampling mass (with do_sample).
        repetition_penalty: Above 1 discourages repeats.
        system: A system message (chat templates that support one).
        chat: Feed the prompt through the tokenizer's chat template (when it has one).
        seed: Seed for sampling.
        static_cache: Decode on a static KV cache (transformers then compiles the decode step;
            on a GPU with CUDA graphs, which pays for short 1-token steps).
    """
    if not hasattr(model, "generate"):
        raise GPConvError(f"generate needs a transformers model; {type(model).__name__} has no .generate")
    if tokenizer is None:
        raise GPConvError("generate needs a tokenizer; this model directory has none")
    ids = chat_prompt(tokenizer, prompt, system, chat).to(_device(model))
    kw = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, repetition_penalty=repetition_penalty)
    if static_cache:
        kw["cache_implementation"] = "static"
    if do_sample:  # sampling knobs only when sampling (transformers warns otherwise)
        kw.update(temperature=temperature, top_p=top_p)
    pad = getattr(model.generation_config, "pad_token_id", None)
    if pad is None:
        kw["pad_token_id"] = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
