"""Standard benchmarks through lm-eval-harness, on models already loaded (student and teacher).

    res = evaluate_tasks({"student": s, "teacher": t}, tok, ["hellaswag", "my_tasks/ppl.yaml"])
    res["tasks"]["hellaswag"]["acc_norm"]    # {"student": ..., "teacher": ...}

Each model runs through lm-eval's own ``HFLM`` wrapper and ``simple_evaluate`` (its default seeds,
its metrics), so a number here is the number ``lm_eval --model hf`` prints for the same
checkpoint. A task is a name lm-eval knows (hub datasets: needs the network) or the path of a task
YAML, or of a directory of them, which works offline when the YAML reads local data files.
lm-eval is optional (``pip install 'gpconv[eval]'``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import yaml
from torch import nn

from ..errors import GPConvError
from ..hfutil import first_line

_MISSING = "lm-eval tasks need lm-eval-harness: pip install 'gpconv[eval]'  (or: pip install lm-eval)"


class _TaskYamlLoader(yaml.SafeLoader):
    """Safe YAML that reads lm-eval's ``!function module.name`` tags (and any other tag) as None:
    only the ``task`` / ``group`` name is wanted here; lm-eval itself resolves the functions."""


_TaskYamlLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _yaml_task_name(path: Path) -> str | None:
    """The task (or group) a task YAML defines; None for a template without one (``include`` bases)."""
    try:
        cfg = yaml.load(path.read_text(), Loader=_TaskYamlLoader)
    except (OSError, yaml.YAMLError) as e:
        raise GPConvError(f"cannot read task YAML {path}: {first_line(e)}") from None
    if not isinstance(cfg, dict):
        return None
    name = cfg.get("task") if isinstance(cfg.get("task"), str) else cfg.get("group")
    return name if isinstance(name, str) else None


class TaskSpec(NamedTuple):
    """What ``--tasks`` names: every task to run, the directories lm-eval indexes for the local
    ones, and the names that must come from lm-eval's own task registry."""

    names: list[str]
    include_paths: list[str]
    registered: list[str]


def resolve_tasks(tasks: str | Sequence[str]) -> TaskSpec:
    """The :class:`TaskSpec` of ``--tasks`` items: a comma-separated string or a list of task
    names, task YAML files and directories of task YAMLs. A YAML's directory is what lm-eval
    indexes (so its ``include:`` siblings resolve); the name run is the one the file defines."""
    items = [t.strip() for item in ([tasks] if isinstance(tasks, str) else tasks) for t in str(item).split(",")]
    names: list[str] = []
    include: list[str] = []
    registered: list[str] = []
    for item in filter(None, items):
        path = Path(item).expanduser()
        if path.suffix in (".yaml", ".yml") or path.is_dir():
            if not path.exists():
                raise GPConvError(f"task YAML {item} does not exist")
            files = sorted(path.glob("*.y*ml")) if path.is_dir() else [path]
            found = [n for n in map(_yaml_task_name, files) if n]
            if not found:
                raise GPConvError(f"{item} defines no lm-eval task (no YAML with a 'task' or 'group' name)")
            names += found
            where = str((path if path.is_dir() else path.parent).resolve())
            include += [where] if where not in include else []
        else:
            names.append(item)
            registered.append(item)
    if not names:
        raise GPConvError("--tasks names no task")
    return TaskSpec(list(dict.fromkeys(names)), include, registered)


def _lm_eval():
    try:
        import lm_eval  # optional (extra 'eval') and heavy (~5 s to import)
        from lm_eval.models.huggingface import HFLM  # optional, as above
        from lm_eval.tasks import TaskManager, get_task_dict  # optional, as above
    except ImportError:
        raise GPConvError(_MISSING) from None
    return lm_eval, HFLM, TaskManager, get_task_dict


def task_manager(tasks: str | Sequence[str]):
    """``(names, lm_eval.tasks.TaskManager)`` with every task checked and its data loaded once
    (a missing task or unreachable dataset is one error line, before any model is loaded)."""
    _, _, TaskManager, get_task_dict = _lm_eval()
    names, include, registered = resolve_tasks(tasks)
    # lm-eval's own registry takes ~15 s to index (thousands of YAMLs): only when a name needs it
    manager = TaskManager(include_path=include or None, include_defaults=bool(registered))
    matches = {n: manager.match_tasks([n]) for n in registered}  # a glob ("arc_*") names several
    unknown = [n for n, found in matches.items() if not found]
    if unknown:
        raise GPConvError(f"unknown lm-eval task(s): {', '.join(unknown)} (not a task, group or tag lm-eval knows, "
                          "nor a task YAML; `lm_eval ls tasks` lists them)")
    names = list(dict.fromkeys(m for n in names for m in matches.get(n, [n])))
    try:
        get_task_dict(names, manager)
    except Exception as e:  # datasets / network / YAML errors of every kind: one line for the user
        raise GPConvError(f"cannot load lm-eval task(s) {', '.join(names)}: {first_line(e)}") from None
    return names, manager


def _metric_name(key: str) -> str:
    """lm-eval's ``"acc,none"`` -> ``"acc"``; a filtered one keeps its filter (``"exact_match,flexible-extract"``)."""
    metric, _, filt = key.partition(",")
    return metric if filt in ("", "none") else key


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def evaluate_tasks(
    models: Mapping[str, nn.Module],
    tokenizers,
    tasks: str | Sequence[str],
    *,
    limit: float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    manager=None,
) -> dict:
    """lm-eval tasks for every model (e.g. ``{"student": s, "teacher": t}``), side by side.

    Returns ``{"tasks": {task: {metric: {model: value}}}, "stderr": {...the same, where lm-eval
    gives one}, "higher_is_better": {task: {metric: bool}}, "samples": {task: documents scored}}``.

    Args:
        tokenizers: One tokenizer for all models, or one per model name (None: the other models').
        limit: At most this many documents per task (below 1: that fraction of each task); lm-eval's --limit.
        num_fewshot: Few-shot examples per prompt (default: each task's own setting).
        batch_size: Requests per forward pass.
        manager: A ``TaskManager`` from :func:`task_manager`, ``tasks`` then the names it returned
            (None: both built here from ``tasks``).
    """
    lm_eval, HFLM, _, _ = _lm_eval()
    if manager is None:
        names, manager = task_manager(tasks)
    else:  # the names task_manager returned with it
        names = [tasks] if isinstance(tasks, str) else list(tasks)
    toks = dict(tokenizers) if isinstance(tokenizers, Mapping) else dict.fromkeys(models, tokenizers)
    spare = next((t for t in toks.values() if t is not None), None)
    if spare is None:
        raise GPConvError("lm-eval tasks need a tokenizer; the model directory has none (save one with the model)")
    for model_name, model in models.items():
        if not (hasattr(model, "config") and hasattr(model, "device")):
            raise GPConvError(f"lm-eval tasks need a transformers model; {model_name} ({type(model).__name__}) has no "
                              ".config / .device")
    out: dict[str, dict] = {"tasks": {}, "stderr": {}, "higher_is_better": {}, "samples": {}}
    log = logging.getLogger("lm_eval")
    level = log.level
    log.setLevel(logging.ERROR)  # its per-task notes (and --limit's "testing only") would bury the table
    try:
        for model_name, model in models.items():
            _collect(out, model_name, _run(lm_eval, HFLM, model, toks.get(model_name) or spare, names, manager,
                                           limit=limit, num_fewshot=num_fewshot, batch_size=batch_size))
    finally:
        log.setLevel(level)
    return out


def _run(lm_eval, HFLM, model: nn.Module, tokenizer, names: list[str], manager, *, batch_size: int, **kw) -> dict:
    """One model's ``simple_evaluate`` result, the model in eval mode meanwhile."""
    was_training = model.training
    model.eval()
    try:
        # lm-eval's own wrapper on the loaded model (HFLM takes an instance; transformers 5 on
        # CPU works): its tokenisation, batching and context truncation are then lm-eval's own
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        return lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, log_samples=False, **kw)
    finally:
        model.train(was_training)


def _collect(out: dict, model_name: str, res: dict) -> None:
    """Fold one model's ``simple_evaluate`` result into ``out`` (metrics, stderr, sample counts)."""
    for task, metrics in res["results"].items():
        for key, v in metrics.items():
            if "," not in key or _number(v) is None:
                continue  # "alias", "name", "sample_len" and "N/A" stderr
            metric = _metric_name(key.replace("_stderr,", ","))
            kind = "stderr" if "_stderr," in key else "tasks"
            out[kind].setdefault(task, {}).setdefault(metric, {})[model_name] = float(v)
        for metric, better in res.get("higher_is_better", {}).get(task, {}).items():
            out["higher_is_better"].setdefault(task, {})[metric] = bool(better)
        n = res.get("n-samples", {}).get(task, {}).get("effective")
        if n is not None:
            out["samples"][task] = int(n)
