"""Shrinking a Phi-3-mini-sized checkpoint: peak memory and time of the streaming path.

    python benchmarks/bench_shrink_scale.py                 # write ~7.6 GB, shrink, report, delete
    python benchmarks/bench_shrink_scale.py --layers 4      # a quick, smaller rehearsal
    python benchmarks/bench_shrink_scale.py --json out.json

1. Writes a random-weight checkpoint of Phi-3-mini's shape (32 layers, hidden 3072,
   intermediate 8192, vocab 32064, bf16, sharded safetensors: about 7.6 GB) into a temporary
   directory (no hub access).
2. Runs ``gpconv shrink SRC --out OUT --init project -m 256`` as a child process, exactly as a
   user would, and measures its wall time and its peak RSS (``ru_maxrss`` of the waited child,
   cross-checked by polling /proc every 0.2 s).
3. Checks the output: the plan has every layer, and one block equals the projection of its
   dense weight computed here independently.
4. Deletes both directories (unless --keep).

Targets (issue 4): peak RSS <= 1.3 x checkpoint size, time <= 5 minutes. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch


def phi3_mini_config(layers: int):
    from transformers import Phi3Config

    return Phi3Config(
        vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
        original_max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=32000, pad_token_id=32000, dtype="bfloat16",
    )


def write_checkpoint(path: Path, layers: int, shard_size: int = 2 * 10**9, seed: int = 0) -> int:
    """Random bf16 weights for every tensor of the model, sharded; returns the weight bytes."""
    from safetensors.torch import save_file

    from gpconv.hub import build_meta

    cfg = phi3_mini_config(layers)
    meta = build_meta(cfg)
    shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    del meta
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size, total, files, weight_map = 0, 0, [], {}

    def flush():
        nonlocal size
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shards[-1], str(path / name), metadata={"format": "pt"})
        files.append((name, list(shards[-1])))
        shards[-1] = {}
        size = 0

    for k, shape in shapes.items():
        if k.endswith("norm.weight") or "layernorm" in k:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        n = t.numel() * 2
        if shards[-1] and size + n > shard_size:
            flush()
        shards[-1][k] = t
        size += n
        total += n
    flush()
    # transformers' names: model-0000i-of-0000n.safetensors + the index
    n = len(files)
    for i, (name, keys) in enumerate(files, 1):
        final = f"model-{i:05d}-of-{n:05d}.safetensors"
        os.rename(path / name, path / final)
        weight_map.update({k: final for k in keys})
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    cfg.save_pretrained(path)
    return total


class _Poller(threading.Thread):
    """Peak RSS of a process (and its children) by polling /proc, as a cross-check of ru_maxrss."""

    def __init__(self, pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.every, self.peak, self.stop = pid, every, 0, False

    def run(self):
        import psutil

        try:
            proc = psutil.Process(self.pid)
            while not self.stop:
                rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
                self.peak = max(self.peak, rss)
                time.sleep(self.every)
        except Exception:  # the process ended
            pass


def check_output(src: Path, out: Path, layers: int) -> str:
    """Plan complete + one block equal to an independent projection of its dense weight."""
    from safetensors import safe_open

    from gpconv.fitting import fit_io_weight
    from gpconv.hub import weight_files as _weight_files
    from gpconv.layers import GroupedPointwiseBlock

    cfg = json.loads((out / "config.json").read_text())
    plan = cfg["gpconv"]["modules"]
    assert len(plan) == 4 * layers, f"{len(plan)} planned modules, expected {4 * layers}"
    name = "model.layers.0.self_attn.qkv_proj"
    spec = plan[name]
    idx_src = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(src / idx_src[name + ".weight"]), "pt") as fh:
        dense = fh.get_tensor(name + ".weight")
    got = None
    for f in _weight_files(out):
        with safe_open(str(f), "pt") as fh:
            if name + ".weight" in fh.keys():
                got = fh.get_tensor(name + ".weight")
    block = GroupedPointwiseBlock(spec["in_features"], spec["out_features"], spec["groups"], device="meta")
    want = fit_io_weight(dense, spec["groups"], block.gather_index("cpu"))
    assert got is not None and torch.equal(got, want), "qkv_proj of layer 0 is not the projection of its dense weight"
    return f"plan: {len(plan)} modules; {name}: groups {spec['groups']}, equals the projection of the dense weight"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--init", default="project", choices=["random", "project"])
    ap.add_argument("--min-channels-per-group", type=int, default=256)
    ap.add_argument("--workdir", default=None, help="where the temporary checkpoints go (default: the system temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep both checkpoints")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="gpconv-scale-", dir=args.workdir))
    src, out = root / "phi3-mini-random", root / "shrunk"
    try:
        t0 = time.perf_counter()
        nbytes = write_checkpoint(src, args.layers)
        t_write = time.perf_counter() - t0
        on_disk = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        print(f"wrote {src}: {nbytes / 1e9:.3f} GB of bf16 weights ({on_disk / 1e9:.3f} GB on disk) in {t_write:.0f} s", flush=True)

        cmd = [sys.executable, "-m", "gpconv_cli", "shrink", str(src), "--out", str(out), "--init", args.init,
               "-m", str(args.min_channels_per_group), "--json"]
        load_before = open("/proc/loadavg").read().strip()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        poller = _Poller(proc.pid)
        poller.start()
        stdout, stderr = proc.communicate()
        wall = time.perf_counter() - t0
        poller.stop = True
        load_after = open("/proc/loadavg").read().strip()
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
        if proc.returncode != 0:
            print(stderr, file=sys.stderr)
            print(f"shrink failed with exit status {proc.returncode}", file=sys.stderr)
            return 1
        report = json.loads(stdout)
        verdict = check_output(src, out, args.layers)
        out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        res = dict(
            command=" ".join(cmd[1:]).replace(str(root), "$TMP"), layers=args.layers,
            checkpoint_bytes=on_disk, output_bytes=out_bytes, peak_rss_bytes=peak, peak_rss_polled_bytes=poller.peak,
            rss_over_checkpoint=peak / on_disk, wall_s=wall, write_s=t_write,
            params_before=report["before"]["total"], params_after=report["after"]["total"],
            threads=torch.get_num_threads(), cpus=os.cpu_count(), loadavg_before=load_before, loadavg_after=load_after,
            check=verdict,
        )
        print(f"shrink ({args.init}): {wall:.1f} s wall; peak RSS {peak / 1e9:.3f} GB "
              f"(polled {poller.peak / 1e9:.3f} GB) = {peak / on_disk:.3f} x the checkpoint ({on_disk / 1e9:.3f} GB)")
        print(f"parameters {res['params_before']:,} -> {res['params_after']:,}; output {out_bytes / 1e9:.3f} GB")
        print(f"targets: RSS <= 1.3 x checkpoint: {'met' if peak <= 1.3 * on_disk else 'MISSED'}; "
              f"time <= 300 s: {'met' if wall <= 300 else 'MISSED'}")
        print(f"check: {verdict}")
        print(f"loadavg before: {load_before}\nloadavg after:  {load_after}")
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
