"""How much of the teacher's next-token probability its top-k tokens hold (what a teacher cache keeps).

For ``--blocks`` random training blocks, the teacher's mass outside its top k (the "rest" bucket
of :class:`gpconv.TeacherCache`), per position: mean, median, 90th percentile and maximum.

    python benchmarks/teacher_topk_mass.py                       # SmolLM2-135M-Instruct, alpaca subset, 128-token blocks
"""

from __future__ import annotations

import argparse

import torch

import gpconv
from gpconv.recovery.losses import top_k_of


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data", default="/work/shared/data/alpaca_5000_subset.json")
    ap.add_argument("--format", default="chat-template")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--blocks", type=int, default=32)
    ap.add_argument("--k", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher, tok = gpconv.load_model(args.model)
    blocks, _ = gpconv.build_datasets(args.data, tok, format=args.format, block_size=args.block_size, val_size=0, seed=0)
    pick = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(0))[:args.blocks]
    ids = blocks.input_ids[pick]
    with torch.no_grad():
        logits = torch.cat([teacher(input_ids=ids[i:i + 8]).logits for i in range(0, len(ids), 8)])  # (n, T, V)
    print(f"{args.model}: {len(ids)} of {len(blocks)} blocks of {args.block_size} tokens from {args.data} "
          f"({args.format}), {logits.shape[0] * logits.shape[1]:,} positions, vocabulary {logits.shape[-1]:,}")
    print("| k | rest mass: mean | median | 90th percentile | max |")
    print("|---:|---:|---:|---:|---:|")
    for k in args.k:
        rest = top_k_of(logits, k)[2].exp().flatten()
        print(f"| {k} | {rest.mean():.4f} | {rest.median():.4f} | {rest.quantile(0.9):.4f} | {rest.max():.4f} |")


if __name__ == "__main__":
    main()
