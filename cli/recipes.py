"""Recipe command: gpconv run RECIPE [--set key=value ...]. A thin shell over gpconv.recipes."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .app import app, user_errors


@app.command(
    name="run",
    epilog="""**Examples**

    gpconv run --list

    gpconv run JP47D55C --dry-run                         (resolved recipe + parameter budget: 35,011,584)

    gpconv run JP47D55C --set train.max_steps=2000 --set data.block_size=2048

    gpconv run smollm2-offline --set data.source=alpaca.json --out runs/smol

    gpconv run ./my-recipe.yaml --set surgery=null        (the same pipeline, dense)

    gpconv run tiny-demo --set data.source=notes.txt --set data.format=plain --set surgery.min_channels_per_group=16
""",
)
@user_errors
def run(
    recipe: Optional[str] = typer.Argument(None, help="A recipe file (.yaml) or the name of a bundled recipe (gpconv run --list)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", "-s", help="Override a recipe key: KEY=VALUE with a dotted key (train.lr=3e-4, surgery=null, data.filter.category=[open_qa]). Repeatable; values are read as YAML."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (same as --set output.dir=DIR)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output directory (output.overwrite=true)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in the output directory (output.resume=true)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved recipe and its parameter budget (meta device); load no weights (a .gguf is read for its config), read no data, write nothing."),
    list_: bool = typer.Option(False, "--list", help="List the bundled recipes and exit."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
):
    """Run a recipe: model or config -> surgery -> data -> training/distillation -> evaluation -> outputs."""
    from gpconv import recipes
    from gpconv.errors import GPConvError

    if list_:
        for name, path in recipes.list_recipes().items():
            desc = recipes.read_yaml(path).get("description", "")
            typer.echo(f"{name:18s} {desc}")
        return
    if recipe is None:
        raise GPConvError("name a recipe (a .yaml file or a bundled name; gpconv run --list shows them)")
    overrides = recipes.parse_overrides(set_)
    if out is not None:
        overrides["output.dir"] = str(out)
    if overwrite:
        overrides["output.overwrite"] = True
    if resume:
        overrides["output.resume"] = True
    r = recipes.load_recipe(recipe, overrides)
    if dry_run:
        typer.echo(recipes.dump(r).rstrip())
        todo = recipes.missing_keys(r)
        if todo:
            typer.echo(f"# still to set before a run: {', '.join(todo)}")
        # the budget goes to stderr, so `gpconv run NAME --dry-run > mine.yaml` is a runnable recipe
        import sys

        from rich.console import Console

        recipes.plan(r).print(console=Console(stderr=True, width=None if sys.stderr.isatty() else 160))
        return
    res = recipes.run_recipe(r, progress=not no_progress, say=typer.echo)
    typer.echo(f"done in {res.wall_s:.0f} s")
