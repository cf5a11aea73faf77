"""Which energy should place a hybrid block's input channels: the weight's, or the residual's?

    OMP_NUM_THREADS=1 python benchmarks/permutation_source.py --json docs/quality/permutation_source.json

A hybrid block is ``G1(x) + G2(interleave(x)) + B(A(x))``: the low-rank term takes the head of
the weight's spectrum and the grouped part is fitted to what it leaves. The channel permutation
(``gpconv.fitting.choose_permutation``) packs the input channels that matter most to an output
group into that group's support. This script fits every hybrid option that the split weighs
(``gpconv.surgery.split_specs``: an io block with g groups plus the rest of the budget as rank)
for a few layers of a pretrained model, with ``init=fit`` on the same calibration statistics,
under three input orders:

* ``identity``: no permutation;
* ``weight``: channels placed by the energy of the dense weight (gpconv before 2026-11-30);
* ``residual``: placed by the energy of what the rank-r whitened SVD leaves (what gpconv does);

and prints each one's relative output error ``sqrt(E||(W - A) x||^2 / E||W x||^2)`` on held-out
calibration tokens, next to whitened low-rank of the same size. Data: Alpaca rows from
``../shared/data`` (read by the script, not the tests).
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from gpconv.surgery import split_specs
from gpconv.fitting import choose_permutation, init_block_, relative_error

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hybrid_split import calibrated_layers, finish, layer_arguments  # noqa: E402  (same layers, data, options)


def main() -> None:
    args = layer_arguments(__doc__).parse_args()
    torch.set_num_threads(1)

    t0 = time.time()
    model, names, stats = calibrated_layers(args)

    results = []
    for name in names:
        w = model.get_submodule(name).weight.detach()
        st = stats[name]
        n_out, n_in = w.shape
        for fraction in args.fractions:
            row = {"layer": name, "fraction": fraction, "options": {}}
            for spec in split_specs(n_in, n_out, int(fraction * n_in * n_out), args.min_channels_per_group):
                if spec.variant == "lowrank":
                    m = spec.build()
                    init_block_(m, w, None, "fit", st.fit, args.ridge)
                    row["lowrank"] = relative_error(w, m.to_dense(), st.held_out)
                    continue
                if spec.variant != "hybrid":
                    continue  # a pure io block: the residual is the weight, both orders agree
                errs = {}
                for source, perm in (("identity", None),
                                     ("weight", choose_permutation(w, spec.groups, st.fit)),
                                     ("residual", choose_permutation(w, spec.groups, st.fit, spec.rank, args.ridge))):
                    m = replace(spec, permuted=perm is not None).build()
                    if perm is not None:
                        m.input_perm.copy_(perm)
                    init_block_(m, w, None, "fit", st.fit, args.ridge)
                    errs[source] = relative_error(w, m.to_dense(), st.held_out)
                row["options"][f"g{spec.groups}+r{spec.rank}"] = errs
            results.append(row)
            shown = "  ".join(f"{k}: " + "/".join(f"{v:.4f}" for v in e.values()) for k, e in row["options"].items())
            print(f"{name} @ {fraction}: lowrank {row['lowrank']:.4f} | identity/weight/residual {shown}", flush=True)
    n = sum(len(r["options"]) for r in results)
    wins = sum(e["residual"] < e["weight"] for r in results for e in r["options"].values())
    print(f"residual order lower than weight order in {wins} of {n} hybrid options")
    finish(args, t0, results)


if __name__ == "__main__":
    main()
