"""The kphi-3 report's three from-scratch models, scaled down to run on a CPU, side by side.

    OMP_NUM_THREADS=1 python benchmarks/mini_reproduction.py --data ../shared/data/alpaca_5000_subset.json \\
        --out docs/reproduction --runs runs/mini-repro

It runs the bundled recipes JP47D54C (dense), JP47D55C (grouped, 2 layers) and JP47D56C (grouped,
3 layers) through ``gpconv.recipes.run_recipe`` with every width divided by ``--scale``: hidden
3072, attention heads 32, intermediate 8192/9216, context 4096, sliding window 2048 and
min_channels_per_group 256 (so every layer keeps the report's group count and the grouped
models keep the same share of the dense model's parameters). Everything else is the recipes':
packed kphi3-format samples, a constant learning rate without warm-up, one seed, so all three
models see exactly the same blocks in the same order.

What differs from the report, and why:
* data: a local instruction file (LaMini is not available offline; Alpaca rows are LaMini's
  nearest kind) with ``--val-rows`` held out;
* tokenizer: gpconv's byte-level tokenizer (262 tokens). With a 32k-49k vocabulary the
  embedding and the output layer of a 384-wide model would dwarf its decoder layers in both
  parameters and CPU time, and the comparison is about the decoder layers. Losses are therefore
  nats per byte, not comparable in absolute value with the report's 1.58 / 1.60 / 1.57;
* learning rate ``--lr`` (1e-3 by default rather than 1e-4: the report trains for billions of
  tokens, we for about a million; the same rate for all three models), fp32 on CPU.

Writes ``results.json``, ``results.md`` and ``loss_curves.png`` into ``--out``; the run
directories (models, metrics.jsonl) go to ``--runs``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

PAPER = {  # recipe -> (layers, report's validation loss)
    "JP47D54C": (2, 1.58),
    "JP47D55C": (2, 1.60),
    "JP47D56C": (3, 1.57),
}
FULL = {"hidden": 3072, "heads": 32, "context": 4096, "window": 2048, "mcpg": 256}


def scaled_overrides(scale: int, recipe: dict) -> dict:
    """``--set``-style overrides that shrink one of the paper recipes by ``scale`` in width."""
    inter = recipe["model"]["config"]["intermediate_size"]
    for name, v in [("hidden", FULL["hidden"]), ("intermediate", inter), ("heads", FULL["heads"]), ("context", FULL["context"]),
                    ("min_channels_per_group", FULL["mcpg"])]:
        if v % scale:
            raise SystemExit(f"--scale {scale} does not divide {name} {v}")
    ctx = FULL["context"] // scale
    o = {
        "model.config.hidden_size": FULL["hidden"] // scale,
        "model.config.intermediate_size": inter // scale,
        "model.config.num_attention_heads": FULL["heads"] // scale,  # head size stays 96
        "model.config.num_key_value_heads": FULL["heads"] // scale,
        "model.config.max_position_embeddings": ctx,
        "model.config.original_max_position_embeddings": ctx,
        "model.config.sliding_window": FULL["window"] // scale - 1,
        # the byte tokenizer: 262 tokens (vocab rounded up to 320), its end-of-text and pad ids
        "model.config.vocab_size": 320,
        "model.config.bos_token_id": None,
        "model.config.eos_token_id": 256,
        "model.config.pad_token_id": 261,
        "model.tokenizer": "byte",
        "data.block_size": ctx,
    }
    if recipe["surgery"] is not None:
        o["surgery.min_channels_per_group"] = FULL["mcpg"] // scale
    return o


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="Local instruction file (Alpaca / LaMini / Dolly columns).")
    ap.add_argument("--out", default="docs/reproduction", help="Where results.json/.md and loss_curves.png go.")
    ap.add_argument("--runs", default="runs/mini-repro", help="Run directories (models, metrics).")
    ap.add_argument("--scale", type=int, default=8, help="Divide hidden, heads, intermediate, context and min_channels_per_group by this.")
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--val-rows", type=int, default=250)
    ap.add_argument("--eval-every", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 shares a busy 2-core machine best).")
    ap.add_argument("--recipes", nargs="+", default=list(PAPER))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    from gpconv import recipes

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    t_all = time.perf_counter()
    load_start = os.getloadavg()[0]
    for name in args.recipes:
        base = recipes.load_recipe(name)
        overrides = {
            **scaled_overrides(args.scale, base),
            "seed": args.seed,
            "data.source": args.data,
            "data.val_size": args.val_rows,
            "train.max_steps": args.steps,
            "train.batch_size": args.batch_size,
            "train.lr": args.lr,
            "train.precision": "fp32",
            "train.eval_every": args.eval_every,
            "train.save_every": 0,
            "train.log_every": 4,
            "train.progress": False,
            "eval.prompts": [],
            "output.dir": str(Path(args.runs) / name),
            "output.overwrite": True,
        }
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        res = recipes.run_recipe(name, overrides)
        wall = time.perf_counter() - t0
        metrics = [json.loads(x) for x in (res.out_dir / "metrics.jsonl").read_text().splitlines()]
        r = res.recipe
        rows.append({
            "recipe": name,
            "layers": r["model"]["config"]["num_hidden_layers"],
            "hidden": r["model"]["config"]["hidden_size"],
            "intermediate": r["model"]["config"]["intermediate_size"],
            "grouped": r["surgery"] is not None,
            "non_embedding": res.summary["params"]["after"]["non_embedding"],
            "embedding": res.summary["params"]["after"]["embedding"],
            "val_loss": res.metrics["model"]["loss"],
            "val_perplexity": res.metrics["model"]["perplexity"],
            "val_accuracy": res.metrics["model"]["accuracy"],
            "val_tokens": res.metrics["model"]["tokens"],
            "train_tokens": res.train.tokens,
            "train_s": res.train.train_s,
            "wall_s": wall,
            "paper_val_loss": PAPER.get(name, (None, None))[1],
            "curve": [{k: m.get(k) for k in ("step", "split", "loss", "tokens")} for m in metrics],
        })
        print(f"   non-embedding {rows[-1]['non_embedding']:,}, validation loss {rows[-1]['val_loss']:.4f}, {wall:.0f} s", flush=True)

    dense = next((x for x in rows if not x["grouped"]), None)
    for x in rows:
        x["params_vs_dense"] = x["non_embedding"] / dense["non_embedding"] if dense else None
        x["loss_vs_dense"] = x["val_loss"] / dense["val_loss"] - 1 if dense else None
    setup = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "scale": args.scale, "context": FULL["context"] // args.scale, "steps": args.steps, "batch_size": args.batch_size,
        "tokens_per_model": rows[0]["train_tokens"] if rows else 0, "lr": args.lr, "schedule": "constant, no warm-up",
        "data": args.data, "val_rows": args.val_rows, "tokenizer": "gpconv byte-level (262 tokens)",
        "threads": args.threads, "torch": torch.__version__, "cpu_count": os.cpu_count(),
        "loadavg_start": load_start, "loadavg_end": os.getloadavg()[0], "wall_s": time.perf_counter() - t_all,
    }
    (out / "results.json").write_text(json.dumps({"setup": setup, "runs": rows}, indent=1) + "\n")
    (out / "results.md").write_text(table(rows, setup))
    plot(rows, out / "loss_curves.png", setup)
    print(table(rows, setup))
    return 0


def table(rows: list[dict], setup: dict) -> str:
    lines = [
        f"Scale 1/{setup['scale']}, context {setup['context']}, {setup['tokens_per_model']:,} training tokens per model, "
        f"lr {setup['lr']:g} constant; {setup['wall_s'] / 60:.1f} min wall, load {setup['loadavg_start']:.2f} -> {setup['loadavg_end']:.2f}",
        "",
        "| recipe | layers | intermediate | non-embedding params | vs dense | val loss (nats/byte) | vs dense | val accuracy | report: params | report: val loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    report_params = {"JP47D54C": "226,507,776", "JP47D55C": "35,011,584", "JP47D56C": "52,515,840"}
    for x in rows:
        vs_p = f"{x['params_vs_dense']:.1%}" if x["params_vs_dense"] is not None else ""
        vs_l = f"{x['loss_vs_dense']:+.1%}" if x["loss_vs_dense"] is not None and x["grouped"] else ""
        lines.append(
            f"| {x['recipe']} | {x['layers']} | {x['intermediate']} | {x['non_embedding']:,} | {vs_p} | {x['val_loss']:.4f} | {vs_l} "
            f"| {x['val_accuracy']:.3f} | {report_params.get(x['recipe'], '')} | {x['paper_val_loss'] or ''} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, setup: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, x in enumerate(rows):
        color = f"C{i}"
        label = f"{x['recipe']} ({'grouped' if x['grouped'] else 'dense'}, {x['layers']} layers, {x['non_embedding'] / 1e6:.2f}M)"
        tr = [(m["tokens"], m["loss"]) for m in x["curve"] if m["split"] == "train"]
        va = [(m["tokens"], m["loss"]) for m in x["curve"] if m["split"] == "val"]
        if tr:
            ax.plot(*zip(*tr), color=color, alpha=0.35, lw=1)
        if va:
            ax.plot(*zip(*va), color=color, marker="o", lw=2, label=label)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats per byte)")
    ax.set_ylim(top=min(3.5, ax.get_ylim()[1]))
    ax.set_title(f"kphi-3 recipes at 1/{setup['scale']} width: validation (dots) and train loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
