"""The io block's two gradient kernels against the torch + MKL code they replace, per layer shape.

    python benchmarks/bench_backward.py --threads 1
    python benchmarks/bench_backward.py --threads 2 --shapes down=8192:3072:256 --json out.json

For each shape (``NAME=IN:OUT:MIN_CHANNELS_PER_GROUP``, groups by the paper's rule) and 1,024
tokens (``--tokens``) it times, interleaved, ``--reps`` times, on the same random tensors:

* ``dx``: ``io_dx`` (gpconv/layers/cpu/_native.c) (one call) against the unfused chain it replaces in
  ``_IOBlockCPU.backward``: ``dY W_own`` by ``bmm`` written through a strided view into dx,
  ``dY W_mixed`` by ``bmm`` into a reused buffer, and the ``uninterleave_add`` kernel;
* ``dW``: ``io_dw`` against the dY transpose, the grouped interleaved copy of x
  and the two ``bmm`` into dW's halves.

Outputs are preallocated on both sides (no page faults in either), and the script checks that
both sides give the same result before timing.

``--model MODEL`` instead times whole training steps (forward, cross-entropy on random tokens,
backward; ``--batch`` x ``--seq`` tokens) of MODEL shrunk with ``-m --mcpg``, alternating
``fused_backward`` (gpconv.layers.KernelConfig) on and off, and the dense original's step for scale:

    python benchmarks/bench_backward.py --model smollm2-135m-instruct --mcpg 64 --threads 1 It prints medians and the median of the
per-sample ratios (fused / unfused: below 1 is faster). Needs gpconv's C kernels on an AVX2 CPU.
gpconv routes groups of up to ``fused_grad_max_out_per_group`` (192) outputs to the kernels;
wider shapes are listed to show why.
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
from gpconv.layers.cpu import native
from gpconv.bench import machine_info, parse_shape_specs
from gpconv.layers import group_count

SHAPES = {  # Phi-3-mini at min_channels_per_group 256, SmolLM2-135M at 64, one wide group (o_proj)
    "phi3.down": (8192, 3072, 256),
    "phi3.o": (3072, 3072, 256),
    "smollm2.down": (1536, 576, 64),
    "smollm2.up": (576, 1536, 64),
    "smollm2.o": (576, 576, 64),
    "smollm2.kv": (576, 192, 64),
}


def _parse_shapes(specs: list[str]) -> dict:
    try:
        return parse_shape_specs(specs)
    except ValueError as e:
        raise SystemExit(f"bench_backward: {e}")


def _time(fns: dict, reps: int) -> dict:
    for f in fns.values():
        f()  # warm-up: buffers, packed weights, page faults
    samples = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            samples[k].append((time.perf_counter() - t) * 1e3)
    return samples


def case(n: int, n_in: int, n_out: int, g: int, threads: int, reps: int) -> list[dict]:
    nat = native.ext
    c, oc = n_in // g, n_out // g
    gen = torch.Generator().manual_seed(0)
    x, dy = torch.randn(n, n_in, generator=gen), torch.randn(n, n_out, generator=gen)
    w = torch.randn(g, oc, 2 * c, generator=gen)
    dyg = dy.view(n, g, oc).transpose(0, 1)  # (N, out) -> (g, N, oc), a view
    dx_a, dx_b = torch.empty(n, n_in), torch.empty(n, n_in)
    d_mixed = torch.empty(g, n, c)
    dw_a, dw_b = torch.empty(g, oc, 2 * c), torch.empty(g, oc, 2 * c)
    dyt, xi = torch.empty(g, oc, n), torch.empty(g, n, c)

    def dx_fused():
        nat.io_dx(dy.data_ptr(), w.data_ptr(), dx_a.data_ptr(), n, n_in, n_out, g, threads)

    def dx_unfused():
        torch.bmm(dyg, w[:, :, :c], out=dx_b.view(n, g, c).transpose(0, 1))  # written as (N, g, c)
        torch.bmm(dyg, w[:, :, c:], out=d_mixed)
        nat.uninterleave_add(d_mixed.data_ptr(), dx_b.data_ptr(), n, c, g, threads)

    def dw_fused():
        nat.io_dw(x.data_ptr(), dy.data_ptr(), dw_a.data_ptr(), n, n_in, n_out, g, threads)

    def dw_unfused():
        nat.interleave(dy.data_ptr(), dyt.data_ptr(), 1, n, g * oc)  # (N, out) -> (out, N)
        nat.interleave(x.data_ptr(), xi.data_ptr(), n, c, g, threads, True)  # (N, in) -> (g, N, c)
        own = x.view(n, g, c).transpose(0, 1)  # (g, N, c), read in place
        torch.bmm(dyt, own, out=dw_b[:, :, :c])
        torch.bmm(dyt, xi, out=dw_b[:, :, c:])

    rows = []
    for name, fused, unfused, a, b in (("dx", dx_fused, dx_unfused, dx_a, dx_b),
                                        ("dW", dw_fused, dw_unfused, dw_a, dw_b)):
        fused(), unfused()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)  # the two sides compute the same thing
        s = _time({"fused": fused, "unfused": unfused}, reps)
        rows.append(dict(grad=name, fused_ms=statistics.median(s["fused"]), unfused_ms=statistics.median(s["unfused"]),
                         ratio=statistics.median(f / u for f, u in zip(s["fused"], s["unfused"])), samples_ms=s))
    return rows


def model_steps(spec: str, mcpg: int, batch: int, seq: int, reps: int) -> dict:
    """Training-step times of ``spec`` shrunk at ``mcpg``, gradient kernels on and off, and dense."""
    import gpconv

    dense, _ = gpconv.load_model(spec)
    student, _ = gpconv.load_model(spec)
    gpconv.shrink(student, gpconv.GPConvConfig(min_channels_per_group=mcpg))
    ids = torch.randint(0, dense.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))

    def step(model):
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    def with_backward(on):
        def run():
            with layers.use_kernels(fused_backward=on):
                step(student)
        return run

    s = _time({"fused": with_backward(True), "unfused": with_backward(False), "dense": lambda: step(dense)}, reps)
    return dict(model=spec, mcpg=mcpg, tokens=batch * seq, samples_ms=s,
                **{f"{k}_ms": statistics.median(v) for k, v in s.items()},
                ratio=statistics.median(f / u for f, u in zip(s["fused"], s["unfused"])))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=None, metavar="NAME=IN:OUT:MCPG",
                    help="shapes instead of the built-in list, e.g. down=8192:3072:256")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=9, help="interleaved samples per side (median kept)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--json", default=None, help="write rows + machine info to this file")
    ap.add_argument("--model", default=None, help="time whole training steps of this model instead (see above)")
    ap.add_argument("--mcpg", type=int, default=64, help="--model: min_channels_per_group of the shrink")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args(argv)
    shapes = _parse_shapes(args.shapes) if args.shapes else SHAPES
    if native.ext is None or native.isa() == "portable":
        print("bench_backward: needs gpconv's C kernels on a CPU with AVX2 + FMA", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = native.threads()
    info = machine_info()
    print(f"# {info.get('cpu', info['platform'])}, torch {torch.__version__}, threads {threads}, "
          f"{layers.native_status()}, malloc {info['allocator']}, loadavg {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.model:
        r = model_steps(args.model, args.mcpg, args.batch, args.seq, args.reps)
        print(f"{args.model} -m {args.mcpg}, {r['tokens']} tokens per step: training step {r['fused_ms']:.1f} ms with "
              f"the gradient kernels, {r['unfused_ms']:.1f} ms without (median ratio {r['ratio']:.3f}); "
              f"dense original {r['dense_ms']:.1f} ms")
        print(f"# loadavg after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(rows=[r], machine=info), f, indent=1)
        return 0
    print(f"{'shape':14s} {'in->out':>12s} {'g':>3s} {'oc':>4s} grad {'fused ms':>9s} {'unfused ms':>10s} {'ratio':>6s}")
    out = []
    for name, (i, o, m) in shapes.items():
        g = group_count(i, o, m)
        for r in case(args.tokens, i, o, g, threads, args.reps):
            print(f"{name:14s} {f'{i}->{o}':>12s} {g:3d} {o // g:4d} {r['grad']:4s} {r['fused_ms']:9.2f} "
                  f"{r['unfused_ms']:10.2f} {r['ratio']:6.2f}", flush=True)
            out.append(dict(shape=name, n_in=i, n_out=o, groups=g, tokens=args.tokens, **r))
    print(f"# loadavg after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=out, machine=info), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
