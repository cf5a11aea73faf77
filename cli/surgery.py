"""Surgery commands: shrink, report, densify."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .app import DEFAULT_MODEL, _config, _emit, _layer_list, app, user_errors

# Options shared by shrink and report -------------------------------------------------------

_T = typer.Option(None, "--targets", "-t", help="Layers to replace: presets all-linear|attention|mlp, name suffixes, or a regex. Repeat or comma-separate.")
_X = typer.Option(None, "--exclude", "-x", help="Layers never to replace (same pattern rules).")
_V = typer.Option(None, "--variant", help="io (paper default) | chained | hybrid | lowrank.")
_I = typer.Option(None, "--init", help="random (paper, train from scratch) | project | fit (needs calibration data).")
_R = typer.Option(None, "--rank", help="Low-rank size for hybrid/lowrank: an int, or a fraction of each layer's parameters (0.1).")
_O = typer.Option(None, "--override", help="Per-pattern min_channels_per_group, PATTERN=N (repeatable), e.g. down_proj=128.")


@app.command(
    epilog="""**Examples**

    gpconv shrink tiny-phi3 --out tiny-kphi3 --min-channels-per-group 64

    gpconv shrink microsoft/Phi-3-mini-4k-instruct --out kphi3-mini --dtype bfloat16

    gpconv shrink smollm2-135m-instruct --out smol-grouped -m 64 --targets mlp --dry-run

    gpconv shrink ./my-model --out ./small -t q_proj,k_proj,v_proj -x 'model\\.layers\\.0\\..*' --json
"""
)
@user_errors
def shrink(
    model: str = typer.Argument(DEFAULT_MODEL, help="Hub id, local directory, .gguf file, or a built-in name (tiny-phi3, smollm2-135m-instruct)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (a normal HF checkpoint directory)."),
    min_channels_per_group: Optional[int] = typer.Option(None, "--min-channels-per-group", "-m", help="groups = largest common divisor of in and out <= in // this. [default: 256]"),
    targets: Optional[List[str]] = _T,
    exclude: Optional[List[str]] = _X,
    override: Optional[List[str]] = _O,
    variant: Optional[str] = _V,
    init: Optional[str] = _I,
    rank: Optional[str] = _R,
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16 (weights as loaded and saved)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Plan and report only; reads the config, not the weights."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON instead of tables."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output directory."),
    target_params: Optional[str] = typer.Option(None, "--target-params", help="Land at or just under this many non-embedding parameters: a fraction (0.25) or a count (53M). The budget solver picks each layer's block."),
    permute: bool = typer.Option(False, "--permute", help="io/hybrid: try a per-layer input channel order, kept where it lowers the error."),
    num_layers: Optional[int] = typer.Option(None, "--num-layers", help="Depth truncation: keep this many decoder layers."),
    keep_layers: Optional[str] = typer.Option(None, "--keep-layers", help="Depth truncation: keep these decoder layers, e.g. 0,1,2."),
    layer_selection: Optional[str] = typer.Option(None, "--layer-selection", help="With --num-layers: first (paper) | importance (needs calibration data)."),
    calibration_data: Optional[str] = typer.Option(None, "--calibration-data", help="Data for --init fit, error reports, budget and importance: a local json/jsonl/csv/parquet/txt file, a hub dataset id, or lamini."),
    calibration_blocks: int = typer.Option(32, "--calibration-blocks", help="Calibration blocks (a quarter is held out to measure errors)."),
    calibration_block_size: int = typer.Option(256, "--calibration-block-size", help="Tokens per calibration block."),
    calibration_format: str = typer.Option("chat-template", "--calibration-format", help="kphi3 | chat-template | plain."),
    sequential: bool = typer.Option(False, "--sequential", help="Fit layer by layer on the already-shrunk prefix (needs calibration data)."),
    refine_steps: int = typer.Option(0, "--refine-steps", help="With --sequential: Adam steps per decoder layer after the closed-form fit, matching the dense layer's output (kept only where held-out error drops)."),
    refine_lr: float = typer.Option(1e-4, "--refine-lr", help="Learning rate of --refine-steps."),
    measure_options: bool = typer.Option(False, "--measure-options", help="Report each layer's error for io project / io fit / low-rank / hybrid at the same size."),
):
    """Replace a model's dense layers by grouped pointwise blocks and save it."""
    import gpconv
    from gpconv.calibrate import check_refine
    from gpconv.errors import GPConvError
    from gpconv.io import check_output_dir

    cfg = _config(targets, exclude, min_channels_per_group, override, variant, init, rank,
                  target_params=target_params, permute=permute or None, num_layers=num_layers,
                  keep_layers=_layer_list(keep_layers), layer_selection=layer_selection,
                  measure_options=measure_options or None)
    if sequential and calibration_data is None:
        raise GPConvError("--sequential needs --calibration-data")
    check_refine(refine_steps, refine_lr, sequential,
                 ("--refine-steps", "--refine-lr", "--sequential (each layer is refined on the shrunk prefix's outputs)"))
    if dry_run:
        m, _ = gpconv.load_model(model, meta=True)
        report = gpconv.shrink(m, cfg, dry_run=True, model_name=model)
        _emit(report, as_json, None)
        return
    if out is None:
        raise GPConvError("--out DIR is required (or use --dry-run)")
    check_output_dir(out, overwrite)
    if cfg.init == "fit" and calibration_data is None:
        raise GPConvError("--init fit needs --calibration-data (e.g. an instruction .json/.jsonl file)")
    if calibration_data is not None:  # data-aware: the model is loaded
        from gpconv.calibrate import calibration_from_source

        m, tok = gpconv.load_model(model, dtype=dtype)
        calib = calibration_from_source(calibration_data, tok, format=calibration_format,
                                        block_size=calibration_block_size, num_blocks=calibration_blocks,
                                        sequential=sequential, refine_steps=refine_steps, refine_lr=refine_lr)
        report = gpconv.shrink(m, cfg, calibration=calib, model_name=model)
        _check_changed(report)
        gpconv.save_pretrained(m, out, tok, overwrite=overwrite, report=report)
        _finish(report, out, as_json)
        return
    from gpconv.stream import StreamUnsupported, stream_shrink

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
def report(
    model: str = typer.Argument(..., help="Model directory (config.json alone is enough), hub id, .gguf, or built-in name."),
    min_channels_per_group: Optional[int] = typer.Option(None, "--min-channels-per-group", "-m", help="With any surgery option, report dense vs shrunk."),
    targets: Optional[List[str]] = _T,
    exclude: Optional[List[str]] = _X,
    override: Optional[List[str]] = _O,
    variant: Optional[str] = _V,
    rank: Optional[str] = _R,
    as_json: bool = typer.Option(False, "--json", help="JSON instead of tables."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Also write the report as Markdown to this file."),
    max_rows: int = typer.Option(60, "--max-rows", help="Module rows shown in the terminal table."),
    target_params: Optional[str] = typer.Option(None, "--target-params", help="Plan for a non-embedding parameter target: a fraction (0.25) or a count (53M)."),
    num_layers: Optional[int] = typer.Option(None, "--num-layers", help="Plan with depth truncation to this many decoder layers."),
    keep_layers: Optional[str] = typer.Option(None, "--keep-layers", help="Plan with these decoder layers kept, e.g. 0,1."),
):
    """Parameter budget of a model (built on the meta device: no weights are read).

    With surgery options (-m, -t, --variant, ...) it shows what `gpconv shrink` would do.
    """
    import gpconv
    from gpconv.surgery import describe

    m, _ = gpconv.load_model(model, meta=True)
    if any(v is not None for v in (min_channels_per_group, targets, exclude, override, variant, rank, target_params,
                                   num_layers, keep_layers)):
        cfg = _config(targets, exclude, min_channels_per_group, override, variant, None, rank,
                      target_params=target_params, num_layers=num_layers, keep_layers=_layer_list(keep_layers))
        rep = gpconv.shrink(m, cfg, dry_run=True, model_name=model)
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
    from gpconv.io import densify_dir

    densify_dir(model_dir, out, overwrite=overwrite, dtype=dtype)
    typer.echo(f"saved dense model to {out}")
