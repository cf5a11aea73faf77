"""The Typer app and the helpers every command module shares.

Each command parses options, calls ``gpconv.*``, and prints. A mistake the user can make
surfaces as :class:`gpconv.GPConvError`: one line on stderr, exit status 2, nothing written.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import List, Optional

os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import typer  # noqa: E402

from gpconv.data import DataConfig  # noqa: E402
from gpconv.surgery import CalibrationConfig, GPConvConfig  # noqa: E402

from .options import Flag, Group  # noqa: E402

app = typer.Typer(
    name="gpconv",
    help="Shrink causal LMs with grouped pointwise blocks (kphi-3), report the parameter budget, recover quality.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    epilog="""**Examples**

    gpconv shrink tiny-phi3 --out tiny-kphi3 -m 64           (offline demo model)

    gpconv report ./phi3-config-dir -m 256                   (budget from config.json alone)

    gpconv distill kphi3-mini --teacher microsoft/Phi-3-mini-4k-instruct --data lamini --out kd --max-steps 20000

    gpconv run --list                                        (bundled recipes)

    `gpconv COMMAND --help` shows each command's options and examples.
""",
)

DEFAULT_MODEL = "microsoft/Phi-3-mini-4k-instruct"


def user_errors(fn):
    """Turn GPConvError (and Ctrl-C) into one line + exit status, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from gpconv.errors import GPConvError

        try:
            return fn(*args, **kwargs)
        except GPConvError as e:
            typer.echo(f"gpconv: error: {e}", err=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            typer.echo("gpconv: interrupted", err=True)
            raise typer.Exit(130)

    return wrapper


def _split(values: Optional[List[str]]) -> Optional[List[str]]:
    """``-t q_proj -t k_proj`` and ``-t q_proj,k_proj`` both give ['q_proj', 'k_proj']."""
    if not values:
        return None
    out = [v.strip() for item in values for v in item.split(",") if v.strip()]
    return out or None


def _targets(values: Optional[List[str]]):
    """--targets as GPConvConfig wants it: a single pattern may be a preset or a regex."""
    out = _split(values)
    return out[0] if out is not None and len(out) == 1 else out


def _overrides(values: Optional[List[str]]) -> dict:
    from gpconv.errors import GPConvError

    out = {}
    for item in values or []:
        pat, sep, n = item.rpartition("=")
        if not sep or not pat:
            raise GPConvError(f"--override takes PATTERN=N, got {item!r}")
        try:
            out[pat] = int(n)
        except ValueError:
            raise GPConvError(f"--override {item!r}: {n!r} is not an integer") from None
    return out


def _number(flag: str, what: str):
    """A parser of an int, or else a float, for ``flag`` (--rank, --val-size)."""

    def parse(value: Optional[str]):
        from gpconv.errors import GPConvError

        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            try:
                return float(value)
            except ValueError:
                raise GPConvError(f"{flag} takes {what}, got {value!r}") from None

    return parse


def _layer_list(value: Optional[str]):
    """``"0,1,2"`` -> (0, 1, 2)."""
    from gpconv.errors import GPConvError

    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise GPConvError(f"--keep-layers takes comma-separated layer indices like 0,1,2, got {value!r}") from None


# -- the option groups: one per config dataclass ------------------------------------------------

SURGERY = Group(GPConvConfig, flags={
    "target_modules": Flag(("--targets", "-t"), List[str], _targets, default=None, help=(
        "Layers to replace: presets all-linear|attention|mlp, name suffixes, or a regex. Repeat or comma-separate.")),
    "exclude_modules": Flag(("--exclude", "-x"), List[str], _split, help="Layers never to replace (same pattern rules)."),
    "min_channels_per_group": Flag(("--min-channels-per-group", "-m")),
    "min_channels_per_group_overrides": Flag(("--override",), List[str], _overrides, default=None, help=(
        "Per-pattern min_channels_per_group, PATTERN=N (repeatable), e.g. down_proj=128.")),
    "rank": Flag(cli_type=Optional[str], parse=_number("--rank", "an integer rank or a fraction like 0.1")),
    "target_params": Flag(cli_type=Optional[str]),
    "keep_layers": Flag(cli_type=Optional[str], parse=_layer_list, help="Keep exactly these decoder layers, e.g. 0,1,2."),
})
"""GPConvConfig on `gpconv shrink` (and, every option defaulting to "not given", `gpconv report`)."""

CALIBRATION = Group(CalibrationConfig, prefix="calibration_", flags={
    "source": Flag(("--calibration-data",), help=(
        "Data for --init fit, error reports, budget and importance: a local json/jsonl/csv/parquet/txt file, "
        "a hub dataset id, or lamini.")),
    "sequential": Flag(("--sequential",)),
    "refine_steps": Flag(("--refine-steps",)),
    "refine_lr": Flag(("--refine-lr",)),
})

DATA = Group(DataConfig, exclude=("split",), flags={
    "val_size": Flag(cli_type=Optional[str], parse=_number("--val-size", "a row count or a fraction like 0.05")),
    "streaming": Flag(("--streaming/--no-streaming",)),
})


def _emit(report, as_json: bool, markdown: Optional[Path], max_rows: int = 60):
    if markdown is not None:
        from gpconv.fsutil import write_text_atomic

        write_text_atomic(markdown, report.to_markdown())  # a reader never sees half a report
    if as_json:
        typer.echo(report.to_json())
    else:
        report.print(max_rows=max_rows)
