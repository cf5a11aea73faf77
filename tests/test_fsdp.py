"""FSDP2 on CPU (gloo), 2 processes under torchrun: the same losses and weights as one process;
a sharded run SIGKILLed mid-way resumes from its DCP checkpoint to the uninterrupted result.
The run itself is tests/recovery_child.py."""

import contextlib
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

import gpconv
from gpconv.errors import GPConvError
from gpconv.recovery.sharded_checkpoints import _MetadataUnpickler

CHILD = str(Path(__file__).with_name("recovery_child.py"))
FSDP_ARGS = ["--batch-size", 2, "--grad-accum", 1, "--dropout", 0, "--distributed", "fsdp"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _torchrun(out, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", CHILD, str(out),
            *map(str, args)]


def _run(cmd, timeout=240):
    r = subprocess.run(list(map(str, cmd)), env=_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _story(run):
    rows = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["split"], r["loss"]) for r in rows]


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """One uninterrupted 2-process FSDP run (12 steps, checkpoints every 4)."""
    out = tmp_path_factory.mktemp("fsdp") / "two"
    r = _run(_torchrun(out, *FSDP_ARGS))
    assert r.stderr.count("done steps=12") == 2  # both ranks finished
    return out


@pytest.mark.slow
def test_fsdp_two_processes_match_one(tmp_path, sharded_run):
    one = tmp_path / "one"
    # the same global batch of 4 blocks: 1 process x 2 micro-batches of 2, or 2 processes x 1 of 2
    _run([sys.executable, CHILD, one, "--batch-size", 2, "--grad-accum", 2, "--dropout", 0])
    a, b = load_file(str(one / "model.safetensors")), load_file(str(sharded_run / "model.safetensors"))
    assert a.keys() == b.keys()
    # tolerance: the sums of gradients and norms are taken in another order (reduce-scatter
    # over gloo); on this test they come out bitwise equal, 1e-6 leaves room for other kernels
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), (k, (a[k] - b[k]).abs().max())
    la, lb = _story(one), _story(sharded_run)
    assert [x[:2] for x in la] == [x[:2] for x in lb]  # one writer, every step and validation
    for x, y in zip(la, lb):
        assert x[2] == pytest.approx(y[2], rel=1e-5), (x, y)
    # a sharded checkpoint: DCP shards (one file per process), no pickled optimizer, no safetensors of the weights
    ckpt = sharded_run / "checkpoints" / "step-000008"
    assert sorted(p.name for p in (ckpt / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (ckpt / "optimizer.pt").exists() and not (ckpt / "trainable.safetensors").exists()
    assert json.loads((ckpt / "state.json").read_text())["step"] == 8
    # the final model is a normal gpconv checkpoint
    model = gpconv.from_pretrained(sharded_run)
    assert torch.equal(model.state_dict()["model.layers.0.mlp.down_proj.weight"], b["model.layers.0.mlp.down_proj.weight"])


@pytest.mark.slow
def test_fsdp_lora_matches_one_process(tmp_path):
    """LoRA on the attention's dense layers, the MLP's grouped blocks fully: trainable and frozen
    parameters in the same FSDP units; merged at the end."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["--train", "lora", "--targets", "mlp", "--steps", 4, "--dropout", 0]
    _run([sys.executable, CHILD, one, "--batch-size", 2, "--grad-accum", 2, *args])
    _run(_torchrun(two, *FSDP_ARGS, *args))
    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert a.keys() == b.keys() and not any("lora" in k for k in a)  # merged
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), (k, (a[k] - b[k]).abs().max())
    for x, y in zip(_story(one), _story(two), strict=True):
        assert x[:2] == y[:2] and x[2] == pytest.approx(y[2], rel=1e-5)


def _ranks_of(out) -> list[int]:
    """PIDs of the training ranks writing to ``out`` (from /proc: torchrun starts each rank in a
    session of its own, so killing torchrun's process group does not reach them)."""
    needle, pids = str(out).encode(), []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if b"recovery_child" in cmd and needle + b"\0" in cmd:
            pids.append(int(d.name))
    return pids


def _kill_ranks(out) -> None:
    """SIGKILL the ranks as well (a machine losing power loses them too) and wait until they are
    gone, so that the resumed run is the only writer of ``out``."""
    deadline = time.time() + 30
    while pids := _ranks_of(out):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert time.time() < deadline, f"ranks {pids} outlived SIGKILL"
        time.sleep(0.1)


@pytest.mark.slow
def test_fsdp_sigkill_then_resume_matches_uninterrupted(tmp_path, sharded_run):
    out = tmp_path / "killed"
    log = (tmp_path / "child.log").open("w")  # a file, not a pipe: a full pipe would block the child
    # a session of its own for torchrun; its ranks have their own sessions (killed by _kill_ranks)
    p = subprocess.Popen(list(map(str, _torchrun(out, *FSDP_ARGS, "--pause-at", 10))), env=_env(),
                         stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    marker = Path(str(out) + ".paused")
    deadline = time.time() + 240
    try:
        while not marker.exists():
            assert p.poll() is None, (tmp_path / "child.log").read_text()[-3000:]
            assert time.time() < deadline, "the run never reached step 10"
            time.sleep(0.05)
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # mid-run: after step 10, checkpoints at 4 and 8 on disk
        p.wait(timeout=30)
        _kill_ranks(out)
        log.close()
    assert not (out / "model.safetensors").exists()
    ckpts = out / "checkpoints"
    assert sorted(x.name for x in ckpts.iterdir()) == ["step-000004", "step-000008"]
    (ckpts / ".step-000012.tmp-sharded").mkdir()  # a save interrupted half-way

    _run(_torchrun(out, *FSDP_ARGS, "--resume"))
    assert not (ckpts / ".step-000012.tmp-sharded").exists()
    # steps 9-12 ran again after the resume: the same losses and validation as the uninterrupted run
    assert _story(out) == _story(sharded_run)
    a, b = load_file(str(out / "model.safetensors")), load_file(str(sharded_run / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    gpconv.from_pretrained(out)


@pytest.mark.slow
def test_accelerate_launch_with_the_documented_fsdp_config(tmp_path, sharded_run):
    """The YAML a user writes (accelerate config): distributed 'auto' shards, the same run results."""
    out = tmp_path / "acc"
    config = Path(__file__).resolve().parent.parent / "examples" / "accelerate" / "fsdp_cpu.yaml"
    _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, CHILD, out,
          "--batch-size", 2, "--grad-accum", 1, "--dropout", 0, "--report-to", "tensorboard"])  # no --distributed: auto
    assert (out / "checkpoints" / "step-000008" / "sharded").is_dir()
    a, b = load_file(str(out / "model.safetensors")), load_file(str(sharded_run / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the trackers with 2 processes: the main one writes, and the run still ends in its process group
    events = EventAccumulator(str(out / "tensorboard" / "gpconv"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 13))
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([x[2] for x in _story(out) if x[1] == "train"])


@pytest.mark.slow
def test_resuming_a_sharded_run_unsharded_is_refused(sharded_run, tmp_path):
    run = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(sharded_run), str(run)], check=True)
    (run / "model.safetensors").unlink()
    r = subprocess.run([sys.executable, CHILD, str(run), "--resume", "--batch-size", "4", "--grad-accum", "1", "--dropout", "0"],
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "was written by an FSDP run; resume it with --distributed fsdp" in r.stderr


class Evil:
    def __reduce__(self):
        return (os.system, ("true",))


def test_dcp_index_unpickler_refuses_other_objects():
    with pytest.raises(GPConvError, match="never does"):
        _MetadataUnpickler(io.BytesIO(pickle.dumps(Evil()))).load()
    assert _MetadataUnpickler(io.BytesIO(pickle.dumps({"shape": torch.Size([2, 3]), "dtype": torch.bfloat16}))).load() == \
        {"shape": torch.Size([2, 3]), "dtype": torch.bfloat16}


@pytest.mark.slow
def test_cli_train_under_torchrun_fsdp(tmp_path):
    """`gpconv train` (cross-entropy, no teacher) sharded over 2 CPU processes from the command
    line, with TensorBoard: a sharded checkpoint, a loadable model, the events of every logged row."""
    words = "apple pear plum fig kiwi lime date lemon".split()
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"Repeat {words[i % 8]}", "response": words[i % 8]}) for i in range(40)))
    out = tmp_path / "run"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 2, "-m", "gpconv_cli", "train",
          "tiny-phi3", "--data", data, "--out", out, "--max-steps", 4, "--batch-size", 2, "--block-size", 32,
          "--save-every", 2, "--log-every", 1, "--distributed", "fsdp", "--report-to", "tensorboard", "--no-progress"])
    assert (out / "checkpoints" / "step-000002" / "sharded" / ".metadata").is_file()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_loss = [r["loss"] for r in rows if r["split"] == "train"]
    events = EventAccumulator(str(out / "tensorboard" / "gpconv"))
    events.Reload()
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(train_loss)
    model = AutoModelForCausalLM.from_pretrained(out)  # a dense model trained: a plain transformers checkpoint
    saved = load_file(str(out / "model.safetensors"))
    assert torch.equal(model.state_dict()["lm_head.weight"], saved["lm_head.weight"])
