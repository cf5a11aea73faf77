"""Parameter accounting: the paper's numbers from config.json alone, and the report formats."""

import json

import pytest
from transformers import Phi3Config

import gpconv
from gpconv import GPConvConfig, shrink
from gpconv.surgery import count_parameters
from gpconv.hub import build_meta
from gpconv.surgery import describe


def phi3_mini_config(**kw):
    """microsoft/Phi-3-mini-4k-instruct's config.json values (no download needed)."""
    base = dict(
        vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
        original_max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=32000, pad_token_id=32000, sliding_window=2047,
    )
    base.update(kw)
    return Phi3Config(**base)


@pytest.mark.parametrize(
    "layers, intermediate, shrunk, expected",
    [
        (2, 8192, False, 226_507_776),  # JP47D54C, dense
        (2, 9216, True, 35_011_584),  # JP47D55C
        (3, 9216, True, 52_515_840),  # JP47D56C
    ],
)
def test_paper_non_embedding_counts(layers, intermediate, shrunk, expected):
    model = build_meta(phi3_mini_config(num_hidden_layers=layers, intermediate_size=intermediate))
    assert all(p.is_meta for p in model.parameters())
    if shrunk:
        report = shrink(model, GPConvConfig(min_channels_per_group=256))
        assert report.after.non_embedding == expected
        assert count_parameters(model).non_embedding == expected
    else:
        assert count_parameters(model).non_embedding == expected


def test_full_phi3_mini_budget_on_meta():
    model = build_meta(phi3_mini_config())
    before = count_parameters(model)
    assert before.total == 3_821_079_552  # Phi-3-mini's published size
    assert before.embedding == 2 * 32064 * 3072  # embed_tokens + untied lm_head
    report = shrink(model, GPConvConfig(), dry_run=True)
    groups = {m.name.rsplit(".", 1)[-1]: m.groups for m in report.modules if ".layers.0." in m.name}
    assert groups == {"qkv_proj": 12, "o_proj": 12, "gate_up_proj": 8, "down_proj": 32}
    # per layer: qkv 2/12, o 2/12, gate_up 2/8, down 2/32 of dense
    per_layer = 3072 * 9216 // 6 + 3072 * 3072 // 6 + 3072 * 16384 // 4 + 8192 * 3072 // 16
    norms = 32 * 2 * 3072 + 3072
    assert report.after.non_embedding == 32 * per_layer + norms
    # FLOPs: 2 per multiply-add of every linear map, lm_head included
    assert report.before.linear_flops_per_token == 2 * (32 * 3072 * (9216 + 3072 + 16384 + 8192) + 3072 * 32064)


def test_report_formats_and_by_kind_totals():
    model = build_meta(phi3_mini_config(num_hidden_layers=2, intermediate_size=9216))
    report = shrink(model, GPConvConfig(min_channels_per_group=256))
    d = json.loads(report.to_json())
    assert d["after"]["non_embedding"] == 35_011_584
    kinds = d["totals_by_kind"]
    assert kinds["attention"]["kept_params"] == 2 * (3072 * 9216 // 6 + 3072 * 3072 // 6)
    assert kinds["mlp"]["kept_params"] == 2 * (3072 * 18432 // 6 + 9216 * 3072 // 16)
    assert sum(k["kept_params"] for k in kinds.values()) + 2 * 2 * 3072 + 3072 == 35_011_584
    assert len(d["modules"]) == 8 and {m["groups"] for m in d["modules"]} == {12, 32}
    md = report.to_markdown()
    assert "35,011,584" in md and "| model.layers.0.mlp.down_proj | mlp | 9216->3072 | io | 32 |" in md


def test_describe_lists_blocks_of_a_shrunk_model():
    model, _ = gpconv.load_model("tiny-phi3")
    shrink(model, GPConvConfig(min_channels_per_group=64, target_modules="mlp"))
    rep = describe(model)
    status = {m.name.rsplit(".", 1)[-1]: m.status for m in rep.modules}
    assert status == {"qkv_proj": "dense", "o_proj": "dense", "gate_up_proj": "already", "down_proj": "already"}
    assert rep.before == rep.after == count_parameters(model)


def test_meta_build_ties_embeddings_like_the_loaded_model():
    from tiny_models import FAMILIES

    loaded = FAMILIES["llama-tied"][0]()
    meta = build_meta(loaded.config)
    assert meta.get_output_embeddings().weight is meta.get_input_embeddings().weight
    assert count_parameters(meta) == count_parameters(loaded)
