"""Save / load / densify: identical logits, atomic writes, no pickle."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import gpconv
from gpconv import GPConvConfig, GPConvError, shrink
from gpconv.fsutil import atomic_dir
from tiny_models import FAMILIES, MCPG, VOCAB, TinyMLPLM


def _ids():
    return torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))


def _logits(m, ids):
    with torch.no_grad():
        return m(ids).logits


@pytest.mark.parametrize("family", ["phi3", "llama-tied", "gpt2", "qwen2"])
@pytest.mark.parametrize("variant", ["io", "chained"])
def test_roundtrip_identical_logits(tmp_path, family, variant):
    model = FAMILIES[family][0]()
    shrink(model, GPConvConfig(min_channels_per_group=MCPG, variant=variant, init="project"))
    ids = _ids()
    ref = _logits(model, ids)
    gpconv.save_pretrained(model, tmp_path / "ckpt")

    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    plan = cfg["gpconv"]["modules"]
    assert plan == {n: m.spec.to_dict() for n, m in model.named_modules() if gpconv.layers.is_gpconv_module(m)}
    assert all(v["variant"] == variant for v in plan.values())
    assert not list((tmp_path / "ckpt").glob("*.bin"))  # safetensors only

    loaded = gpconv.from_pretrained(tmp_path / "ckpt")
    assert type(loaded) is type(model)
    assert torch.equal(_logits(loaded, ids), ref)
    assert not any(p.is_meta for p in loaded.parameters())
    if FAMILIES[family][2]:
        assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight

    # transformers itself, through the generated modeling file
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", trust_remote_code=True)
    assert torch.equal(_logits(hf, ids), ref)


def test_loader_builds_on_meta_without_dense_weights(tmp_path, monkeypatch):
    model = FAMILIES["llama"][0]()
    shrink(model, GPConvConfig(min_channels_per_group=MCPG))
    gpconv.save_pretrained(model, tmp_path / "c")
    # every nn.Linear the loader constructs must live on the meta device
    real_init = torch.nn.Linear.__init__
    devices = []

    def spy(self, *a, **kw):
        real_init(self, *a, **kw)
        devices.append(self.weight.device.type)

    monkeypatch.setattr(torch.nn.Linear, "__init__", spy)
    gpconv.from_pretrained(tmp_path / "c")
    assert devices and set(devices) == {"meta"}


def test_sharded_save_and_dtype(tmp_path):
    model = FAMILIES["phi3"][0]()
    shrink(model, GPConvConfig(min_channels_per_group=MCPG))
    gpconv.save_pretrained(model, tmp_path / "s", max_shard_size="50KB")
    assert (tmp_path / "s" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "s").glob("*.safetensors"))) > 1
    ids = _ids()
    loaded = gpconv.from_pretrained(tmp_path / "s")
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    bf = gpconv.from_pretrained(tmp_path / "s", dtype="bfloat16")
    assert {p.dtype for p in bf.parameters()} == {torch.bfloat16}


def test_densify_gives_a_plain_checkpoint(tmp_path):
    for family in ("phi3", "gpt2"):
        model = FAMILIES[family][0]()
        shrink(model, GPConvConfig(min_channels_per_group=MCPG, init="project"))
        ids = _ids()
        ref = _logits(model, ids)
        gpconv.save_pretrained(model, tmp_path / family)
        from gpconv.hub import densify_dir

        densify_dir(tmp_path / family, tmp_path / f"{family}-dense")
        cfg = json.loads((tmp_path / f"{family}-dense" / "config.json").read_text())
        assert "gpconv" not in cfg and "auto_map" not in cfg
        assert not (tmp_path / f"{family}-dense" / "modeling_gpconv.py").exists()
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / f"{family}-dense")  # no gpconv, no remote code
        assert not any(gpconv.layers.is_gpconv_module(m) for m in plain.modules())
        torch.testing.assert_close(_logits(plain, ids), ref, atol=1e-5, rtol=1e-5)


def test_existing_output_dir_refused_unless_overwrite(tmp_path):
    model = FAMILIES["phi3"][0]()
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(GPConvError, match="not empty"):
        gpconv.save_pretrained(model, out)
    assert os.listdir(out) == ["keep.txt"]
    gpconv.save_pretrained(model, out, overwrite=True)
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["o"]  # no temp dirs left behind


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model = FAMILIES["phi3"][0]()

    def boom(*a, **kw):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(type(model), "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        gpconv.save_pretrained(model, tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_only_on_success(tmp_path):
    out = tmp_path / "d"
    with atomic_dir(out) as t:
        (t / "a").write_text("1")
    with pytest.raises(ValueError):
        with atomic_dir(out, overwrite=True) as t:
            (t / "b").write_text("2")
            raise ValueError
    assert sorted(p.name for p in out.iterdir()) == ["a"]


def test_loading_refuses_pickle_and_foreign_keys(tmp_path):
    model = FAMILIES["phi3"][0]()
    shrink(model, GPConvConfig(min_channels_per_group=MCPG))
    gpconv.save_pretrained(model, tmp_path / "c")
    # a pickle-only checkpoint is refused, never unpickled
    (tmp_path / "c" / "model.safetensors").rename(tmp_path / "c" / "pytorch_model.bin")
    with pytest.raises(GPConvError, match="no pickle"):
        gpconv.from_pretrained(tmp_path / "c")


def test_custom_module_save_and_load_into(tmp_path):
    model = TinyMLPLM()
    shrink(model, GPConvConfig(min_channels_per_group=MCPG, init="project"))
    ids = _ids()
    with torch.no_grad():
        ref = model(ids)
    gpconv.save_pretrained(model, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "gpconv.json").read_text())["modules"]
    fresh = gpconv.hub.load_into(TinyMLPLM(), tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(fresh(ids), ref)


def test_demo_model_roundtrip_with_tokenizer(tmp_path):
    model, tok = gpconv.load_model("tiny-phi3")
    shrink(model, GPConvConfig(min_channels_per_group=64))
    gpconv.save_pretrained(model, tmp_path / "d", tok)
    m2, tok2 = gpconv.load_model(str(tmp_path / "d"))
    assert tok2 is not None and tok2("hi")["input_ids"] == tok("hi")["input_ids"]
    ids = tok("Hello world", return_tensors="pt")["input_ids"]
    a = model.generate(ids, max_new_tokens=6, do_sample=False)
    b = m2.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)
