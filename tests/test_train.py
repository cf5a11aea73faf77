"""Recovery training in one process: what trains, losses, guard rails, checkpoints, logs."""

import json
import math

import pytest
import torch
from torch import nn

import gpconv
from gpconv import GPConvConfig, GPConvError, TrainConfig, build_datasets, distill, shrink, train
from gpconv.recovery import TrainingDiverged
from gpconv.layers import is_gpconv_module
from gpconv.hub import tiny_phi3
from gpconv.recovery import BatchPlan

SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)
VOCAB = 320  # tiny-phi3's (byte tokenizer, 262 tokens, rounded up)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    words = "apple pear plum fig kiwi lime date lemon".split()
    rows = [{"instruction": f"Repeat {words[i % 8]}", "response": " ".join([words[i % 8]] * (1 + i % 3))} for i in range(40)]
    f = tmp_path_factory.mktemp("data") / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    tok = gpconv.hub.byte_tokenizer()
    tr, va = build_datasets(str(f), tok, block_size=32, val_size=6)
    return tr, va, tok


def _pair(mcpg=16, targets="all-linear"):
    teacher, tok = tiny_phi3(seed=1, **SMALL)
    student, _ = tiny_phi3(seed=1, **SMALL)
    shrink(student, GPConvConfig(min_channels_per_group=mcpg, init="project", target_modules=targets))
    return student, teacher


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _cfg(**kw):
    base = dict(max_steps=6, batch_size=4, lr=3e-3, progress=False, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


def test_train_loss_goes_down(data):
    tr, va, tok = data
    model, _ = tiny_phi3(seed=0, **SMALL)
    res = train(model, tr, _cfg(max_steps=30, lr=1e-2))
    losses = [r["loss"] for r in res.history if r["split"] == "train"]
    assert losses[-1] < 0.6 * losses[0]
    assert res.tokens == 30 * 4 * 32 and res.model is model
    assert not model.training  # handed back in eval mode


def test_distill_trains_only_blocks_and_never_the_teacher(data):
    tr, va, tok = data
    student, teacher = _pair()
    s0, t0 = _state(student), _state(teacher)
    res = distill(student, teacher, tr, _cfg(), val_data=va, tokenizer=tok, teacher_tokenizer=tok)
    blocks = {n for n, m in student.named_modules() if is_gpconv_module(m)}
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, s0[k])}
    assert changed and all(any(k.startswith(b + ".") for b in blocks) for k in changed)
    assert any(k.endswith(".weight") for k in changed)
    assert all(torch.equal(v, t0[k]) for k, v in teacher.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    kl = [r["kl"] for r in res.history if r["split"] == "train"]
    assert kl[-1] < kl[0]
    vals = [r for r in res.history if r["split"] == "val"]
    assert [r["step"] for r in vals] == [0, 6] and res.val["loss"] == vals[-1]["loss"]


def test_train_all_updates_everything(data):
    tr, _, _ = data
    model, _ = tiny_phi3(seed=0, **SMALL)
    s0 = _state(model)
    train(model, tr, _cfg(max_steps=2))
    assert all(not torch.equal(v, s0[k]) for k, v in model.state_dict().items() if k.endswith("weight"))


def test_lora_mode_adapts_dense_layers_and_trains_blocks(data, tmp_path):
    tr, _, tok = data
    student, teacher = _pair(targets="mlp")  # attention stays dense: LoRA goes there
    s0 = _state(student)
    res = distill(student, teacher, tr, _cfg(train="lora", lora_r=4, out_dir=str(tmp_path / "run")), tokenizer=tok)
    assert res.model is student
    assert not any("lora" in n for n, _ in student.named_modules())  # merged back
    now = student.state_dict()
    assert set(now) == set(s0)
    assert not torch.equal(now["model.layers.0.self_attn.qkv_proj.weight"], s0["model.layers.0.self_attn.qkv_proj.weight"])
    assert not torch.equal(now["model.layers.0.mlp.down_proj.weight"], s0["model.layers.0.mlp.down_proj.weight"])
    for k in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(now[k], s0[k])
    reloaded = gpconv.from_pretrained(tmp_path / "run")
    ids = tr.input_ids[:2]
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, student(ids).logits, atol=1e-5)


def test_lora_needs_dense_layers(data):
    tr, _, _ = data
    student, teacher = _pair()  # every linear layer is a block
    with pytest.raises(GPConvError, match="no dense Linear"):
        distill(student, teacher, tr, _cfg(train="lora"))


def test_grouped_needs_blocks(data):
    tr, _, _ = data
    teacher, _ = tiny_phi3(seed=1, **SMALL)
    dense, _ = tiny_phi3(seed=2, **SMALL)
    with pytest.raises(GPConvError, match="no gpconv blocks"):
        distill(dense, teacher, tr, _cfg())


class ByteMLP(nn.Module):
    """A non-transformers causal model over the byte vocabulary (logits out)."""

    def __init__(self, d=64, nan_after=None):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.head = nn.Linear(d, VOCAB, bias=False)
        self.calls, self.nan_after = 0, nan_after

    def forward(self, ids):
        self.calls += 1
        h = self.embed(ids)
        h = h + self.down(torch.relu(self.up(h)))
        out = self.head(h)
        if self.nan_after is not None and self.training and self.calls > self.nan_after:
            out = out * float("nan")
        return out


def test_any_module_student(data):
    tr, va, tok = data
    teacher, _ = tiny_phi3(seed=1, **SMALL)
    student = ByteMLP()
    shrink(student, GPConvConfig(min_channels_per_group=16, init="random"))
    res = distill(student, teacher, tr, _cfg(max_steps=10, lr=1e-2), val_data=va)
    kl = [r["kl"] for r in res.history if r["split"] == "train"]
    assert kl[-1] < kl[0]
    with pytest.raises(GPConvError, match="hidden-state loss needs a transformers model"):
        distill(student, teacher, tr, _cfg(hidden_weight=1.0))


def test_vocab_mismatch_is_refused(data):
    tr, _, tok = data
    teacher, _ = tiny_phi3(seed=1, vocab_size=384, **SMALL)
    student, _ = _pair()
    with pytest.raises(GPConvError, match="same vocabulary"):
        distill(student, teacher, tr, _cfg())
    other = gpconv.hub.byte_tokenizer()
    other.add_tokens(["<|extra|>"])
    with pytest.raises(GPConvError, match="tokenizers differ"):
        distill(student, tiny_phi3(seed=1, **SMALL)[0], tr, _cfg(), tokenizer=tok, teacher_tokenizer=other)


def test_hidden_state_loss(data):
    tr, _, _ = data
    student, teacher = _pair()
    res = distill(student, teacher, tr, _cfg(max_steps=4, kl_weight=0.0, hidden_weight=1.0))
    err = [r["hidden"] for r in res.history if r["split"] == "train"]
    assert err[0] > 0 and err[-1] < err[0]
    assert all(r["loss"] == pytest.approx(r["hidden"]) for r in res.history if r["split"] == "train")


def test_nan_loss_stops_and_keeps_last_checkpoint(data, tmp_path):
    tr, _, _ = data
    model = ByteMLP(nan_after=5)  # step 6 (1 micro-batch per step) goes NaN
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="loss is nan at step 6") as e:
        train(model, tr, _cfg(max_steps=10, save_every=2, out_dir=str(out)))
    assert "step-000004" in str(e.value)
    assert torch.isfinite(model.head.weight).all()  # the bad step was never applied
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-000002", "step-000004"]
    assert not (out / "gpconv.json").exists() and not (out / "model.safetensors").exists()


def test_gradient_checkpointing_same_result(data):
    tr, _, _ = data
    a, teacher = _pair()
    b, _ = _pair()
    distill(a, teacher, tr, _cfg(max_steps=2))
    distill(b, teacher, tr, _cfg(max_steps=2, gradient_checkpointing=True))
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(va, vb, atol=1e-6), k


def test_batch_plan_splits_the_global_batch_across_processes(data):
    tr = data[0]
    one = BatchPlan(tr, batch_size=2, grad_accum=2, world=1, rank=0, seed=5)
    r0 = BatchPlan(tr, batch_size=2, grad_accum=1, world=2, rank=0, seed=5)
    r1 = BatchPlan(tr, batch_size=2, grad_accum=1, world=2, rank=1, seed=5)
    steps = range(0, 2 * len(tr) // 4 + 3)  # crosses epochs
    seen = []
    for s in steps:
        (a_ids, _), (b_ids, _) = one.micro_batches(s)
        assert torch.equal(a_ids, r0.micro_batches(s)[0][0]) and torch.equal(b_ids, r1.micro_batches(s)[0][0])
        seen.append(torch.cat([a_ids, b_ids]))
    first_epoch = torch.cat(seen)[: len(tr)]
    assert sorted(map(tuple, first_epoch.tolist())) == sorted(map(tuple, tr.input_ids.tolist()))  # each block once


def test_run_dir_metrics_plot_and_reload(data, tmp_path):
    tr, va, tok = data
    student, teacher = _pair()
    out = tmp_path / "run"
    res = distill(student, teacher, tr, _cfg(max_steps=5, save_every=2, keep_checkpoints=1, log_every=2,
                                              metrics_format="csv", eval_every=2, out_dir=str(out)),
                  val_data=va, tokenizer=tok)
    assert (out / "loss.png").stat().st_size > 1000
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000004"]
    rows = gpconv.recovery.trainlog.MetricsLog.read(out / "metrics.csv")
    assert [(r["step"], r["split"]) for r in rows] == [(0, "val"), (2, "train"), (2, "val"), (4, "train"), (4, "val"),
                                                       (5, "train"), (5, "val")]
    assert all(r["tokens_per_s"] > 0 for r in rows if r["split"] == "train")
    assert json.loads((out / "train_config.json").read_text())["train"] == "grouped"
    loaded = gpconv.from_pretrained(out)
    assert gpconv.evaluate(loaded, va)["loss"] == pytest.approx(res.val["loss"], rel=1e-5)
    with pytest.raises(GPConvError, match="not empty"):
        distill(student, teacher, tr, _cfg(out_dir=str(out)))
    with pytest.raises(GPConvError, match="nothing to resume"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "x").write_text("x")
        distill(student, teacher, tr, _cfg(out_dir=str(tmp_path / "other"), resume=True))


def test_resume_in_process_continues_exactly(data, tmp_path):
    """The in-process sibling of the SIGKILL test: stop at step 4 of 8 by an exception, resume."""
    tr, _, tok = data
    ref, teacher = _pair()
    distill(ref, teacher, tr, _cfg(max_steps=8))

    class Stop(Exception):
        pass

    def stop(step, row):
        if step == 5:
            raise Stop

    out = str(tmp_path / "run")
    a, _ = _pair()
    with pytest.raises(Stop):
        distill(a, teacher, tr, _cfg(max_steps=8, save_every=4, out_dir=out), callbacks=[stop])
    b, _ = _pair()
    res = distill(b, teacher, tr, _cfg(max_steps=8, save_every=4, out_dir=out, resume=True))
    assert res.steps == 8
    for (k, x), y in zip(ref.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k
    with pytest.raises(GPConvError, match="global_batch"):
        c, _ = _pair()
        distill(c, teacher, tr, _cfg(max_steps=8, batch_size=2, save_every=4, out_dir=out, resume=True))


def test_streaming_training_needs_max_steps(data, tmp_path):
    _, _, tok = data
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"line {i} " * 5}) for i in range(20)))
    tr, _ = build_datasets(str(f), tok, block_size=16, val_size=2, streaming=True)
    model, _ = tiny_phi3(seed=0, **SMALL)
    with pytest.raises(GPConvError, match="max_steps"):
        train(model, tr, _cfg(max_steps=None))
    res = train(model, tr, _cfg(max_steps=12, batch_size=4))  # > one pass: the stream restarts
    assert res.steps == 12


def test_config_is_validated():
    with pytest.raises(GPConvError, match="train mode"):
        TrainConfig(train="some")
    with pytest.raises(GPConvError, match="not all 0"):
        TrainConfig(kl_weight=0.0)
    with pytest.raises(GPConvError, match="resume needs out_dir"):
        TrainConfig(resume=True)


@pytest.mark.parametrize("masked", [False, True])
def test_hidden_error_is_relative_per_token_and_scale_free(masked):
    from gpconv.recovery.losses import loss_sums

    torch.manual_seed(0)
    B, T, H, V, L = 2, 5, 8, 11, 3
    labels = torch.randint(0, V, (B, T))
    if masked:
        labels[:, :3] = -100  # response-only: few counted positions take the sparse route
    ht = tuple(torch.randn(B, T, H) * (10.0 ** torch.arange(T)).view(1, T, 1) for _ in range(L + 1))  # token scales 1 .. 1e4
    hs = tuple(h + 0.1 * torch.randn(B, T, H) * h.norm(dim=-1, keepdim=True) / H**0.5 for h in ht)
    logits = torch.randn(B, T, V)
    got = loss_sums(logits, labels, None, hs, ht).hidden
    # by hand: position t counts when label t+1 is not -100
    keep = torch.zeros(B, T, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    want = sum(((s - t).pow(2).sum(-1) / t.pow(2).sum(-1))[keep].sum() for s, t in zip(hs[1:], ht[1:])) / L
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    # every token weighs alike, whatever its scale: the error is ~0.1^2 per token
    assert got.item() / int(keep.sum()) == pytest.approx(0.01, rel=0.3)
    scaled = loss_sums(logits, labels, None, tuple(1e3 * h for h in hs), tuple(1e3 * h for h in ht)).hidden
    assert scaled.item() == pytest.approx(got.item(), rel=1e-4)


@pytest.mark.parametrize("scale", [0.25, 3.0])
def test_grouped_lr_scale_moves_only_grouped_weights_faster(scale):
    """Adam's first step moves each weight by ~lr (g / |g|), so per parameter kind the step size
    shows the learning rate it got: grouped weights lr * scale, low-rank factors and biases lr."""
    from gpconv.recovery.trainable import make_optimizer as _optimizer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 32))
    shrink(model, GPConvConfig(target_modules=["0", "1"], variant="hybrid", rank=0.25, min_channels_per_group=8))
    params = dict(model.named_parameters())
    kinds = {"weight": [n for n, p in params.items() if p.dim() == 3],
             "lowrank": [n for n in params if "lowrank" in n], "bias": [n for n in params if n.endswith("bias")]}
    assert all(kinds.values()), kinds
    lr = 1e-3
    opt = _optimizer(model, TrainConfig(lr=lr, grouped_lr_scale=scale))
    before = {n: p.detach().clone() for n, p in params.items()}
    for p in params.values():
        p.grad = torch.randn_like(p)
    opt.step()
    step = {n: (params[n].detach() - before[n]).abs().mean().item() for n in params}
    for n in kinds["weight"]:
        assert step[n] == pytest.approx(lr * scale, rel=1e-3), n
    for n in kinds["lowrank"] + kinds["bias"]:
        assert step[n] == pytest.approx(lr, rel=1e-3), n
    with pytest.raises(GPConvError, match="grouped_lr_scale"):
        TrainConfig(grouped_lr_scale=-0.5)


def test_grouped_lr_scale_zero_freezes_grouped_weights(data):
    tr, va, _ = data
    teacher, _ = tiny_phi3(seed=1, **SMALL)
    student, _ = tiny_phi3(seed=1, **SMALL)
    shrink(student, GPConvConfig(min_channels_per_group=16, variant="hybrid", rank=0.25, init="project"))
    before = _state(student)
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    distill(student, teacher, tr, _cfg(max_steps=3, grouped_lr_scale=0))
    after = student.state_dict()
    grouped = [n for n, p in student.named_parameters() if p.dim() == 3]
    lowrank = [n for n in after if "lowrank" in n]
    assert grouped and lowrank
    assert all(torch.equal(before[n], after[n]) for n in grouped)  # frozen: exactly as initialised
    assert all(not torch.equal(before[n], after[n]) for n in lowrank)  # the low-rank factors trained
    assert {n: p.requires_grad for n, p in student.named_parameters()} == flags  # flags handed back

    # pure io blocks without biases (Phi-3): freezing their weights leaves nothing to train in grouped mode
    plain, _ = _pair()
    with pytest.raises(GPConvError, match="nothing else would train"):
        distill(plain, teacher, tr, _cfg(max_steps=1, grouped_lr_scale=0))


def test_runs_of_different_precision_in_one_process(data):
    # accelerate's process-wide state refused a second run with another mixed precision
    # ("restart your runtime"); each run is independent, so fp32 then bf16 then fp32 all train
    tr, va, _ = data
    for precision in ("fp32", "bf16", "fp32"):
        student, teacher = _pair()
        res = distill(student, teacher, tr, _cfg(max_steps=2, precision=precision))
        assert res.steps == 2 and all(math.isfinite(h["loss"]) for h in res.history if "loss" in h)
