"""--report-to: accelerate's trackers get the rows of the metrics log (TensorBoard, offline);
the distributed / report_to options are checked before any work."""

import importlib.util
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import gpconv
from gpconv import GPConvConfig, GPConvError, TrainConfig, build_datasets, distill, shrink
from gpconv.hub import tiny_phi3
from gpconv.recovery import trackers
from gpconv.recovery.fsdp import decoder_layers, wants_fsdp
from test_train import data  # noqa: F401  (the same small instruction data, a module fixture)

SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def _scalars(run_dir):
    events = list((run_dir / "tensorboard" / trackers.PROJECT).glob("events.out.tfevents.*"))
    assert events, sorted(p.name for p in run_dir.rglob("*"))
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_gets_the_logged_rows(tmp_path, data):
    tr, va, tok = data
    teacher, _ = tiny_phi3(seed=1, **SMALL)
    student, _ = tiny_phi3(seed=1, **SMALL)
    shrink(student, GPConvConfig(min_channels_per_group=16, init="project"))
    out = tmp_path / "run"
    cfg = TrainConfig(out_dir=str(out), max_steps=6, batch_size=4, lr=3e-3, progress=False, log_every=2, eval_every=3,
                      save_every=0, report_to="tensorboard")
    distill(student, teacher, tr, cfg, val_data=va)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    got = _scalars(out)
    for split, names in (("train", ("loss", "kl", "lr", "grad_norm", "tokens", "tokens_per_s")),
                         ("val", ("loss", "perplexity", "accuracy"))):
        for name in names:
            want = [(r["step"], r[name]) for r in rows if r["split"] == split]
            assert [s for s, _ in got[f"{split}/{name}"]] == [s for s, _ in want], name
            # TensorBoard keeps float32
            assert [v for _, v in got[f"{split}/{name}"]] == pytest.approx([v for _, v in want], rel=1e-6), name
    assert [s for s, _ in got["train/loss"]] == [2, 4, 6] and [s for s, _ in got["val/loss"]] == [0, 3, 6]


def test_report_to_is_checked_before_work(tmp_path, monkeypatch):
    with pytest.raises(GPConvError, match="unknown tracker 'mlflow'"):
        TrainConfig(out_dir=str(tmp_path), report_to="tensorboard,mlflow")
    with pytest.raises(GPConvError, match="needs out_dir"):
        TrainConfig(report_to="tensorboard")
    assert TrainConfig(report_to="none").trackers == ()
    assert TrainConfig(out_dir="x", report_to=" TensorBoard ,tensorboard").trackers == ("tensorboard",)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(GPConvError, match="report_to wandb needs the wandb package: pip install wandb"):
        TrainConfig(out_dir=str(tmp_path), report_to="wandb")  # as if wandb were not installed


def test_distributed_modes(monkeypatch):
    with pytest.raises(GPConvError, match="unknown distributed mode 'zero3'"):
        TrainConfig(distributed="zero3")
    assert not wants_fsdp("fsdp", 1)  # one process: nothing to shard over
    assert wants_fsdp("fsdp", 2) and not wants_fsdp("ddp", 2) and not wants_fsdp("auto", 2)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for an FSDP config
    assert wants_fsdp("auto", 2)
    model, _ = tiny_phi3(seed=0, num_hidden_layers=3, **SMALL)
    layers = decoder_layers(model)
    assert layers == list(model.model.layers)  # the FSDP units: one per decoder layer (+ the root)
