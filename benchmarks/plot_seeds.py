"""Several seeds of two methods' recovery, side by side: per-seed and mean curves, and a paired test.

Reads a JSON of ``compare.py`` results keyed ``"<method>@<fraction> seed<N>"`` (as in
``benchmarks/results/recovery/long_25.json``), draws perplexity against recovery tokens (thin: each seed,
thick: the mean over seeds) for Alpaca and WikiText, and prints, at the last evaluation, each
seed's difference from the baseline method (``--baseline``, default svd) with the paired t statistic over seeds.

    python benchmarks/plot_seeds.py benchmarks/results/recovery/long_25.json --out benchmarks/results/recovery/long_25.png
    python benchmarks/plot_seeds.py benchmarks/results/recovery/long_25.json --from-runs runs/long-25-svd-seed1 ...  # add runs first

``--from-runs DIR ...`` first adds the results of compare.py output directories (their
``results.json``) under ``"<key> seed<N>"``, N read from the run's ``--seed`` (0 if absent).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

SETS = ("alpaca", "wikitext")


def add_runs(results: dict, run_dirs: list[str]) -> None:
    meta = results.setdefault("_meta", {})
    for d in run_dirs:
        part = json.loads((Path(d) / "results.json").read_text())
        m = re.search(r"--seed (\d+)", part["_meta"]["command"])
        seed = int(m.group(1)) if m else 0
        for key, row in part.items():
            if key.startswith("_"):
                continue
            results[f"{key} seed{seed}"] = row
            meta.setdefault(f"seed{seed}", {}).setdefault("commands", [])
            if part["_meta"]["command"] not in meta[f"seed{seed}"]["commands"]:
                meta[f"seed{seed}"]["commands"].append(part["_meta"]["command"])


def by_method(results: dict) -> dict[str, dict[int, dict]]:
    """``{method@fraction: {seed: row}}``."""
    out: dict[str, dict[int, dict]] = {}
    for key, row in results.items():
        if key.startswith("_"):
            continue
        name, seed = key.rsplit(" seed", 1)
        out.setdefault(name, {})[int(seed)] = row
    return out


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of b - a and the paired t statistic (nan below two pairs or with no spread)."""
    d = [y - x for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    return mean, (mean / (sd / math.sqrt(n)) if sd > 0 else float("nan"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json")
    ap.add_argument("--from-runs", nargs="+", default=None, metavar="DIR")
    ap.add_argument("--baseline", default="svd", help="method the other is compared against (name before '@')")
    ap.add_argument("--out", default=None, help="PNG to write (default: next to the JSON)")
    args = ap.parse_args()
    path = Path(args.json)
    results = json.loads(path.read_text()) if path.is_file() else {}
    if args.from_runs:
        add_runs(results, args.from_runs)
        path.write_text(json.dumps(results, indent=1))
    methods = by_method(results)
    names = sorted(methods, key=lambda n: (n.split("@")[0] != args.baseline, n))  # the baseline first
    seeds = sorted(set.intersection(*(set(s) for s in methods.values())))
    print(f"methods {names}, seeds in common {seeds}")

    for name in names:
        finals = [methods[name][s]["after_recovery"] for s in seeds]
        means = {k: sum(f[k] for f in finals) / len(finals) for k in SETS}
        print(f"{name}: last eval at {finals[0]['tokens']:,} tokens; per seed "
              + ", ".join(f"{f['alpaca']:.2f} / {f['wikitext']:,.0f}" for f in finals)
              + f"; mean {means['alpaca']:.2f} / {means['wikitext']:,.0f}")
    if len(names) == 2:
        a, b = names
        for k in SETS:
            xa = [methods[a][s]["after_recovery"][k] for s in seeds]
            xb = [methods[b][s]["after_recovery"][k] for s in seeds]
            mean, t = paired(xa, xb)
            diffs = ", ".join(f"{y - x:+.2f}" for x, y in zip(xa, xb))
            print(f"{k}: {b} - {a} per seed {diffs}; mean {mean:+.2f} ({100 * mean / (sum(xa) / len(xa)):+.1f}%), "
                  f"paired t = {t:.2f} with {len(seeds) - 1} degrees of freedom")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, k in zip(axes, SETS):
        for i, name in enumerate(names):
            color = f"C{i}"
            curves = [methods[name][s]["curve"] for s in seeds]
            for c in curves:
                ax.plot([p["tokens"] for p in c], [p[k] for p in c], color=color, alpha=0.3, lw=0.8)
            tokens = [p["tokens"] for p in curves[0]]
            mean = [sum(c[j][k] for c in curves) / len(curves) for j in range(len(tokens))]
            ax.plot(tokens, mean, color=color, lw=2.2, label=f"{name} (mean of {len(seeds)} seeds)")
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1000:.0f}k"))
        ax.set_xlabel("recovery tokens")
        ax.set_ylabel(f"{k} perplexity")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = Path(args.out) if args.out else path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
