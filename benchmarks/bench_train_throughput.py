"""Training throughput: gpconv's loop vs a plain Hugging Face ``Trainer``, measured in one run.

Both train the same shrunk student (same starting weights, same blocks, same batch, AdamW,
the same parameters trainable) with next-token cross-entropy, so the only difference is the
loop. The two alternate for ``--rounds`` rounds; a step's time is the wall time from the end of
one optimizer step to the end of the next (data, forward, backward, step, logging: everything),
and the first ``--warmup`` steps of each run are dropped. The ratio printed is
gpconv tokens/s / Trainer tokens/s (the issue asks for >= 0.95).

Distillation adds the teacher's forward pass (and its softmax), which the Trainer baseline
does not have: each round also runs ``gpconv.distill`` and the script reports its tokens/s with
and without the teacher time the loop measures per step.

With ``--top-k K`` each round also runs ``gpconv.distill`` from a :class:`gpconv.TeacherCache`
filled beforehand (by one untimed run) with the teacher's top-K of the blocks the runs see: the steady state
of a cache-backed run (later epochs, later runs on the same data), against the live teacher.

    python benchmarks/bench_train_throughput.py                         # SmolLM2-135M, alpaca subset
    python benchmarks/bench_train_throughput.py --model tiny-phi3 --data some.jsonl --steps 20
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import torch

import gpconv

DEFAULT_DATA = "/work/shared/data/alpaca_5000_subset.json"


def hf_trainer_steps(student, blocks, args) -> list[float]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            times.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=args.batch_size, max_steps=args.warmup + args.steps,
            learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0.05, max_grad_norm=1.0,
            weight_decay=0.0, adam_beta2=0.95, logging_strategy="no", save_strategy="no", report_to="none",
            use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=True, seed=0,
        )
        Trainer(model=student, args=targs, train_dataset=blocks, callbacks=[Clock()]).train()
    return [b - a for a, b in zip(times, times[1:])][args.warmup:]


def gpconv_steps(student, blocks, args, teacher=None) -> tuple[list[float], list[float]]:
    """Step times, and the teacher's share of each (its forward pass and softmax)."""
    times, teacher_total = [time.perf_counter()], [0.0]
    cfg = gpconv.TrainConfig(max_steps=args.warmup + args.steps, batch_size=args.batch_size, lr=args.lr,
                             train=args.train, progress=False, log_every=1)

    def clock(step, row):
        times.append(time.perf_counter())
        teacher_total.append(row["teacher_s"])

    if teacher is None:
        gpconv.train(student, blocks, cfg, callbacks=[clock])
    else:
        gpconv.distill(student, teacher, blocks, cfg, callbacks=[clock])
    steps = [b - a for a, b in zip(times, times[1:])][args.warmup:]
    teacher_steps = [b - a for a, b in zip(teacher_total, teacher_total[1:])][args.warmup:]
    return steps, teacher_steps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6, help="measured steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="steps dropped at the start of each run")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--train", default="grouped", choices=["grouped", "all"])
    ap.add_argument("--mcpg", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--no-distill", action="store_true")
    ap.add_argument("--top-k", type=int, default=0, help="also distil from a filled teacher cache of the top K (0: no)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    teacher_model, tok = gpconv.load_model(args.model)
    student0 = copy.deepcopy(teacher_model)
    gpconv.shrink(student0, gpconv.GPConvConfig(min_channels_per_group=args.mcpg, init="project"))
    blocks, _ = gpconv.build_datasets(args.data, tok, block_size=args.block_size, val_size=0, seed=0)
    tokens_per_step = args.batch_size * args.block_size

    def fresh():
        s = copy.deepcopy(student0).train()
        if args.train == "grouped":  # the Trainer trains what requires grad: make it the same set
            s.requires_grad_(False)
            for _, m in gpconv.surgery.iter_blocks(s):
                m.requires_grad_(True)
        return s

    cache = None
    if args.top_k and not args.no_distill:
        cache = gpconv.TeacherCache(teacher_model, top_k=args.top_k)
        gpconv_steps(fresh(), blocks, args, teacher=cache)  # untimed: caches exactly the blocks the runs will see
    hf, ours, kd, kd_student, kd_cached = [], [], [], [], []
    for r in range(args.rounds):
        hf += hf_trainer_steps(fresh(), blocks, args)
        ours += gpconv_steps(fresh(), blocks, args)[0]
        msg = f"round {r + 1}: Trainer {tokens_per_step / statistics.median(hf):.1f} tok/s, gpconv {tokens_per_step / statistics.median(ours):.1f} tok/s"
        if not args.no_distill:
            steps, teacher = gpconv_steps(fresh(), blocks, args, teacher=teacher_model)
            kd += steps
            kd_student += [s - t for s, t in zip(steps, teacher)]
            msg += f", distill {tokens_per_step / statistics.median(kd):.1f} tok/s"
            if cache is not None:
                kd_cached += gpconv_steps(fresh(), blocks, args, teacher=cache)[0]
                msg += f", distill (cached top-{args.top_k}) {tokens_per_step / statistics.median(kd_cached):.1f} tok/s"
        print(msg, file=sys.stderr, flush=True)

    t_hf, t_ours = tokens_per_step / statistics.median(hf), tokens_per_step / statistics.median(ours)
    print(f"model {args.model}, student {args.train} blocks (mcpg {args.mcpg}), batch {args.batch_size} x {args.block_size} tokens, "
          f"{args.rounds} rounds x {args.steps} measured steps, torch threads {torch.get_num_threads()}, "
          f"loadavg at the end: {os.getloadavg()[0]:.2f}")
    print(f"HF Trainer (cross-entropy):   {t_hf:10.1f} tokens/s  (median step {statistics.median(hf):.3f} s)")
    print(f"gpconv.train (cross-entropy): {t_ours:10.1f} tokens/s  (median step {statistics.median(ours):.3f} s)")
    print(f"ratio gpconv.train / Trainer: {t_ours / t_hf:.3f}")
    if kd:
        t_kd, t_st = tokens_per_step / statistics.median(kd), tokens_per_step / statistics.median(kd_student)
        print(f"gpconv.distill:               {t_kd:10.1f} tokens/s  (median step {statistics.median(kd):.3f} s)")
        print(f"  without the teacher's forward and softmax: {t_st:.1f} tokens/s "
              f"(median {statistics.median(kd_student):.3f} s/step); ratio to Trainer {t_st / t_hf:.3f}")
    if kd_cached:
        t_c = tokens_per_step / statistics.median(kd_cached)
        print(f"gpconv.distill, cached top-{args.top_k}: {t_c:10.1f} tokens/s  (median step {statistics.median(kd_cached):.3f} s)")
        print(f"ratio cached / live teacher: {t_c / t_kd:.3f}")


if __name__ == "__main__":
    main()
