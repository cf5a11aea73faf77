"""examples/ keep working: each is imported from its file and run at a tiny size."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def test_parallel_stacks_shrink_train_save_load(tmp_path):
    ex = load("parallel_stacks")
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    out = ex.main(["--d-model", "64", "--stacks", "2", "--layers", "2", "--heads", "2", "-m", "8", "--steps", "8",
                   "--block-size", "32", "--batch-size", "4", "--data", str(text), "--out", str(tmp_path / "m"), "--quiet"])
    rep = out["report"]
    # every Linear of both stacks became a block (in_proj + 4 per layer, 2 layers, 2 stacks); lm_head stayed
    assert len(rep.replaced) == 2 * (1 + 2 * 4)
    assert all(not m.name.startswith("lm_head") for m in rep.replaced)
    assert rep.after.non_embedding < rep.before.non_embedding / 2
    losses = [r["loss"] for r in out["train"].history if r["split"] == "train"]
    assert losses[-1] < losses[0]
    assert out["reloaded_identical"] and out["files"] == ["gpconv.json", "model.safetensors"]


def test_parallel_stacks_concatenates_stack_outputs():
    ex = load("parallel_stacks")
    cfg = ex.StackConfig(d_model=32, stacks=4, layers_per_stack=1, heads_per_stack=1)
    model = ex.ParallelStackLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 5))
    assert model(ids).shape == (1, 5, cfg.vocab_size)
    # causal: a later token never changes earlier logits
    ids2 = ids.clone()
    ids2[0, -1] = (ids[0, -1] + 1) % cfg.vocab_size
    with torch.no_grad():
        assert torch.allclose(model(ids)[0, :-1], model(ids2)[0, :-1], atol=1e-6)
