"""Speed command: gpconv bench (dense vs shrunk, end to end); its options are gpconv.bench.bench's."""

from __future__ import annotations

from typing import Optional

import typer

from gpconv.bench import bench as run_bench

from .app import app, user_errors
from .options import options, signature_group

BENCH = signature_group(run_bench)


@app.command(
    epilog="""**Examples**

    gpconv bench ./tiny-kphi3                       (baseline: the exact dense equivalent)

    gpconv bench ./smol-grouped --baseline smollm2-135m-instruct --json

    gpconv bench ./kphi3-mini --device cuda --dtype bfloat16 --prompt-len 512 --new-tokens 64
"""
)
@user_errors
@options(BENCH)
def bench(
    model_dir: str = typer.Argument(..., help="A shrunk (gpconv) checkpoint directory."),
    baseline: Optional[str] = typer.Option(None, "--baseline", "-b", help="Dense model to compare with (directory, hub id, .gguf or built-in name). Default: densify a copy of MODEL_DIR."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    **opts,
):
    """Prefill and decode tokens/s and peak memory: shrunk model vs its dense baseline, one run."""
    res = run_bench(model_dir, baseline, **BENCH.values(opts))
    typer.echo(res.to_json() if as_json else res.table())
