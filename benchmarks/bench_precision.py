"""Distillation speed on the CPU in fp32 against bf16 autocast (``TrainConfig.precision``), one run.

The same student (a fresh copy each time) is distilled from the same teacher for ``--steps``
steps in each precision, alternating for ``--rounds`` rounds; printed per run: the wall time of
the training steps (``TrainResult.train_s``), the part of it in the teacher's forward passes,
and the first logged loss (the two precisions should agree closely).

    OMP_NUM_THREADS=1 python benchmarks/bench_precision.py runs/students/hybrid-permute@0.5
    OMP_NUM_THREADS=1 python benchmarks/bench_precision.py STUDENT --native-off   # + fp32 without the C kernels

The student is any saved gpconv model (e.g. one written by ``compare.py --save-students``); the
teacher is SmolLM2-135M-Instruct (offline); data: Alpaca rows from ``../shared/data``.
bf16 pays off on CPUs with AMX or AVX-512 BF16; elsewhere it can be slower than fp32.
``--native-off`` adds a third side, fp32 with ``use_kernels(native=False)`` (torch's paths
instead of the C kernels, which only run in fp32), in the same alternation.
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch

import gpconv
from gpconv import layers

DEFAULT_DATA = "/work/shared/data/alpaca_5000_subset.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("student", help="a saved gpconv model directory")
    ap.add_argument("--teacher", default="smollm2-135m-instruct")
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--format", default="chat-template", help="data format (gpconv.build_datasets)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--native-off", action="store_true", help="also time fp32 with gpconv's C kernels off")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    teacher, tok = gpconv.load_model(args.teacher)
    base = gpconv.from_pretrained(args.student)
    train, _ = gpconv.build_datasets(args.data, tok, format=args.format, block_size=args.block_size, val_size=16)
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    if args.native_off:
        times["fp32-native-off"] = []
    for rnd in range(args.rounds):
        for side in times:
            precision = side.split("-")[0]
            student = copy.deepcopy(base)
            with layers.use_kernels(native=layers.kernel_config().native and side != "fp32-native-off"), \
                    tempfile.TemporaryDirectory() as d:
                cfg = gpconv.TrainConfig(out_dir=d, max_steps=args.steps, batch_size=args.batch_size, lr=5e-4,
                                         precision=precision, progress=False, save_every=0, eval_batches=1, seed=0)
                res = gpconv.distill(student, teacher, train, cfg)
            loss = next(h["loss"] for h in res.history if h.get("split") == "train")
            times[side].append(res.train_s)
            print(f"round {rnd} {side}: train {res.train_s:.1f} s (teacher {res.teacher_s:.1f} s), "
                  f"first loss {loss:.4f}", flush=True)
    best = {p: min(t) for p, t in times.items()}
    print(f"fp32 / bf16 time, best of {args.rounds}: {best['fp32'] / best['bf16']:.2f}x")
    if args.native_off:
        print(f"fp32 native off / on time, best of {args.rounds}: {best['fp32-native-off'] / best['fp32']:.2f}x")


if __name__ == "__main__":
    main()
