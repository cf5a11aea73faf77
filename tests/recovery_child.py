"""A tiny distillation run, started as a subprocess by tests/test_train_processes.py.

    python tests/recovery_child.py OUT [--resume] [--pause-at N] [--batch-size B] [--grad-accum A] [--dropout P]
                                       [--teacher-top-k K] [--distributed ddp|fsdp] [--report-to tensorboard]
                                       [--train lora --targets mlp] [--steps N]
    torchrun --standalone --nproc_per_node 2 tests/recovery_child.py OUT ...

Everything (models, data) is built from fixed seeds, so two runs with the same arguments must
end with the same weights. ``--pause-at N`` writes OUT.paused after step N and then waits
forever, so the test can SIGKILL the process at a known point.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)  # the same kernels and reduction order in every run

import gpconv  # noqa: E402
from gpconv.hub import tiny_phi3  # noqa: E402

SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)


def rows(n=48):
    words = "apple pear plum fig kiwi lime date lemon mango peach grape melon".split()
    return [{"instruction": f"List fruit number {i}", "response": " ".join(words[(i + k) % len(words)] for k in range(1 + i % 5))}
            for i in range(n)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--pause-at", type=int, default=0)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--teacher-top-k", type=int, default=0)
    ap.add_argument("--distributed", default="auto")
    ap.add_argument("--report-to", default="none")
    ap.add_argument("--train", default=None)
    ap.add_argument("--targets", default="all-linear")
    a = ap.parse_args()

    teacher, tok = tiny_phi3(seed=1, **SMALL)
    student, _ = tiny_phi3(seed=1, resid_pdrop=a.dropout, **SMALL)  # dropout: the RNG state matters on resume
    gpconv.shrink(student, gpconv.GPConvConfig(min_channels_per_group=16, init="project", target_modules=a.targets))
    data = Path(a.out + ".data.jsonl")
    if int(os.environ.get("RANK", "0")) == 0 and not data.exists():
        tmp = data.with_suffix(".tmp")
        tmp.write_text("\n".join(json.dumps(r) for r in rows()))
        os.replace(tmp, data)
    while not data.exists():
        time.sleep(0.05)
    train, val = gpconv.build_datasets(str(data), tok, block_size=32, val_size=8, seed=0)

    def pause(step, row):
        if step == a.pause_at:
            Path(a.out + ".paused").write_text(str(step))
            time.sleep(3600)

    cfg = gpconv.TrainConfig(out_dir=a.out, max_steps=a.steps, batch_size=a.batch_size, grad_accum=a.grad_accum,
                             lr=3e-3, save_every=4, log_every=1, resume=a.resume, progress=False,
                             teacher_top_k=a.teacher_top_k, distributed=a.distributed, report_to=a.report_to,
                             train=a.train)
    res = gpconv.distill(student, teacher, train, cfg, val_data=val, tokenizer=tok, teacher_tokenizer=tok,
                         callbacks=[pause] if a.pause_at else [])
    print(f"done steps={res.steps} val_loss={res.val['loss']:.6f}", file=sys.stderr)


if __name__ == "__main__":
    main()
