"""Resumable training checkpoints: atomic directories, no pickle.

``OUT/checkpoints/step-000200/`` holds

* ``trainable.safetensors``: the parameters that train (frozen ones never change, so a resumed
  run gets them from the same starting model);
* ``optimizer.pt``: ``optimizer.state_dict()``, tensors and numbers only, read back with
  ``torch.load(weights_only=True)``;
* ``scheduler.json``: the learning-rate scheduler's state (plain numbers);
* ``rng.safetensors``: torch / CUDA / Python / NumPy random states of every process, as tensors;
* ``state.json``: step, tokens seen, and what the data position depends on (global batch size,
  number of training blocks), written last.

Each checkpoint is written into a hidden temporary directory and renamed into place
(:func:`gpconv.fsutil.atomic_dir`), so a run killed while saving leaves the previous checkpoint whole.
A sharded (FSDP) run writes its tensors through DCP instead (:mod:`.sharded_checkpoints`).
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import GPConvError
from ..fsutil import atomic_dir
from ..hfutil import first_line

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"step-(\d+)")


def checkpoint_dirs(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(out_dir)
    return dirs[-1] if dirs else None


def remove_partial(out_dir: str | Path) -> None:
    """Delete temporary directories a killed save left behind (``.step-*.tmp-*``)."""
    root = Path(out_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.glob(".step-*"):
            shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Random states as tensors
# --------------------------------------------------------------------------------------------


def rng_state() -> dict[str, torch.Tensor]:
    """This process's random generators as a flat dict of tensors (safetensors-ready)."""
    py_version, py_keys, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor([py_version, *py_keys], dtype=torch.int64),
        "python_gauss": torch.tensor([py_gauss is not None, py_gauss or 0.0], dtype=torch.float64),
        "numpy": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_extra": torch.tensor([np_pos, np_has_gauss, np_gauss], dtype=torch.float64),
    }
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"].tolist()
    has_gauss, gauss = state["python_gauss"].tolist()
    random.setstate((py[0], tuple(py[1:]), gauss if has_gauss else None))
    pos, has_g, g = state["numpy_extra"].tolist()
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(pos), int(has_g), g))
    if torch.cuda.is_available():
        cuda = [state[k] for k in sorted(k for k in state if k.startswith("cuda"))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# --------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(out_dir: str | Path, step: int, model: nn.Module, optimizer, scheduler,
                    rng_states: list[dict], state: dict, keep: int) -> Path:
    """Write one checkpoint (main process only), then drop all but the ``keep`` newest."""
    target = Path(out_dir) / CHECKPOINTS / f"step-{step:06d}"
    with atomic_dir(target, overwrite=True) as tmp:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        write_run_state(tmp, step, scheduler, rng_states, state)
    prune(out_dir, keep)
    return target


def write_run_state(tmp: Path, step: int, scheduler, rng_states: list[dict], state: dict) -> None:
    """The scheduler, every process's RNG and ``state.json`` (last: it marks the checkpoint complete)."""
    (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
    flat = {f"rank{r}.{k}": v.contiguous() for r, s in enumerate(rng_states) for k, v in s.items()}
    save_file(flat, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1) + "\n")


def prune(out_dir: str | Path, keep: int) -> None:
    """Drop all but the ``keep`` newest checkpoints (0: keep all)."""
    if keep > 0:
        for old in checkpoint_dirs(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, rank: int) -> dict:
    """Restore a checkpoint into ``model`` / ``optimizer`` / ``scheduler`` and this process's RNG."""
    with _readable(path):
        weights = load_file(str(path / "trainable.safetensors"))
        opt_state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != trainable:
        extra, missing = sorted(set(weights) - trainable), sorted(trainable - set(weights))
        raise GPConvError(
            f"{path} does not fit this run: it trains a different set of parameters "
            f"(e.g. {(extra or missing)[0]!r}); resume with the same model and --train mode"
        )
    with torch.no_grad():
        for n, t in weights.items():
            if params[n].shape != t.shape:
                raise GPConvError(f"{path}: {n!r} has shape {tuple(t.shape)}, the model {tuple(params[n].shape)}")
            params[n].copy_(t)
    optimizer.load_state_dict(opt_state)
    return read_run_state(path, scheduler, rank)


def read_run_state(path: Path, scheduler, rank: int) -> dict:
    """Restore the scheduler and this process's RNG; the checkpoint's ``state.json``."""
    with _readable(path):
        sched_state = json.loads((path / "scheduler.json").read_text())
        rng = load_file(str(path / "rng.safetensors"))
        state = json.loads((path / "state.json").read_text())
    scheduler.load_state_dict(sched_state)
    mine = {k.split(".", 1)[1]: v for k, v in rng.items() if k.startswith(f"rank{rank}.")}
    if mine:  # a different number of processes than before: the new ranks keep their seeds
        set_rng_state(mine)
    return state


@contextlib.contextmanager
def _readable(path: Path):
    """Reads of checkpoint ``path``'s files: a damaged or missing one is one line naming the
    checkpoint (the run stops before its first step; nothing on disk has changed)."""
    try:
        yield
    except Exception as e:  # SafetensorError, UnpicklingError, JSONDecodeError, OSError: a damaged or missing file
        raise GPConvError(f"cannot read the checkpoint {path} ({first_line(e)}); delete that directory to resume "
                          "from the one before") from None
