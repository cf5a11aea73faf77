"""Surgery commands: shrink, report, densify."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer

from .app import CALIBRATION, DEFAULT_MODEL, SURGERY, _emit, app, user_errors
from .options import Flag, Group, options

# `gpconv report` plans with shrink's options (those that change the budget), each "not given"
# unless given: only with one does it show dense vs shrunk
_REPORT_SKIPS = ("init", "ridge", "permute", "layer_selection", "measure_options")
REPORT = Group(SURGERY.cls, exclude=_REPORT_SKIPS, flags={
    f.name: dataclasses.replace(SURGERY.flags.get(f.name, Flag()), default=None)
    for f in SURGERY.fields() if f.name not in _REPORT_SKIPS})


@app.command(
    epilog="""**Examples**

    gpconv shrink tiny-phi3 --out tiny-kphi3 --min-channels-per-group 64

    gpconv shrink microsoft/Phi-3-mini-4k-instruct --out kphi3-mini --dtype bfloat16

    gpconv shrink smollm2-135m-instruct --out smol-grouped -m 64 --targets mlp --dry-run

    gpconv shrink ./my-model --out ./small -t q_proj,k_proj,v_proj -x 'model\\\\.layers\\\\.0\\\\..*' --json
"""
)
@user_errors
@options(SURGERY, CALIBRATION)
def shrink(
    model: str = typer.Argument(DEFAULT_MODEL, help="Hub id, local directory, .gguf file, or a built-in name (tiny-phi3, smollm2-135m-instruct)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (a normal HF checkpoint directory)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16 (weights as loaded and saved)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Plan and report only; reads the config, not the weights."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON instead of tables."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output directory."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda | cuda:N: where calibration and the fits run (the checkpoint is written from the CPU)."),
    **opts,
):
    """Replace a model's dense layers by grouped pointwise blocks and save it."""
    import gpconv
    from gpconv.data import check_local_source
    from gpconv.errors import GPConvError
    from gpconv.fsutil import check_output_dir
    from gpconv.surgery import calibration_from_source, check_refine

    cfg = SURGERY.build(opts)
    calib_values = CALIBRATION.values(opts)
    if calib_values["sequential"] and calib_values.get("source") is None:
        raise GPConvError("--sequential needs --calibration-data")
    check_refine(calib_values["refine_steps"], calib_values["refine_lr"], calib_values["sequential"],
                 ("--refine-steps", "--refine-lr", "--sequential (each layer is refined on the shrunk prefix's outputs)"))
    calibration = CALIBRATION.build(opts)
    if dry_run:
        m, _ = gpconv.load_model(model, meta=True)
        report = gpconv.shrink(m, cfg, dry_run=True, model_name=model)
        _emit(report, as_json, None)
        return
    if out is None:
        raise GPConvError("--out DIR is required (or use --dry-run)")
    check_output_dir(out, overwrite)
    if cfg.init == "fit" and calibration.source is None:
        raise GPConvError("--init fit needs --calibration-data (e.g. an instruction .json/.jsonl file)")
    if calibration.source is not None:
        check_local_source(calibration.source)  # a bad file fails before the model loads (minutes for a large one)
    dev = _device(device)
    if calibration.source is not None or dev.type != "cpu":  # data-aware, or on a GPU: the model is loaded
        m, tok = gpconv.load_model(model, dtype=dtype)
        calib = calibration_from_source(calibration, tok) if calibration.source is not None else None
        report = gpconv.shrink(m.to(dev), cfg, calibration=calib, model_name=model)
        _check_changed(report)
        gpconv.save_pretrained(m.to("cpu"), out, tok, overwrite=overwrite, report=report)
        _finish(report, out, as_json)
        return
    from gpconv.hub import StreamUnsupported, stream_shrink

    try:
        # A local safetensors directory with a data-free init streams tensor by tensor (the
        # model is never loaded; same checkpoint as below). Anything else: StreamUnsupported,
        # raised before any work.
        report = stream_shrink(model, out, cfg, dtype=dtype, overwrite=overwrite, model_name=model,
                               check=_check_changed)
    except StreamUnsupported:
        m, tok = gpconv.load_model(model, dtype=dtype)
        report = gpconv.shrink(m, cfg, model_name=model)
        _check_changed(report)
        gpconv.save_pretrained(m, out, tok, overwrite=overwrite, report=report)
    _finish(report, out, as_json)


def _device(name: str):
    import torch

    from gpconv.errors import GPConvError

    try:
        dev = torch.device(name)
    except RuntimeError:
        raise GPConvError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GPConvError(f"--device {name}, but torch sees no CUDA device")
    if dev.type not in ("cpu", "cuda"):
        raise GPConvError(f"surgery runs on cpu or cuda, not {name!r}")
    return dev


def _check_writable(path: Path, flag: str) -> None:
    """A file the command will write: refused before any work if its directory is missing or it is a directory."""
    from gpconv.errors import GPConvError

    if path.is_dir():
        raise GPConvError(f"{flag} {path} is a directory; give a file name")
    if not path.parent.is_dir():
        raise GPConvError(f"{flag} {path}: no such directory {path.parent}")


def _check_changed(report) -> None:
    """Refuse to write a copy of the model that surgery left as it was."""
    from gpconv.errors import GPConvError

    if report.after.total == report.before.total:
        dense = [m for m in report.modules if m.status != "replaced"]
        why = f" (e.g. {dense[0].name}: {dense[0].reason})" if dense and dense[0].reason else ""
        raise GPConvError(f"nothing to save: no layer was replaced and no layer removed{why}; "
                          "lower --min-channels-per-group or change --targets")


def _finish(report, out: Path, as_json: bool) -> None:
    """The report (also saved beside the checkpoint) on the terminal."""
    _emit(report, as_json, None)
    if not as_json:
        typer.echo(f"saved to {out}  (load: gpconv.from_pretrained({str(out)!r}))")


@app.command(
    epilog="""**Examples**

    gpconv report tiny-phi3

    gpconv report ./phi3-2layer-config-dir -m 256       (dense vs shrunk, from config.json only)

    gpconv report ./kphi3-mini --json
"""
)
@user_errors
@options(REPORT)
def report(
    model: str = typer.Argument(..., help="Model directory (config.json alone is enough), hub id, .gguf, or built-in name."),
    as_json: bool = typer.Option(False, "--json", help="JSON instead of tables."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Also write the report as Markdown to this file."),
    max_rows: int = typer.Option(60, "--max-rows", help="Module rows shown in the terminal table."),
    **opts,
):
    """Parameter budget of a model (built on the meta device: no weights are read).

    With surgery options (-m, -t, --variant, ...) it shows what `gpconv shrink` would do.
    """
    import gpconv
    from gpconv.surgery import describe

    if markdown is not None:
        _check_writable(markdown, "--markdown")
    m, _ = gpconv.load_model(model, meta=True)
    if REPORT.given(opts):
        rep = gpconv.shrink(m, REPORT.build(opts), dry_run=True, model_name=model)
    else:
        rep = describe(m, model_name=model)
    _emit(rep, as_json, markdown, max_rows)


@app.command(
    epilog="""**Example**

    gpconv densify ./kphi3-mini --out ./kphi3-mini-dense
"""
)
@user_errors
def densify(
    model_dir: Path = typer.Argument(..., help="A gpconv checkpoint directory."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the plain dense model."),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output directory."),
):
    """Write the exact dense equivalent of a shrunk model (loadable by plain transformers)."""
    from gpconv.hub import densify_dir

    densify_dir(model_dir, out, overwrite=overwrite, dtype=dtype)
    typer.echo(f"saved dense model to {out}")
