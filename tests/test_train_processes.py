"""Runs in separate processes: SIGKILL mid-run + resume is bitwise exact; 2 CPU processes (gloo)
match one process with the same global batch. The run itself is tests/recovery_child.py."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

CHILD = str(Path(__file__).with_name("recovery_child.py"))


def _env():
    # one thread: the same kernels in every run, and no thread contention on a shared machine
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(*args, timeout=180):
    r = subprocess.run([sys.executable, CHILD, *map(str, args)], env=_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _weights(out):
    return load_file(str(Path(out) / "model.safetensors"))


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "killed"
    _run(ref)  # 12 steps, checkpoints every 4, dropout on (so the RNG state matters)

    log = (tmp_path / "child.log").open("w")  # a file, not a pipe: a full pipe would block the child
    p = subprocess.Popen([sys.executable, CHILD, str(out), "--pause-at", "10"], env=_env(),
                         stdout=subprocess.DEVNULL, stderr=log)
    marker = Path(str(out) + ".paused")
    deadline = time.time() + 180
    while not marker.exists():
        assert p.poll() is None, (tmp_path / "child.log").read_text()[-3000:]
        assert time.time() < deadline, "the child never reached step 10"
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)  # mid-run: after step 10, checkpoints at 4 and 8 on disk
    p.wait(timeout=30)
    log.close()
    assert p.returncode == -signal.SIGKILL
    assert not (out / "model.safetensors").exists()
    ckpts = out / "checkpoints"
    assert sorted(x.name for x in ckpts.iterdir()) == ["step-000004", "step-000008"]
    (ckpts / ".step-000012.tmp-left-by-a-kill").mkdir()  # a save interrupted half-way

    _run(out, "--resume")
    a, b = _weights(ref), _weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not (ckpts / ".step-000012.tmp-left-by-a-kill").exists()
    # the metrics file tells one uninterrupted story: steps 9-10 (run twice) appear once
    def story(run):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["split"], r["loss"]) for r in rows]

    assert story(out) == story(ref)


@pytest.mark.slow
@pytest.mark.parametrize("top_k", [0, 8])  # 8: each process fills its own teacher cache
def test_two_cpu_processes_match_one(tmp_path, top_k):
    one, two = tmp_path / "one", tmp_path / "two"
    # the same global batch of 4 blocks: 1 process x 2 micro-batches of 2, or 2 processes x 1 of 2
    _run(one, "--batch-size", 2, "--grad-accum", 2, "--dropout", 0, "--teacher-top-k", top_k)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", CHILD, str(two),
           "--batch-size", 2, "--grad-accum", 1, "--dropout", 0, "--teacher-top-k", top_k]
    r = subprocess.run(list(map(str, cmd)), env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("done steps=12") == 2  # both ranks finished
    a, b = _weights(one), _weights(two)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), (k, (a[k] - b[k]).abs().max())
    la = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], x["split"]) for x in la] == [(x["step"], x["split"]) for x in lb]  # one writer, not two
    for x, y in zip(la, lb):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["tokens"] == y["tokens"]
