"""Experiment trackers (accelerate's): the rows of the metrics log, also sent to TensorBoard or
Weights & Biases.

Each logged row goes to the trackers as ``train/<name>`` or ``val/<name>`` scalars at its step
(the numbers only: loss, kl, ce, hidden, lr, grad_norm, tokens, tokens_per_s, perplexity,
accuracy, ...). TensorBoard writes ``OUT/tensorboard/gpconv/`` (event files); a resumed run drops the
events after its checkpoint's step, as the metrics file does. Only the main process writes.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from accelerate.utils import ProjectConfiguration

from .config import TrainConfig

TENSORBOARD_DIR = "tensorboard"
PROJECT = "gpconv"  # the W&B project; TensorBoard's events go to OUT/tensorboard/gpconv/


def accelerator_kwargs(cfg: TrainConfig) -> dict:
    """``log_with`` and ``project_config`` for the Accelerator (TrainConfig checked the packages)."""
    names = cfg.trackers
    if not names:
        return {}
    out = Path(cfg.out_dir).expanduser()
    return {"log_with": list(names),
            "project_config": ProjectConfiguration(project_dir=str(out), logging_dir=str(out / TENSORBOARD_DIR))}


def start(acc, cfg: TrainConfig, out: Path, resume_step: int | None, run_name: str) -> None:
    """Open the trackers (a resumed run's TensorBoard drops the events after ``resume_step``)."""
    if not cfg.trackers:
        return
    config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in asdict(cfg).items()}
    init = {"wandb": {"name": run_name, "dir": str(out)}}
    if resume_step is not None:
        init["tensorboard"] = {"purge_step": resume_step + 1}
    acc.init_trackers(PROJECT, config=config, init_kwargs={k: v for k, v in init.items() if k in cfg.trackers})


def log(acc, cfg: TrainConfig, row: dict) -> None:
    """Send a metrics row to the trackers (its numbers, prefixed with its split)."""
    if not cfg.trackers:
        return
    split = row.get("split", "train")
    values = {f"{split}/{k}": v for k, v in row.items()
              if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool)}
    acc.log(values, step=int(row["step"]))


def finish(acc, cfg: TrainConfig) -> None:
    """Close the trackers (flush TensorBoard's events). Not ``acc.end_training()``: it also ends
    the process group, which the end of the run (gathering an FSDP model) and a later run in the
    same processes still need."""
    if cfg.trackers:
        for tracker in acc.trackers:
            tracker.finish()
