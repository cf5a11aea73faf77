"""Loading gpconv checkpoints without pickle and without dense weights.

``from_pretrained(dir)`` builds the base architecture on the meta device (no dense weights are
ever materialised), swaps in the planned blocks (:func:`gpconv.surgery.apply_plan`), then assigns
the safetensors tensors. :func:`load_into` does the same for a custom ``nn.Module`` built by its
own constructor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from ..errors import GPConvError
from ..hfutil import CONFIG_ERRORS, first_line, one_line, parse_dtype, quiet
from ..surgery import apply_plan
from .save import PLAN_FILE


def is_gpconv_dir(path) -> bool:
    """Does ``path`` hold a gpconv checkpoint (a ``gpconv`` section in config.json, or gpconv.json)?"""
    p = Path(path)
    if (p / PLAN_FILE).is_file():
        return True
    cfg = p / "config.json"
    if not cfg.is_file():
        return False
    try:
        raw = json.loads(cfg.read_text(encoding="utf-8"))
    except (ValueError, OSError):  # not JSON, not UTF-8: read_config says so where it matters
        return False
    return isinstance(raw, dict) and "gpconv" in raw


def has_weights(path) -> bool:
    p = Path(path)
    return any(p.glob("*.safetensors")) or any(p.glob("*.bin")) or (p / "model.safetensors.index.json").is_file()


def build_meta(config):
    """The model ``config`` describes, on the meta device (shapes only, no memory, no weights)."""
    with init_empty_weights(include_buffers=False), quiet():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # tied embeddings count once, as in the loaded model
    return model


def weight_files(path: Path) -> list[Path]:
    """The safetensors shards of a checkpoint directory, each header checked (see :func:`check_safetensors`)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = [path / f for f in sorted(set(weight_map.values()))]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise GPConvError(f"{index} is not a valid safetensors index ({first_line(e)})") from None
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        if any(path.glob("*.bin")):
            raise GPConvError(f"{path} holds only pickled .bin weights; gpconv loads safetensors only (no pickle)")
        raise GPConvError(f"{path} holds no .safetensors weights")
    for f in files:
        check_safetensors(f)
    return files


def check_safetensors(f: Path) -> None:
    """Read ``f``'s header: a missing, truncated (an interrupted download) or foreign file is one
    line here, before any model is built. safetensors checks that the header's tensors cover the
    file exactly, so a file cut short anywhere fails this."""
    if not f.is_file():
        raise GPConvError(f"cannot read {f}: no such file (the checkpoint is incomplete; download or save it again)")
    try:
        with safe_open(str(f), framework="pt", device="cpu"):
            pass
    except Exception as e:  # SafetensorError (not an OSError or ValueError), OSError: the file, not gpconv
        raise GPConvError(f"cannot read {f}: not a valid safetensors file ({first_line(e)}); "
                          "an interrupted download? download or save it again") from None


def read_config(path: Path) -> dict:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise GPConvError(f"{path} has no config.json; not a model directory")
    try:
        raw = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GPConvError(f"{cfg} is not valid JSON ({e}); an interrupted download? download or save it again") from None
    if not isinstance(raw, dict):
        raise GPConvError(f"{cfg} is not a model config (a JSON object), it holds a {type(raw).__name__}")
    return raw


def load_meta(path: str | os.PathLike) -> nn.Module:
    """A gpconv checkpoint's model on the meta device (for reports: no weights read)."""
    path = Path(path).expanduser()
    raw = read_config(path)
    if "gpconv" not in raw:
        raise GPConvError(f"{path} is not a gpconv checkpoint (config.json has no 'gpconv' section)")
    try:
        with quiet():
            config = AutoConfig.from_pretrained(path)
    except (OSError, *CONFIG_ERRORS) as e:  # a field of the wrong type, an unknown model_type
        raise GPConvError(f"{path / 'config.json'}: {one_line(e)}") from None
    model = build_meta(config)
    try:
        apply_plan(model, raw["gpconv"])
    except GPConvError as e:
        raise GPConvError(f"{path / 'config.json'}: {e}") from None
    return model


def load_state_(model: nn.Module, files: list[Path], dtype: torch.dtype | None = None) -> None:
    """Assign safetensors tensors to ``model``'s (meta or real) parameters, file by file."""
    expected = dict(model.state_dict(keep_vars=True))
    seen: set[str] = set()
    for f in files:
        part = {}
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            for k in fh.keys():
                if k not in expected:
                    raise GPConvError(f"{f.name} holds {k!r}, which this model does not have; wrong base model?")
                t = fh.get_tensor(k)
                want = expected[k]
                if tuple(t.shape) != tuple(want.shape):
                    raise GPConvError(f"{f.name}: {k!r} has shape {tuple(t.shape)}, the model expects {tuple(want.shape)}")
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                part[k] = t
        model.load_state_dict(part, strict=False, assign=True)
        seen.update(part)
        del part
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    left += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if left:
        raise GPConvError(f"the checkpoint lacks {len(left)} tensor(s), e.g. {left[0]!r}")


def from_pretrained(path: str | os.PathLike, dtype=None, device=None) -> nn.Module:
    """Load a gpconv transformers checkpoint (see module docs). ``dtype``: None keeps the saved one."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise GPConvError(f"no such model directory: {path}")
    model = load_meta(path)
    td = parse_dtype(dtype)
    load_state_(model, weight_files(path), td)
    if (path / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(path)
        except (OSError, ValueError) as e:  # transformers' word for a file that is not JSON
            raise GPConvError(f"cannot read {path / 'generation_config.json'}: {first_line(e)}") from None
    model.config._name_or_path = str(path)
    if device is not None:
        model.to(device)
    return model.eval()


def load_into(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Apply a saved custom model's plan to ``model`` (built by its own constructor) and load the weights."""
    path = Path(path).expanduser()
    plan_file = path / PLAN_FILE
    if not plan_file.is_file():
        raise GPConvError(f"{path} has no {PLAN_FILE}; not a gpconv checkpoint of a custom module")
    try:
        plan = json.loads(plan_file.read_text(encoding="utf-8"))
        apply_plan(model, plan)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GPConvError(f"{plan_file} is not valid JSON ({e})") from None
    except GPConvError as e:
        raise GPConvError(f"{plan_file}: {e}") from None
    load_state_(model, weight_files(path))
    return model
