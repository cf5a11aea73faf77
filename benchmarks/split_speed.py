"""Time of the hybrid surgery per layer: the split (``gpconv.surgery.best_split``, with the channel
permutation) and the fit of the block it picks (``gpconv.fitting.fit_layer``), on real layers.

    OMP_NUM_THREADS=1 python benchmarks/split_speed.py --layers 3 15 27 --fractions 0.25 --json out.json

These two calls are what makes ``--variant hybrid --permute`` surgery slow (minutes for a 135M
model). Run it on two checkouts (``PYTHONPATH=other/checkout``) back to back to compare code
versions under the same load; it prints each layer's pick, so the picks can be checked equal too.
Data: Alpaca rows from ``../shared/data`` (read by the script, not the tests).
"""

from __future__ import annotations

import time

import torch

import gpconv
from gpconv.surgery import best_split
from gpconv.fitting import fit_layer

from hybrid_split import calibrated_layers, finish, layer_arguments


def main() -> None:
    ap = layer_arguments(__doc__)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    model, names, stats = calibrated_layers(args)
    results, total = [], 0.0
    for name in names:
        w = model.get_submodule(name).weight.detach()
        n_out, n_in = w.shape
        for fraction in args.fractions:
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                st = stats[name]
                best = best_split(n_in, n_out, False, "linear", w, st.fit, int(fraction * n_in * n_out),
                                  args.min_channels_per_group, args.ridge, permute=True, cov_eval=st.held_out)
                _, err = fit_layer(best.spec, w, None, "fit", st, args.ridge, permute=True)
                times.append(time.perf_counter() - t)
            s = min(times)
            total += s
            pick = f"{best.spec.variant} g{best.spec.groups} r{best.spec.rank}{' perm' if best.spec.permuted else ''}"
            results.append({"layer": name, "fraction": fraction, "seconds": times, "pick": pick, "error": err})
            print(f"{name} @ {fraction}: {s:.2f} s  {pick}  err {err:.6f}", flush=True)
    print(f"split + fit, all layers: {total:.1f} s (gpconv at {gpconv.__file__})")
    finish(args, t0, results)


if __name__ == "__main__":
    main()
