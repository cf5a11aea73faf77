"""Layer sweep: dense and grouped models with 1, 2, ... N decoder layers, trained from scratch on
WikiText-2; validation perplexity and next-token accuracy per depth (the New-LLM experiment
format), a table and a plot.

    OMP_NUM_THREADS=1 python benchmarks/layer_sweep.py --data ../shared/data/wikitext2_valid_pytorch_examples.txt \\
        --out docs/layer_sweep --runs runs/layer-sweep

Each depth trains two models through ``gpconv.recipes.run_recipe``: the JP47D54C recipe (dense
Phi-3 shape, intermediate 8192) and the JP47D55C recipe (io blocks, intermediate 9216,
min_channels_per_group 256), both with ``num_hidden_layers`` set to the depth and every width
divided by ``--scale`` as in ``benchmarks/mini_reproduction.py`` (byte-level tokenizer). Every
model sees the same blocks in the same order, for the same number of tokens.

``--data`` is ``wikitext2`` (the hub dataset ``Salesforce/wikitext``, wikitext-2-raw-v1, its
train split, when the hub is reachable) or a local text file; a text file's paragraphs are its
rows, and ``--val-size`` of them are held out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mini_reproduction import scaled_overrides  # noqa: E402  (the same scaled-down recipes)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="wikitext2", help="wikitext2 (hub) or a local .txt file.")
    ap.add_argument("--out", default="docs/layer_sweep")
    ap.add_argument("--runs", default="runs/layer-sweep")
    ap.add_argument("--layers", type=int, nargs="+", default=list(range(1, 8)))
    ap.add_argument("--scale", type=int, default=16)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--val-size", type=float, default=0.05, help="Held-out rows (paragraphs): a fraction or a count.")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    from gpconv import recipes

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    val_size = int(args.val_size) if args.val_size >= 1 else args.val_size
    rows = []
    t_all = time.perf_counter()
    load_start = os.getloadavg()[0]
    for depth in args.layers:
        for name, kind in (("JP47D54C", "dense"), ("JP47D55C", "grouped")):
            base = recipes.load_recipe(name)
            overrides = {
                **scaled_overrides(args.scale, base),
                "model.config.num_hidden_layers": depth,
                "seed": args.seed,
                "data.source": args.data,
                "data.format": "plain",
                "data.val_size": val_size,
                "train.max_steps": args.steps,
                "train.batch_size": args.batch_size,
                "train.lr": args.lr,
                "train.precision": "fp32",
                "train.eval_every": 0,
                "train.save_every": 0,
                "train.log_every": 10,
                "train.progress": False,
                "eval.prompts": [],
                "output.dir": str(Path(args.runs) / f"{kind}-{depth}"),
                "output.overwrite": True,
            }
            t0 = time.perf_counter()
            res = recipes.run_recipe(name, overrides, say=lambda s: None)
            m = res.metrics["model"]
            rows.append({
                "layers": depth, "kind": kind, "recipe": name,
                "non_embedding": res.summary["params"]["after"]["non_embedding"],
                "val_loss": m["loss"], "val_perplexity": m["perplexity"], "val_accuracy": m["accuracy"], "val_tokens": m["tokens"],
                "train_tokens": res.train.tokens, "train_s": res.train.train_s, "wall_s": time.perf_counter() - t0,
            })
            x = rows[-1]
            print(f"{kind:7s} {depth} layers: {x['non_embedding']:>10,} params, ppl {x['val_perplexity']:.3f}, "
                  f"acc {x['val_accuracy']:.3f}, {x['wall_s']:.0f} s", flush=True)

    setup = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "data": args.data, "scale": args.scale, "context": 4096 // args.scale, "steps": args.steps,
        "batch_size": args.batch_size, "tokens_per_model": rows[0]["train_tokens"] if rows else 0, "lr": args.lr,
        "val_size": args.val_size, "tokenizer": "gpconv byte-level (262 tokens)", "threads": args.threads,
        "torch": torch.__version__, "cpu_count": os.cpu_count(), "loadavg_start": load_start,
        "loadavg_end": os.getloadavg()[0], "wall_s": time.perf_counter() - t_all,
    }
    (out / "results.json").write_text(json.dumps({"setup": setup, "runs": rows}, indent=1) + "\n")
    text = table(rows, setup)
    (out / "results.md").write_text(text)
    plot(rows, out / "layer_sweep.png", setup)
    print(text)
    return 0


def table(rows: list[dict], setup: dict) -> str:
    by = {(r["layers"], r["kind"]): r for r in rows}
    lines = [
        f"{setup['data']}, scale 1/{setup['scale']}, context {setup['context']}, {setup['tokens_per_model']:,} training tokens "
        f"per model, lr {setup['lr']:g} constant; {setup['wall_s'] / 60:.1f} min wall, load {setup['loadavg_start']:.2f} -> "
        f"{setup['loadavg_end']:.2f}",
        "",
        "| layers | dense params | dense ppl | dense acc | grouped params | grouped ppl | grouped acc | grouped/dense params |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in sorted({r["layers"] for r in rows}):
        d, g = by.get((n, "dense")), by.get((n, "grouped"))
        cell = lambda r, k, f: format(r[k], f) if r else ""  # noqa: E731
        ratio = f"{g['non_embedding'] / d['non_embedding']:.1%}" if d and g else ""
        lines.append(f"| {n} | {cell(d, 'non_embedding', ',')} | {cell(d, 'val_perplexity', '.3f')} | {cell(d, 'val_accuracy', '.3f')} "
                     f"| {cell(g, 'non_embedding', ',')} | {cell(g, 'val_perplexity', '.3f')} | {cell(g, 'val_accuracy', '.3f')} | {ratio} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, setup: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.8))
    for kind, color in (("dense", "C0"), ("grouped", "C1")):
        rs = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["layers"])
        if not rs:
            continue
        a.plot([r["layers"] for r in rs], [r["val_perplexity"] for r in rs], "o-", color=color, label=kind)
        b.plot([r["layers"] for r in rs], [r["val_accuracy"] for r in rs], "o-", color=color, label=kind)
    a.set_xlabel("decoder layers")
    a.set_ylabel("validation perplexity (per byte)")
    b.set_xlabel("decoder layers")
    b.set_ylabel("next-token accuracy")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Layer sweep, {Path(str(setup['data'])).name}, 1/{setup['scale']} width, "
                 f"{setup['tokens_per_model']:,} tokens per model", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
