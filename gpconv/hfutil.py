"""Helpers around transformers and torch modules that every layer of gpconv may use: dtype
names, quiet loading, wrapper unwrapping, and finding a model's linear and output layers."""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn
from transformers import CONFIG_MAPPING, AutoConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as hf_logging

from .errors import GPConvError

try:  # transformers 5 configs are strict dataclasses: a wrong field type raises this (not a ValueError)
    from huggingface_hub.errors import StrictDataclassError
except ImportError:  # an older huggingface_hub: configs are plain classes there
    StrictDataclassError = ValueError
CONFIG_ERRORS = (ValueError, TypeError, KeyError, StrictDataclassError)
"""What building or changing a transformers config raises for a bad field value."""

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def parse_dtype(dtype) -> torch.dtype | None:
    """``None``/``"auto"`` -> None (keep the checkpoint's); a name or torch dtype -> torch dtype."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise GPConvError(f"unknown dtype {dtype!r}; choose one of: auto, {', '.join(sorted(set(DTYPES)))}")
    return DTYPES[dtype]


@contextlib.contextmanager
def quiet():
    """Silence transformers' progress bars and advisory logs while loading, and the hub client's
    retry warnings (an unreachable hub would otherwise print a line per retry before the one
    error the caller reports)."""
    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    hub = logging.getLogger("huggingface_hub")
    hub_level = hub.level
    hub.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)
        hub.setLevel(hub_level)
        if bars:
            hf_logging.enable_progress_bar()


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (for one-line errors), or its type's name."""
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


def unwrap(model: nn.Module) -> nn.Module:
    """Through DDP (``.module``) and peft (``.get_base_model()``) wrappers to the model itself."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def is_transformers(model: nn.Module) -> bool:
    """Is ``model`` (through any wrapper) a transformers ``PreTrainedModel``?"""
    return isinstance(unwrap(model), PreTrainedModel)


def conv1d_types() -> tuple[type, ...]:
    """GPT-2's ``Conv1D`` (a linear layer that stores its weight as (in, out)), when transformers is there."""
    return (Conv1D,)


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """``(in, out)`` of a dense linear layer gpconv can replace, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    conv1d = conv1d_types()
    if conv1d and isinstance(module, conv1d):
        n_in, n_out = module.weight.shape  # GPT-2 Conv1D stores (in, out)
        return n_in, n_out
    return None


def output_embedding(model: nn.Module) -> nn.Module | None:
    """The output layer: transformers' ``get_output_embeddings()``, else an ``lm_head``
    attribute, else the one linear layer whose width is the vocabulary (the largest
    ``nn.Embedding``), which is how a custom model's ``head`` is found."""
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            out = get()
        except (NotImplementedError, AttributeError):
            out = None
        if out is not None:
            return out
    if isinstance(getattr(model, "lm_head", None), nn.Module):
        return model.lm_head
    vocab = max((m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)), default=None)
    if vocab is None:
        return None
    heads = [m for m in model.modules() if (s := linear_shape(m)) is not None and s[1] == vocab]
    return heads[0] if len(heads) == 1 else None


def vocab_size(model: nn.Module) -> int | None:
    """How many tokens ``model`` predicts (its output layer's width), None where none is found."""
    head = output_embedding(unwrap(model))
    w = getattr(head, "weight", None)
    return None if w is None else w.shape[0]


def config_for(model_type, fields: dict, where: str):
    """``AutoConfig.for_model(model_type, **fields)``, or one line naming ``where`` (the file or
    recipe key) and the field at fault. An unknown model_type is named without transformers'
    list of every architecture."""
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise GPConvError(f"{where}: unknown model_type {model_type!r} (not an architecture this transformers knows)")
    try:
        return AutoConfig.for_model(model_type, **fields)
    except CONFIG_ERRORS as e:
        raise GPConvError(f"{where}: cannot build a {model_type!r} config ({one_line(e)})") from None


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's whole message on one line (a validation error's cause is on its second), cut at ``limit``."""
    s = " ".join(str(e).split()) or type(e).__name__
    return s if len(s) <= limit else s[: limit - 3] + "..."
