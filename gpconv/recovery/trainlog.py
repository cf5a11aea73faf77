"""What a training run shows and leaves behind: a progress bar, a metrics file, a loss plot.

Only the main process writes or draws; the others stay silent.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

COLUMNS = ("step", "split", "epoch", "loss", "kl", "ce", "hidden", "perplexity", "accuracy", "lr", "grad_norm",
           "tokens", "tokens_per_s", "elapsed_s", "teacher_s")


class MetricsLog:
    """Rows of metrics, kept in memory and appended to ``metrics.jsonl`` or ``metrics.csv``."""

    def __init__(self, out_dir: Path | None, fmt: str = "jsonl", resume_step: int | None = None):
        self.rows: list[dict] = []
        self.path = None if out_dir is None else Path(out_dir) / f"metrics.{fmt}"
        self.fmt = fmt
        if self.path is not None and self.path.exists():
            # a resumed run keeps the rows up to its checkpoint: the steps after it run again
            keep = [] if resume_step is None else [r for r in self.read(self.path) if int(r["step"]) <= resume_step]
            self.path.unlink()
            for r in keep:
                self.log(r)

    @staticmethod
    def read(path: Path) -> list[dict]:
        if path.suffix == ".csv":
            with path.open(newline="") as f:
                return [{k: _num(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def log(self, row: dict) -> None:
        self.rows.append(row)
        if self.path is not None:
            self._write(row)

    def _write(self, row: dict) -> None:
        new = not self.path.exists()
        with self.path.open("a", newline="") as f:
            if self.fmt == "csv":
                w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
                if new:
                    w.writeheader()
                w.writerow(row)
            else:
                f.write(json.dumps(row) + "\n")


def _num(v: str):
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v


def plot_losses(rows: list[dict], path: Path, title: str = "") -> Path | None:
    """Train loss (and cross-entropy, when distilling) and validation loss against steps, as a PNG."""
    import matplotlib  # heavy (~0.5 s): only the end of a run draws

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt  # (after the backend is chosen)

    train = [r for r in rows if r.get("split") == "train"]
    val = [r for r in rows if r.get("split") == "val"]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        steps = [r["step"] for r in train]
        ax.plot(steps, [r["loss"] for r in train], lw=1, label="train loss (objective)")
        if any(r.get("kl") for r in train):
            ax.plot(steps, [r["ce"] for r in train], lw=1, alpha=0.8, label="train cross-entropy")
    if val:
        ax.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="validation cross-entropy")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per token (nats)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


class Progress:
    """A rich progress bar with loss, tokens/s and ETA; a no-op when disabled."""

    def __init__(self, total: int, start: int, enabled: bool, description: str):
        self.bar = None
        if not enabled:
            return
        self.bar = RichProgress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        self.task = self.bar.add_task(description, total=total, completed=start, loss="-", tps="-")
        self.bar.start()

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=f"{loss:.4f}", tps=f"{tokens_per_s:,.0f}")

    def print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
