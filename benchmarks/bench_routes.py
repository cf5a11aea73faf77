"""Which inference path is fastest for an io block on this CPU, per shape and token count, next to
the one gpconv's defaults take.

    python benchmarks/bench_routes.py --threads 1
    python benchmarks/bench_routes.py --threads 2 --tokens 9 16 24 31 32 128 --json out.json
    python benchmarks/bench_routes.py --shapes down=8192:3072:256 --tokens 1 32 1024

An io block in inference (CPU, float32) takes one of four paths, chosen by the token count and the
group width: ``io_small`` (the C decode kernel), gather + ``bmm`` (torch), ``io_forward`` (the fused
C kernel) or the interleaved copy + two MKL GEMMs (``two-gemm``). The limits between them
(``small_max_tokens``, ``fused_min_tokens``, ``fused_max_out_per_group``,
``conv_min_tokens`` of gpconv.layers.KernelConfig) were measured on a few CPUs and some are chosen by CPU at import
(docs/speed.md). This script times every path that can run, interleaved, medians of ``--reps``
samples (each sample one call; outputs allocated as in real use), checks that all paths give the
same output, and prints for each case the fastest path, the path the current defaults take
(recorded from the calls gpconv actually makes, not re-derived) and ``default/fastest``: above 1
means the defaults leave speed on this CPU. Needs gpconv's C kernels on an AVX2 or AVX-512 CPU for the
two C paths (without it only the torch paths are timed; under GPCONV_NATIVE=0 they are still
timed, called directly, and only the default column changes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from gpconv import layers
from gpconv.bench import machine_info, parse_shape_specs
from gpconv.layers import GroupedPointwiseBlock, functional, group_count
from gpconv.layers.cpu import dispatch, native

SHAPES = {  # SmolLM2-135M at min_channels_per_group 64, Phi-3-mini at 256
    "smollm2.q": (576, 576, 64),
    "smollm2.kv": (576, 192, 64),
    "smollm2.up": (576, 1536, 64),
    "smollm2.down": (1536, 576, 64),
    "phi3.o": (3072, 3072, 256),
    "phi3.down": (8192, 3072, 256),
}
TOKENS = [1, 4, 8, 9, 16, 24, 31, 32, 64, 128, 512]


def _parse_shapes(specs: list[str]) -> dict:
    try:
        return parse_shape_specs(specs)
    except ValueError as e:
        raise SystemExit(f"bench_routes: {e}")


def default_route(x: torch.Tensor, block: GroupedPointwiseBlock) -> str:
    """The path gpconv's current settings take for this call, seen by recording its native calls."""
    calls = []
    real = native.ext

    class Recorder:
        def __getattr__(self, name):
            fn = getattr(real, name)
            return (lambda *a: calls.append(name) or fn(*a)) if name in ("io_small", "io_forward") else fn

    native.ext = Recorder() if real is not None else None
    try:
        with torch.no_grad():
            block(x)
    finally:
        native.ext = real
    if calls:
        return calls[0]  # io_small or io_forward
    return "two-gemm" if functional.use_conv(x) else "gather+bmm"


def paths(x: torch.Tensor, block: GroupedPointwiseBlock) -> dict:
    """Every inference path that can run here, each a no-argument function returning y (N, out)."""
    w = block.weight.detach()
    idx = block.gather_index()
    fns = {
        "gather+bmm": lambda: functional.io_gather(x, w, None, idx),
        "two-gemm": lambda: dispatch.io_bmm_scratch(x, w, None),
    }
    if native.ext is not None and native.isa() != "portable":
        fns["io_small"] = lambda: native.io_forward(x, w, None, True)
        fns["io_forward"] = lambda: native.io_forward(x, w, None)
    return fns


def case(name: str, n_in: int, n_out: int, mcpg: int, n: int, reps: int) -> dict:
    g = group_count(n_in, n_out, mcpg)
    torch.manual_seed(0)
    block = GroupedPointwiseBlock(n_in, n_out, g)  # no permutation, no bias: the paths' own cost
    x = torch.randn(n, n_in)
    fns = paths(x, block)
    with torch.no_grad():
        ref = x @ block.to_dense().t()
        for key, fn in fns.items():  # every path is the block before anything is timed
            torch.testing.assert_close(fn(), ref, rtol=1e-4, atol=1e-4, msg=lambda m, key=key: f"{key}: {m}")
        for fn in fns.values():  # warm-up: scratch buffers, first-touch of outputs
            fn()
        samples = {key: [] for key in fns}
        for _ in range(reps):  # interleaved: a load change hits every path alike
            for key, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                samples[key].append((time.perf_counter() - t0) * 1e3)
    ms = {key: statistics.median(v) for key, v in samples.items()}
    fastest = min(ms, key=ms.get)
    route = default_route(x, block)
    return {"shape": name, "in": n_in, "out": n_out, "groups": g, "out_per_group": n_out // g, "tokens": n,
            "ms": ms, "samples_ms": samples, "fastest": fastest, "default": route,
            "default_over_fastest": ms[route] / ms[fastest]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=None,
                    help="shapes instead of the built-in list, e.g. down=8192:3072:256")
    ap.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    ap.add_argument("--reps", type=int, default=51, help="interleaved samples per path (median kept)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--json", default=None, help="write rows + machine info to this file")
    args = ap.parse_args(argv)
    shapes = _parse_shapes(args.shapes) if args.shapes else SHAPES
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    print(f"# {info.get('cpu', '?')}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{layers.native_status()}, malloc {info['allocator']}, "
          f"loadavg {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    names = ["io_small", "gather+bmm", "io_forward", "two-gemm"]
    print(f"{'shape':14s} {'in->out':>11s} {'g':>3s} {'oc':>4s} {'tokens':>6s} "
          + " ".join(f"{k + ' ms':>13s}" for k in names) + f" {'fastest':>10s} {'default':>10s} {'def/fast':>8s}")
    rows = []
    for name, (i, o, m) in shapes.items():
        for n in args.tokens:
            r = case(name, i, o, m, n, args.reps)
            rows.append(r)
            cells = " ".join(f"{r['ms'][k]:13.3f}" if k in r["ms"] else f"{'-':>13s}" for k in names)
            print(f"{name:14s} {f'{i}->{o}':>11s} {r['groups']:3d} {r['out_per_group']:4d} {n:6d} {cells} "
                  f"{r['fastest']:>10s} {r['default']:>10s} {r['default_over_fastest']:8.2f}", flush=True)
    print(f"# loadavg after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "threads": torch.get_num_threads(), "native": layers.native_status(),
                       "reps": args.reps, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
