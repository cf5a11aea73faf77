"""How should one layer's parameter budget be split between a grouped and a low-rank part?

    OMP_NUM_THREADS=1 python benchmarks/hybrid_split.py --fractions 0.5 0.25 --json out.json

For a few layers of a pretrained model (SmolLM2-135M-Instruct from the offline GGUF by default)
and a budget of ``fraction`` x the layer's dense parameters, it fits every way of spending that
budget that gpconv offers: all low-rank (whitened SVD), all grouped (one io block), and grouped
+ low-rank hybrids (an io block with g groups, the rest of the budget as rank), each with the
``fit`` init on the same calibration statistics (hybrids fitted by alternating the two parts),
optionally with the channel permutation too. It prints each option's relative output error
``sqrt(E||(W - A) x||^2 / E||W x||^2)`` on held-out calibration tokens.

This is the measurement behind the hybrid's per-layer split (``gpconv.surgery.best_split``) and
docs/quality.md. Data: Alpaca rows from ``../shared/data`` (read by the script, not the tests).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import gpconv
from gpconv.layers import BlockSpec
from gpconv.surgery import Calibration, collect_stats, split_specs
from gpconv.data import Rows, build_datasets, load_rows
from gpconv.fitting import fit_layer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
LAYERS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")


def options(n_in: int, n_out: int, budget: int, min_channels_per_group: int) -> dict[str, BlockSpec]:
    """Every block of at most ``budget`` weights that the split weighs, by a short label."""
    def label(spec: BlockSpec) -> str:
        if spec.variant == "lowrank":
            return "lowrank"
        return f"g{spec.groups}+r{spec.rank}" if spec.rank else f"io g{spec.groups}"

    return {label(s): s for s in split_specs(n_in, n_out, budget, min_channels_per_group)}


def layer_arguments(description: str) -> argparse.ArgumentParser:
    """The options this script shares with benchmarks/permutation_source.py."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data", default=str(SHARED / "alpaca_5000_subset.json"))
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 15, 27], help="decoder layer indices")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--calib-blocks", type=int, default=48, help="blocks of --block-size tokens; a quarter held out")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--min-channels-per-group", type=int, default=8, help="smallest group allowed")
    ap.add_argument("--ridge", type=float, default=0.1)
    ap.add_argument("--json", default=None)
    return ap


def calibrated_layers(args):
    """``(model, names, stats)``: the model, the measured layers' names and their calibration
    statistics from Alpaca rows 0-999 (chat template, ``--calib-blocks`` blocks, a quarter held out)."""
    model, tok = gpconv.load_model(args.model)
    rows = load_rows(args.data)
    calib, _ = build_datasets(Rows(rows.rows[:1000], rows.schema, rows.name), tok, format="chat-template",
                              block_size=args.block_size, val_size=0)
    ids = calib.input_ids[: args.calib_blocks]
    names = [f"model.layers.{i}.{n}" for i in args.layers for n in LAYERS]
    return model, names, collect_stats(model, Calibration([ids[i:i + 4] for i in range(0, len(ids), 4)]), names)


def finish(args, t0: float, results: list) -> None:
    """Print the wall time and write ``{"meta", "results"}`` to ``--json``."""
    meta = {"command": "python " + " ".join(sys.argv), "model": args.model, "machine": platform.machine(),
            "torch": torch.__version__, "wall_s": time.time() - t0}
    print(f"{meta['wall_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1))


def main() -> None:
    ap = layer_arguments(__doc__)
    ap.add_argument("--permute", action="store_true", help="also try the channel permutation for grouped options")
    args = ap.parse_args()
    torch.set_num_threads(1)

    t0 = time.time()
    model, names, stats = calibrated_layers(args)

    results = []
    for name in names:
        w = model.get_submodule(name).weight.detach()
        n_out, n_in = w.shape
        for fraction in args.fractions:
            errs = {}
            for label, spec in options(n_in, n_out, int(fraction * n_in * n_out), args.min_channels_per_group).items():
                errs[label] = fit_layer(spec, w, None, "fit", stats[name], args.ridge, permute=args.permute)[1]
            best = min(errs, key=errs.get)
            results.append({"layer": name, "fraction": fraction, "best": best, "errors": errs})
            shown = "  ".join(f"{k} {v:.4f}" for k, v in errs.items())
            print(f"{name} @ {fraction}: best {best} | {shown}", flush=True)
    finish(args, t0, results)


if __name__ == "__main__":
    main()
