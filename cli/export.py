"""Deployment command: gpconv export (ONNX, the grouped blocks kept). A thin shell over gpconv.deploy."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import app, user_errors


@app.command(
    epilog="""**Examples**

    gpconv export ./tiny-kphi3 --format onnx --out tiny-kphi3-onnx

    gpconv generate tiny-kphi3-onnx "Hello"            (ONNX Runtime, KV cache)

    gpconv export smollm2-135m-instruct --out smol-dense-onnx   (any model spec: a dense baseline too)
"""
)
@user_errors
def export(
    model: str = typer.Argument(..., help="A gpconv checkpoint directory, or any model spec (directory, .gguf, built-in name, hub id)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory: model.onnx (+ model.onnx.data when large), tokenizer, configs."),
    format: str = typer.Option("onnx", "--format", help="onnx (the only one so far)."),
    dtype: str = typer.Option("float32", "--dtype", help="Weights of the export: float32 (ONNX Runtime's CPU kernels) | float16 | bfloat16."),
    max_len: int = typer.Option(None, "--max-len", help="Longest past + sequence the graph accepts. [default: the model's max_position_embeddings]"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output directory."),
    optimize: bool = typer.Option(True, "--optimize/--no-optimize", help="Simplify the graph with the ONNX optimizer before writing it: faster in ONNX Runtime (SmolLM2 -m 64 decode 1.51x its dense export instead of 1.24x), a slower export (~6 instead of ~2 minutes there)."),
):
    """Export a shrunk model for a deployment runtime, its grouped blocks kept grouped (not densified)."""
    import gpconv

    path = gpconv.export(model, out, format=format, dtype=dtype, overwrite=overwrite, max_len=max_len,
                         optimize=optimize, say=typer.echo)
    size = sum(f.stat().st_size for f in Path(path).glob("model.onnx*"))
    typer.echo(f"saved {format} export to {path} ({size / 2**20:,.1f} MiB); run it: gpconv generate {path} \"...\"")
