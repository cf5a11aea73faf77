"""Surgery only, no recovery: how each init / calibration mode leaves a pretrained model.

    python benchmarks/init_ablation.py --fraction 0.5 io-project io-fit:par io-fit:seq io-fit:seq+ svd:seq+

Each spec is ``METHOD[:MODE]``: METHOD in io-random, io-project, io-fit, io-fit-perm, svd, hybrid,
hybrid-budget, svd-budget; MODE ``par`` (statistics from the dense model), ``seq`` (layer by layer on the shrunk
prefix) or ``seq+`` (sequential, matching the dense model's outputs: the default of
``Calibration(sequential=True)``). ``--ridge`` sets GPConvConfig.ridge. Same teacher, data split
and held-out sets as ``benchmarks/compare.py``; prints one line per spec and appends JSON lines
to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

import gpconv
from gpconv import GPConvConfig, shrink
from gpconv.surgery import Calibration

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import io_uniform, load_data, perplexities  # noqa: E402


def config_for(method: str, fraction: float, cfg, ridge: float) -> GPConvConfig:
    h, i = cfg.hidden_size, cfg.intermediate_size
    if method == "io-random":
        return io_uniform(fraction, h, i, init="random")
    if method == "io-project":
        return io_uniform(fraction, h, i, init="project")
    if method == "io-fit":
        return io_uniform(fraction, h, i, init="fit", ridge=ridge)
    if method == "io-fit-perm":
        return io_uniform(fraction, h, i, init="fit", ridge=ridge, permute=True)
    if method == "svd":
        return GPConvConfig(variant="lowrank", rank=fraction, init="fit", ridge=ridge)
    if method == "hybrid":
        return io_uniform(fraction, h, i, variant="hybrid", init="fit", ridge=ridge)
    if method == "hybrid-budget":
        return GPConvConfig(variant="hybrid", init="fit", target_params=fraction, min_channels_per_group=16, ridge=ridge)
    if method == "svd-budget":
        return GPConvConfig(variant="lowrank", init="fit", target_params=fraction, min_channels_per_group=16, ridge=ridge)
    raise SystemExit(f"unknown method {method!r}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("specs", nargs="+")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--ridge", type=float, default=0.1)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--eval-blocks", type=int, default=16)
    ap.add_argument("--calib-blocks", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="append one JSON line per spec here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher, tok = gpconv.load_model(args.model)
    data = load_data(tok, args.block_size, args.eval_blocks, args.calib_blocks)
    print(f"teacher ppl {perplexities(teacher, data['sets'])}", flush=True)
    for spec in args.specs:
        method, _, mode = spec.partition(":")
        calib = None
        if mode:
            calib = Calibration(data["calib_batches"], sequential=mode.startswith("seq"), correct=mode == "seq+")
        elif method not in ("io-random", "io-project"):
            calib = Calibration(data["calib_batches"], sequential=True)
        student = copy.deepcopy(teacher)
        t0 = time.time()
        report = shrink(student, config_for(method, args.fraction, teacher.config, args.ridge), calibration=calib)
        ppl = perplexities(student, data["sets"])
        errs = [m.error for m in report.replaced if m.error is not None]
        row = {"spec": spec, "fraction": args.fraction, "ridge": args.ridge, "kept": report.kept_fraction,
               "perplexity": ppl, "mean_layer_error": sum(errs) / len(errs) if errs else None,
               "blocks": dict(Counter(m.variant for m in report.modules)), "seconds": time.time() - t0,
               "command": "python " + " ".join(sys.argv)}
        print(f"{spec:16s} kept={row['kept']:.3f} alpaca={ppl['alpaca']:.4g} wikitext={ppl['wikitext']:.4g} "
              f"err={row['mean_layer_error'] or float('nan'):.3f} {row['blocks']} {row['seconds']:.0f}s", flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
        del student


if __name__ == "__main__":
    main()
