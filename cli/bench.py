"""Speed command: gpconv bench (dense vs shrunk, end to end)."""

from __future__ import annotations

from typing import Optional

import typer

from .app import app, user_errors


@app.command(
    epilog="""**Examples**

    gpconv bench ./tiny-kphi3                       (baseline: the exact dense equivalent)

    gpconv bench ./smol-grouped --baseline smollm2-135m-instruct --json

    gpconv bench ./kphi3-mini --device cuda --dtype bfloat16 --prompt-len 512 --new-tokens 64
"""
)
@user_errors
def bench(
    model_dir: str = typer.Argument(..., help="A shrunk (gpconv) checkpoint directory."),
    baseline: Optional[str] = typer.Option(None, "--baseline", "-b", help="Dense model to compare with (directory, hub id, .gguf or built-in name). Default: densify a copy of MODEL_DIR."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda"),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16 (both models)."),
    batch: int = typer.Option(1, "--batch", help="Sequences per forward pass."),
    prompt_len: int = typer.Option(128, "--prompt-len", help="Prompt tokens (prefill)."),
    new_tokens: int = typer.Option(32, "--new-tokens", help="Decode steps with the KV cache."),
    repeats: int = typer.Option(3, "--repeats", help="Interleaved repetitions per model (medians)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch.set_num_threads (default: torch's)."),
    memory: bool = typer.Option(True, "--memory/--no-memory", help="CPU: measure peak RSS in a child process per model."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """Prefill and decode tokens/s and peak memory: shrunk model vs its dense baseline, one run."""
    from gpconv.bench import bench as run_bench

    res = run_bench(
        model_dir, baseline, device=device, dtype=dtype, batch=batch, prompt_len=prompt_len,
        new_tokens=new_tokens, repeats=repeats, memory=memory, threads=threads,
    )
    typer.echo(res.to_json() if as_json else res.table())
