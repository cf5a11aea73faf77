"""Shrinking a safetensors checkpoint directory without loading the model.

``stream_shrink(src, out, config)`` gives the same checkpoint as ::

    model = AutoModelForCausalLM.from_pretrained(src); gpconv.shrink(model, config)
    gpconv.save_pretrained(model, out, tokenizer)

(tensor for tensor, bit for bit, for the same random state), but holds at most one dense layer
and one output shard in memory, so a 3.8B-parameter model shrinks on a 24 GB machine:

1. the config is read and the model is built on the meta device (no memory); ``gpconv.shrink``
   runs on it, which gives the exact plan (module name -> block) the in-memory path would make;
2. tensors are then read one at a time from the source shards (``safe_open``; the file is
   reopened per tensor, so no mapping of a whole shard stays resident), in the model's own
   order: a planned layer's dense weight is fitted to its block (``random`` or ``project``,
   through the same :func:`gpconv.fitting.fit_layer` as ``shrink``, in the same order, hence the
   same random draws), every other tensor is passed through;
3. output shards are written as soon as they fill up (``max_shard_size``), then the index,
   ``config.json`` with the ``gpconv`` plan section and the generated modeling file (shared
   with :func:`gpconv.save_pretrained`), the tokenizer and the generation config, all inside
   :func:`gpconv.fsutil.atomic_dir`.

Only configs whose plan does not depend on the weights stream (see :func:`unsupported`):
``init="fit"`` needs calibration data, and a parameter target, depth truncation, the
hybrid's automatic split or ``measure_options`` look at every layer before choosing. For those
the CLI falls back to the in-memory path.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, GenerationConfig

from .._version import __version__
from ..errors import GPConvError
from ..fitting import fit_layer
from ..fsutil import atomic_dir, check_output_dir
from ..hfutil import parse_dtype, quiet
from ..layers import BlockSpec, is_gpconv_module
from ..surgery import PLAN_FORMAT, GPConvConfig, current_plan, shrink
from .load import build_meta, is_gpconv_dir, read_config, weight_files
from .models import load_tokenizer
from .save import attach_plan

WEIGHTS_INDEX = "model.safetensors.index.json"


class StreamUnsupported(GPConvError):
    """This input or config cannot stream; loading the model (``gpconv.shrink``) can still do it.

    Raised before anything is written, so a caller can fall back to the in-memory path.
    """


# --------------------------------------------------------------------------------------------
# What can stream
# --------------------------------------------------------------------------------------------


def unsupported(cfg) -> str | None:
    """Why ``cfg`` cannot take the streaming path, or None if it can."""
    if cfg.init not in ("random", "project"):
        return f"init={cfg.init!r} needs calibration data (streaming supports random and project)"
    if getattr(cfg, "target_params", None) is not None:
        return "a parameter target chooses blocks by looking at every layer first"
    if getattr(cfg, "num_layers", None) is not None or getattr(cfg, "keep_layers", None) is not None:
        return "depth truncation renames layers"
    if cfg.variant == "hybrid" and cfg.rank is None:
        return "the hybrid's automatic grouped/low-rank split looks at every layer first"
    if getattr(cfg, "measure_options", False):
        return "measure_options fits extra options per layer"
    return None


def streamable_dir(path) -> bool:
    """A local transformers directory with safetensors weights that is not already a gpconv checkpoint."""
    p = Path(path).expanduser()
    if not p.is_dir() or not (p / "config.json").is_file() or is_gpconv_dir(p):
        return False
    return (p / WEIGHTS_INDEX).is_file() or any(p.glob("*.safetensors"))


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


class _Source:
    """Tensors of a checkpoint directory, read one at a time."""

    def __init__(self, path: Path):
        self.where: dict[str, Path] = {}
        for f in weight_files(path):
            try:
                with safe_open(str(f), framework="pt", device="cpu") as fh:
                    for k in fh.keys():
                        self.where[k] = f
            except Exception as e:  # SafetensorError, OSError: a truncated or foreign file
                raise GPConvError(f"cannot read {f}: not a valid safetensors file ({str(e).strip() or type(e).__name__})") from None

    def get(self, key: str) -> torch.Tensor:
        # One open per tensor: the mapping goes away with the handle, so resident pages of a
        # multi-GB shard never add up in this process (reopening costs a header parse, ~0.1 ms).
        with safe_open(str(self.where[key]), framework="pt", device="cpu") as fh:
            return fh.get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        with safe_open(str(self.where[key]), framework="pt", device="cpu") as fh:
            return tuple(fh.get_slice(key).get_shape())


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def parse_size(size) -> int:
    """``"2GB"`` -> 2_000_000_000, ``"500MiB"`` -> 524_288_000, ints as they are (transformers' rule)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B)?\s*", str(size).upper())
    if not m:
        raise GPConvError(f"cannot read shard size {size!r}; write it like 2GB or 500MB")
    num, unit, b = m.groups()
    base = 1024 if b == "IB" else 1000
    return int(float(num) * base ** " KMGT".index(unit or " "))


class _ShardWriter:
    """Accumulates tensors and writes a safetensors shard whenever the next one would overflow."""

    def __init__(self, tmp: Path, max_bytes: int):
        self.tmp, self.max_bytes = tmp, max_bytes
        self.shards: list[tuple[Path, list[str]]] = []
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.total_bytes = 0
        self.total_numel = 0

    def add(self, key: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self.flush()
        self.pending[key] = t.contiguous()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes
        self.total_numel += t.numel()

    def flush(self) -> None:
        if not self.pending:
            return
        f = self.tmp / f".shard-{len(self.shards):05d}.safetensors"
        save_file(self.pending, str(f), metadata={"format": "pt"})
        self.shards.append((f, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Name the shards like transformers does and write the index; returns the file names."""
        self.flush()
        if len(self.shards) == 1:
            self.shards[0][0].rename(self.tmp / "model.safetensors")
            return ["model.safetensors"]
        n = len(self.shards)
        weight_map, names = {}, []
        for i, (f, keys) in enumerate(self.shards, 1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            f.rename(self.tmp / name)
            names.append(name)
            weight_map.update({k: name for k in keys})
        index = {"metadata": {"total_size": self.total_bytes, "total_parameters": self.total_numel},
                 "weight_map": weight_map}
        (self.tmp / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return names


# --------------------------------------------------------------------------------------------
# The streaming shrink
# --------------------------------------------------------------------------------------------


def _resolve_dtype(dtype, config, source: _Source) -> torch.dtype | None:
    """The one floating dtype the in-memory path would load (``auto``: the config's, else the
    first floating tensor's); None if the checkpoint has no floating tensors."""
    td = parse_dtype(dtype)
    if td is not None:
        return td
    cd = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(cd, str) and cd != "auto":
        cd = getattr(torch, cd, None)
    if isinstance(cd, torch.dtype):
        return cd
    for k in source.where:
        t = source.get(k)
        if t.is_floating_point():
            return t.dtype
    return None


def stream_shrink(
    src: str | os.PathLike,
    out: str | os.PathLike,
    config=None,
    *,
    dtype=None,
    overwrite: bool = False,
    max_shard_size: str | int = "2GB",
    model_name: str | None = None,
    progress=None,
    check=None,
):
    """Shrink the checkpoint directory ``src`` into ``out`` without loading it (see module docs).

    ``config`` is a :class:`gpconv.GPConvConfig` (init ``random`` or ``project``); ``dtype``
    None/"auto" keeps the checkpoint's. ``progress(i, n, name)`` is called per fitted layer;
    ``check(report)`` sees the planned report before anything is written (and may raise).
    Returns the :class:`~gpconv.report.ShrinkReport` (counts from the planned model).
    """
    cfg = config or GPConvConfig()
    src = Path(src).expanduser()
    if not streamable_dir(src):
        raise StreamUnsupported(f"{src} is not a local transformers checkpoint with safetensors weights (or is already a gpconv checkpoint)")
    read_config(src)  # a readable config.json, or a one-line error
    why = unsupported(cfg)
    if why is not None:
        raise StreamUnsupported(f"this shrink cannot stream: {why}; load the model instead (gpconv.shrink)")
    check_output_dir(out, overwrite)
    max_bytes = parse_size(max_shard_size)

    # 1. plan on the meta device: exactly what shrink() would do to the loaded model
    with quiet():
        hf_config = AutoConfig.from_pretrained(src)
    model = build_meta(hf_config)
    model.tie_weights()  # build_meta leaves a tied lm_head untied on meta; loading ties it
    source = _Source(src)
    td = _resolve_dtype(dtype, hf_config, source)
    dense_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for k, f in source.where.items():
        if k in dense_shapes and source.shape(k) != dense_shapes[k]:
            raise GPConvError(f"{f.name}: {k!r} has shape {source.shape(k)}, the config implies {dense_shapes[k]}")
    report = shrink(model, cfg, model_name=model_name or str(src))
    if check is not None:  # the caller's last word on the plan, before anything is written
        check(report)
    plan = current_plan(model)["modules"]

    # keys to write, in the model's order; a tied duplicate (lm_head tied to the embeddings) is
    # not written, like transformers' save_pretrained
    seen, tied = set(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.add(id(p))
    block_of = {}
    for name, mod in model.named_modules():
        if is_gpconv_module(mod):
            for k in mod.state_dict():
                block_of[f"{name}.{k}"] = name
    keys = [k for k in model.state_dict() if k not in tied]
    # Dense keys of the planned layers must be there too. A mismatch usually means transformers
    # renames or fuses this checkpoint's tensors while loading (or fills in missing ones):
    # only the loading path knows how, so the caller falls back to it.
    needed = [k for k in keys if k not in block_of]
    for name, d in plan.items():
        needed.append(f"{name}.weight")
        if d.get("bias"):
            needed.append(f"{name}.bias")
    missing = [k for k in needed if k not in source.where]
    if missing:
        raise StreamUnsupported(f"the checkpoint lacks {len(missing)} tensor(s) the model has, e.g. {missing[0]!r}")

    def read(key):
        t = source.get(key)
        return t.to(td) if td is not None and t.is_floating_point() else t

    final_plan, errors, done = {}, {}, set()
    n_blocks, i_block = len(plan), 0
    with atomic_dir(out, overwrite) as tmp:
        writer = _ShardWriter(tmp, max_bytes)
        for key in keys:
            name = block_of.get(key)
            if name is None:
                writer.add(key, read(key))
                continue
            if name in done:
                continue
            # 2. one dense layer in memory: fit its block, write it, drop both
            spec = BlockSpec.from_dict(plan[name])
            w = read(f"{name}.weight")
            if spec.source == "conv1d":
                w = w.t()  # GPT-2's Conv1D stores (in, out)
            b = read(f"{name}.bias") if spec.bias else None
            block, err = fit_layer(spec, w, b, cfg.init, None, cfg.ridge, getattr(cfg, "permute", False))
            del w, b
            for k, t in block.state_dict().items():
                writer.add(f"{name}.{k}", t.detach())
            final_plan[name], errors[name] = block.spec.to_dict(), err
            done.add(name)
            del block
            i_block += 1
            if progress is not None:
                progress(i_block, n_blocks, name)
        writer.finish()

        # 3. config with the plan, modeling file, tokenizer, generation config
        # the same keys save_pretrained writes: current_plan() + the gpconv version
        full_plan = {"format": PLAN_FORMAT, "modules": final_plan, "gpconv_version": __version__}
        if td is not None:
            hf_config.dtype = str(td).split(".")[1]  # as transformers' save_pretrained records it
        hf_config.architectures = [type(model).__name__]
        attach_plan(hf_config, model, full_plan, tmp)  # the (meta) model only lends its class
        hf_config.save_pretrained(tmp)
        with quiet():
            if (src / "generation_config.json").is_file():
                gen = GenerationConfig.from_pretrained(src)
            else:
                gen = GenerationConfig.from_model_config(hf_config)
        gen.save_pretrained(tmp)
        tok = load_tokenizer(src)
        if tok is not None:
            tok.save_pretrained(tmp)

        for m in report.modules:
            if m.name in errors and hasattr(m, "error"):
                m.error = errors[m.name]
                if final_plan[m.name].get("permuted") and "permuted" not in m.reason:
                    m.reason += ", permuted"  # as surgery reports a permuted block
        report.save(tmp)  # inside the atomic write, as save_pretrained(report=...) does
    return report

