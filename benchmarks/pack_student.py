"""A smaller copy of a student saved by ``compare.py --save-students``, to move it to another
machine (e.g. a GPU machine whose uploads are capped) and recover it there with
``compare.py --students``.

    python benchmarks/pack_student.py runs/students/hybrid-permute@0.25 packed/hybrid-permute@0.25 \\
        --teacher smollm2-135m-instruct --dtype bfloat16

Tensors equal to the teacher's tensor of the same name (the embedding, the norms, layers the
surgery left dense) are left out: ``compare.py --students`` copies them from the teacher. The rest
is stored in ``--dtype`` (matrices only; vectors stay float32). bfloat16 rounds each weight by at
most 2**-9 of its size: the packed student is not bit-identical to the saved one, and the script
prints how many tensors and bytes it kept.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import gpconv
from gpconv.hub import weight_files as _weight_files


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--teacher", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args()
    src, dst = Path(args.src), Path(args.dst)
    teacher, _ = gpconv.load_model(args.teacher)
    own = teacher.state_dict()
    dtype = getattr(torch, args.dtype)
    kept, dropped, nbytes = {}, 0, 0
    for f in _weight_files(src):
        for k, t in load_file(str(f)).items():
            if k in own and own[k].shape == t.shape and torch.equal(own[k].to(t.dtype), t):
                dropped += 1
                continue
            kept[k] = (t.to(dtype) if t.dim() >= 2 and t.is_floating_point() else t).contiguous()
            nbytes += kept[k].numel() * kept[k].element_size()
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    save_file(kept, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    print(f"{dst}: kept {len(kept)} tensors ({nbytes / 2**20:.1f} MiB, {args.dtype} matrices), "
          f"left out {dropped} equal to the teacher's")


if __name__ == "__main__":
    main()
