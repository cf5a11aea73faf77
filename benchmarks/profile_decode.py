"""Where a KV-cache decode step goes on the CPU: gpconv's layers, the output head, everything else.

    OMP_NUM_THREADS=1 python benchmarks/profile_decode.py /tmp/smol-grouped --threads 1
    python benchmarks/profile_decode.py smollm2-135m-instruct --threads 1   # the dense original

A shrunk model's decode speed-up over its dense original is bounded by what shrinking leaves
alone: the output head (SmolLM2's is the 49,152 x 576 embedding matrix, tied, kept dense),
attention over the cache, norms and rotary embeddings, and the fixed cost of every module call.
This script times, with forward hooks around each call, every gpconv layer (GroupedPointwiseBlock,
GroupedLinear, LowRankLinear) and the output embeddings module, over ``--steps`` one-token steps
after a ``--prompt-len`` prompt, and prints each as milliseconds per step and as a share of the
step's wall time (the hooks' own small cost is part of the step). MODEL is anything
``gpconv.hub.load_model`` takes: a gpconv or transformers directory, a .gguf, a hub id or a
built-in name.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from gpconv import layers
from gpconv.bench import _forward, _forward_kwargs, _token_ids  # the calls `gpconv bench` times
from gpconv.errors import GPConvError
from gpconv.hub import load_model

GPCONV_LAYERS = (layers.GroupedPointwiseBlock, layers.GroupedLinear, layers.LowRankLinear)


def _timed(modules) -> list[float]:
    """Add hooks that sum the wall time of each call of ``modules``; returns the one-item total."""
    total, start = [0.0], {}

    def pre(mod, args):
        start[id(mod)] = time.perf_counter()

    def post(mod, args, out):
        total[0] += time.perf_counter() - start.pop(id(mod))

    for m in modules:
        m.register_forward_pre_hook(pre)
        m.register_forward_hook(post)
    return total


def profile(model, prompt_len: int = 128, steps: int = 20, warmup: int = 3) -> dict:
    """Per decode step (ms): wall, gpconv layers, output head, the rest; and the layer count."""
    model = model.eval()
    blocks = [m for m in model.modules() if isinstance(m, GPCONV_LAYERS)]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    t_blocks = _timed(blocks)
    t_head = _timed([head] if head is not None else [])
    ids = _token_ids(model.config.vocab_size, 1, prompt_len)
    names = _forward_kwargs(model)
    with torch.inference_mode():
        cache = _forward(model, ids, None, names)
        nxt = ids[:, -1:]
        for i in range(warmup + steps):
            if i == warmup:
                t_blocks[0] = t_head[0] = 0.0
                t0 = time.perf_counter()
            cache = _forward(model, nxt, cache, names)
        wall = (time.perf_counter() - t0) / steps
    ms = 1e3 / steps
    res = {"wall_ms": wall * 1e3, "gpconv_layers_ms": t_blocks[0] * ms, "head_ms": t_head[0] * ms,
           "gpconv_layers": len(blocks), "prompt_len": prompt_len, "steps": steps,
           "threads": torch.get_num_threads(), "native_kernels": layers.native_status()}
    res["rest_ms"] = res["wall_ms"] - res["gpconv_layers_ms"] - res["head_ms"]
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="gpconv or transformers directory, .gguf, hub id or built-in name")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of lines")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.prompt_len < 1:
        print("profile_decode: --steps and --prompt-len must be at least 1", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, _ = load_model(args.model)
    except (GPConvError, OSError, ValueError) as e:
        print(f"profile_decode: {e}", file=sys.stderr)
        return 2
    res = profile(model, args.prompt_len, args.steps)
    res["model"] = args.model
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    wall = res["wall_ms"]
    print(f"{args.model}: decode step after a {args.prompt_len}-token prompt, {args.steps} steps, "
          f"threads {res['threads']}, gpconv C kernels: {res['native_kernels']}")
    for key, name in (("gpconv_layers_ms", f"gpconv layers ({res['gpconv_layers']})"),
                      ("head_ms", "output head"), ("rest_ms", "everything else")):
        print(f"  {name:24s} {res[key]:8.2f} ms  {res[key] / wall:6.1%}")
    print(f"  {'wall':24s} {wall:8.2f} ms  ({1e3 / wall:.1f} tokens/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
