"""Honest parameter and FLOP accounting, and the :class:`ShrinkReport` users read.

Conventions (the kphi-3 report's):

* ``total`` counts every parameter once (tied weights once).
* ``embedding`` is the input embeddings (every ``nn.Embedding``) plus the output layer
  (``lm_head``) when it is *not* tied to them.
* ``non_embedding = total - embedding``; the paper's 226,507,776 / 35,011,584 are this number.
* ``linear_flops_per_token`` is 2 x multiply-adds of every linear map per token, ``lm_head``
  included; attention's context-length-dependent part (QK^T, AV) is not in it because surgery
  does not change it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from dataclasses import asdict, dataclass, field

from rich.console import Console
from rich.table import Table
from torch import nn

from ..fsutil import write_text_atomic
from ..hfutil import linear_shape, output_embedding
from ..layers import is_gpconv_module

REPORT_FILES = ("gpconv_report.json", "gpconv_report.md")


def linear_macs(module: nn.Module) -> int:
    """Multiply-adds per token of a linear-like module (0 for anything else)."""
    if is_gpconv_module(module):
        spec = module.spec
        return spec.num_params - (spec.out_features if spec.bias else 0)
    shape = linear_shape(module)
    return shape[0] * shape[1] if shape else 0


@dataclass
class ParamCounts:
    total: int
    embedding: int
    non_embedding: int
    linear_flops_per_token: int

    def to_dict(self) -> dict:
        return asdict(self)


def count_parameters(model: nn.Module) -> ParamCounts:
    """Count ``model``'s parameters the way the paper did (works on the meta device)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # parameters() already yields a tied tensor once
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    emb_ids: set[int] = set()
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            emb_ids.add(id(m.weight))
    out = output_embedding(model)
    if out is not None and getattr(out, "weight", None) is not None:
        emb_ids.add(id(out.weight))  # a tied lm_head has the same id: counted once
    embedding = 0
    for p in model.parameters():
        if id(p) in emb_ids:
            embedding += p.numel()
            emb_ids.discard(id(p))
    flops = 2 * sum(linear_macs(m) for m in model.modules())
    return ParamCounts(total, embedding, total - embedding, flops)


@dataclass
class ModuleReport:
    """One linear layer gpconv looked at."""

    name: str
    kind: str
    in_features: int
    out_features: int
    status: str  # "replaced" | "dense" (left as it was) | "already" (converted earlier)
    variant: str  # "io", "chained", "hybrid", "lowrank" or "dense"
    groups: int
    rank: int
    dense_params: int
    kept_params: int
    reason: str = ""
    error: float | None = None  # relative reconstruction error (held-out calibration tokens when measured)
    options: dict | None = None  # error of each alternative block at the same size, when measured

    @property
    def kept_fraction(self) -> float:
        return self.kept_params / self.dense_params if self.dense_params else 1.0


@dataclass
class ShrinkReport:
    """What :func:`gpconv.shrink` did (or, for a dry run, would do) to a model."""

    model: str
    settings: dict
    before: ParamCounts
    after: ParamCounts
    modules: list[ModuleReport] = field(default_factory=list)
    unmatched_patterns: list[str] = field(default_factory=list)
    dry_run: bool = False
    target_non_embedding: int | None = None
    layers_kept: list[int] | None = None
    refined: list[dict] | None = None
    """Per decoder layer refined after fitting (``Calibration(refine_steps=...)``): ``layer`` and the
    held-out error of the layer's output against the dense layer ``before`` / ``after`` (root of the
    mean per-token relative squared error)."""

    # -- summaries ---------------------------------------------------------------------------

    @property
    def replaced(self) -> list[ModuleReport]:
        return [m for m in self.modules if m.status == "replaced"]

    @property
    def kept_fraction(self) -> float:
        """Non-embedding parameters after / before."""
        return self.after.non_embedding / self.before.non_embedding if self.before.non_embedding else 1.0

    def totals_by_kind(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for m in self.modules:
            t = out.setdefault(m.kind, {"modules": 0, "replaced": 0, "dense_params": 0, "kept_params": 0})
            t["modules"] += 1
            t["replaced"] += m.status in ("replaced", "already")
            t["dense_params"] += m.dense_params
            t["kept_params"] += m.kept_params
        return out

    # -- machine formats ---------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "dry_run": self.dry_run,
            "settings": self.settings,
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "kept_fraction_non_embedding": self.kept_fraction,
            "target_non_embedding": self.target_non_embedding,
            "layers_kept": self.layers_kept,
            "refined": self.refined,
            "totals_by_kind": self.totals_by_kind(),
            "unmatched_patterns": self.unmatched_patterns,
            "modules": [dict(asdict(m), kept_fraction=m.kept_fraction) for m in self.modules],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, directory: str | os.PathLike) -> None:
        """Write the report into ``directory`` as ``gpconv_report.json`` and ``gpconv_report.md``
        (beside a checkpoint, or a recipe's outputs), each file replaced whole."""
        directory = Path(directory)
        write_text_atomic(directory / REPORT_FILES[0], self.to_json() + "\n")
        write_text_atomic(directory / REPORT_FILES[1], self.to_markdown())

    # -- human formats -----------------------------------------------------------------------

    def _module_columns(self) -> list[str]:
        """Column heads; the error and note columns only when some module has one."""
        head = ["module", "kind", "in->out", "block", "groups", "dense", "kept", "kept %"]
        if any(m.error is not None for m in self.modules):
            head.append("rel. err")
        head += self._option_keys()
        if any(m.reason for m in self.modules):
            head.append("note")
        return head

    def _option_keys(self) -> list[str]:
        keys: list[str] = []
        for m in self.modules:
            for k in m.options or {}:
                if k not in keys:
                    keys.append(k)
        return keys

    def _module_rows(self, max_rows: int | None):
        head = self._module_columns()
        mods = self.modules
        if max_rows is not None and len(mods) > max_rows:
            mods = mods[:max_rows]
        for m in mods:
            row = [
                m.name, m.kind, f"{m.in_features}->{m.out_features}", m.variant + (f" r={m.rank}" if m.rank else ""),
                str(m.groups) if m.variant not in ("dense", "lowrank") else "-",
                f"{m.dense_params:,}", f"{m.kept_params:,}", f"{100 * m.kept_fraction:.1f}%",
            ]
            if "rel. err" in head:
                row.append("" if m.error is None else f"{m.error:.4f}")
            for k in self._option_keys():
                v = (m.options or {}).get(k)
                row.append("" if v is None else f"{v:.4f}")
            if "note" in head:
                row.append(m.reason)
            yield row

    def _summary_rows(self):
        b, a = self.before, self.after
        rows = [
            ["total parameters", f"{b.total:,}", f"{a.total:,}", _pct(a.total, b.total)],
            ["embedding parameters", f"{b.embedding:,}", f"{a.embedding:,}", _pct(a.embedding, b.embedding)],
            ["non-embedding parameters", f"{b.non_embedding:,}", f"{a.non_embedding:,}",
             _pct(a.non_embedding, b.non_embedding)],
            ["linear FLOPs / token", f"{b.linear_flops_per_token:,}", f"{a.linear_flops_per_token:,}",
             _pct(a.linear_flops_per_token, b.linear_flops_per_token)],
        ]
        if self.layers_kept is not None:
            rows.append(["decoder layers kept", "", ", ".join(map(str, self.layers_kept)), ""])
        if self.target_non_embedding is not None:
            rows.append(["target non-embedding", "", f"{self.target_non_embedding:,}",
                         _pct(self.target_non_embedding, b.non_embedding)])
        if self.refined:
            mean = lambda k: sum(r[k] for r in self.refined) / len(self.refined)  # noqa: E731
            better = sum(r["after"] < r["before"] for r in self.refined)
            rows.append(["layer-output error (held out, mean)", f"{mean('before'):.4f}", f"{mean('after'):.4f}",
                         f"refined: {better}/{len(self.refined)} layers improved"])
        return rows

    def _kind_rows(self):
        for kind, t in sorted(self.totals_by_kind().items()):
            yield [kind, f"{t['replaced']}/{t['modules']}", f"{t['dense_params']:,}", f"{t['kept_params']:,}",
                   _pct(t["kept_params"], t["dense_params"])]

    def to_markdown(self, max_rows: int | None = None) -> str:
        def table(head, rows):
            lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
            return "\n".join(lines)

        title = f"## gpconv report: {self.model}" + (" (dry run)" if self.dry_run else "")
        parts = [
            title,
            "",
            "Settings: " + ", ".join(f"`{k}={v}`" for k, v in self.settings.items()),
            "",
            table(["", "before", "after", "after/before"], self._summary_rows()),
            "",
            table(["kind", "replaced", "dense params", "kept params", "kept %"], list(self._kind_rows())),
            "",
            table(self._module_columns(), list(self._module_rows(max_rows))),
        ]
        if max_rows is not None and len(self.modules) > max_rows:
            parts.append(f"\n... {len(self.modules) - max_rows} more modules (see --json)")
        if self.unmatched_patterns:
            parts.append("\nPatterns that matched nothing: " + ", ".join(f"`{p}`" for p in self.unmatched_patterns))
        return "\n".join(parts) + "\n"

    def print(self, console=None, max_rows: int | None = 60) -> None:
        """A rich table on the terminal."""
        # piped output (logs, CI) is not squeezed to 80 columns: module names stay readable
        console = console or Console(width=None if sys.stdout.isatty() else 160)
        t = Table(title=f"gpconv: {self.model}" + (" (dry run)" if self.dry_run else ""), show_lines=False)
        for h in ["", "before", "after", "after/before"]:
            t.add_column(h, justify="right" if h else "left")
        for r in self._summary_rows():
            t.add_row(*r)
        console.print(t)
        k = Table(title="by kind")
        for h in ["kind", "replaced", "dense params", "kept params", "kept %"]:
            k.add_column(h, justify="left" if h == "kind" else "right")
        for r in self._kind_rows():
            k.add_row(*r)
        console.print(k)
        m = Table(title="per module")
        for h in self._module_columns():
            if h == "module":
                m.add_column(h, overflow="fold", min_width=24)
            elif h == "note":
                m.add_column(h, overflow="fold", ratio=2)
            else:
                numeric = h in ("groups", "dense", "kept", "kept %", "rel. err") or h in self._option_keys()
                m.add_column(h, justify="right" if numeric else "left", no_wrap=True)
        for r in self._module_rows(max_rows):
            m.add_row(*r)
        console.print(m)
        if max_rows is not None and len(self.modules) > max_rows:
            console.print(f"... {len(self.modules) - max_rows} more modules (use --json or --markdown for all)")
        if self.unmatched_patterns:
            console.print("patterns that matched nothing: " + ", ".join(self.unmatched_patterns))


def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:.2f}%" if b else "-"
