"""Surgery on tiny models of many families (peft's TEST_CASES style): invariants per family."""

import copy

import pytest
import torch
from torch import nn

import gpconv
from gpconv import GPConvConfig, GPConvError, shrink
from gpconv.surgery import count_parameters
from gpconv.layers import is_gpconv_module
from tiny_models import FAMILIES, MCPG, VOCAB, TinyMLPLM

CASES = sorted(FAMILIES)


def _ids(n=2, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, t), generator=g)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _numel(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("family", CASES)
@pytest.mark.parametrize("init", ["random", "project"])
def test_family_invariants(family, init):
    build, n_replaced, tied = FAMILIES[family]
    model = build()
    dense_before = count_parameters(model)
    report = shrink(model, GPConvConfig(min_channels_per_group=MCPG, init=init))

    # the model is still its own HF class, with blocks under the original names
    assert type(model) is type(build())
    assert len(report.replaced) == n_replaced
    for m in report.replaced:
        assert is_gpconv_module(model.get_submodule(m.name))
        # reported kept params == counted params of that module
        assert m.kept_params + (m.out_features if model.get_submodule(m.name).bias is not None else 0) == _numel(
            model.get_submodule(m.name)
        )

    # report counts == counted parameters
    unique = {id(p): p.numel() for p in model.parameters()}
    assert report.after.total == sum(unique.values()) == count_parameters(model).total
    assert report.before == dense_before
    saved = sum(m.dense_params - m.kept_params for m in report.replaced)
    assert report.before.total - report.after.total == saved
    assert report.after.embedding == report.before.embedding  # embeddings untouched
    out = model.get_output_embeddings()
    assert isinstance(out, nn.Linear)  # lm_head never touched by presets
    if tied:
        assert out.weight is model.get_input_embeddings().weight

    # grouped logits == densified model's logits
    ids = _ids()
    grouped = _logits(model, ids)
    dense_model = gpconv.densify(copy.deepcopy(model))
    assert not any(is_gpconv_module(m) for m in dense_model.modules())
    torch.testing.assert_close(_logits(dense_model, ids), grouped, atol=1e-5, rtol=1e-5)

    # cached greedy generation == uncached greedy generation
    prompt = ids[:1, :5]
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with_cache = model.generate(prompt, use_cache=True, **kw)
    without = model.generate(prompt, use_cache=False, **kw)
    assert with_cache.shape[1] == 5 + 8
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("family", ["phi3", "llama", "gpt2"])
def test_running_twice_changes_nothing(family):
    model = FAMILIES[family][0]()
    cfg = GPConvConfig(min_channels_per_group=MCPG, init="project")
    first = shrink(model, cfg)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    second = shrink(model, cfg)
    assert [m.status for m in second.modules] == ["already"] * len(first.replaced)
    assert second.before == second.after == first.after
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_project_init_is_closer_than_random():
    model = FAMILIES["llama"][0]()
    ids = _ids()
    ref = _logits(model, ids)
    errs = {}
    for init in ("random", "project"):
        m = copy.deepcopy(model)
        shrink(m, GPConvConfig(min_channels_per_group=MCPG, init=init))
        errs[init] = (_logits(m, ids) - ref).square().mean().item()
    assert errs["project"] < errs["random"]


def test_no_match_raises_and_leaves_model_untouched():
    model = FAMILIES["phi3"][0]()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    with pytest.raises(GPConvError, match=r"no module matched target_modules=\['nonexistent_proj', 'other'\]") as e:
        shrink(model, GPConvConfig(target_modules=["nonexistent_proj", "other"], min_channels_per_group=MCPG))
    assert "qkv_proj" in str(e.value)  # tells the user what the layers are called
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_failed_check_midway_leaves_model_untouched():
    # the second target is tied to the embeddings: refused before anything is replaced
    model = FAMILIES["llama-tied"][0]()
    types = [type(m) for m in model.modules()]
    with pytest.raises(GPConvError, match="tied"):
        shrink(model, GPConvConfig(target_modules=["q_proj", "lm_head"], min_channels_per_group=MCPG))
    assert [type(m) for m in model.modules()] == types


@pytest.mark.parametrize(
    "targets, expected_leaves",
    [
        ("attention", {"q_proj", "k_proj", "v_proj", "o_proj"}),
        ("mlp", {"gate_proj", "up_proj", "down_proj"}),
        (["q_proj", "down_proj"], {"q_proj", "down_proj"}),
        (r"model\.layers\.1\..*_proj", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
        ("o_proj", {"o_proj"}),  # a single name works as a suffix
    ],
)
def test_target_patterns(targets, expected_leaves):
    model = FAMILIES["llama"][0]()
    report = shrink(model, GPConvConfig(target_modules=targets, min_channels_per_group=MCPG))
    assert {m.name.rsplit(".", 1)[-1] for m in report.replaced} == expected_leaves
    if isinstance(targets, str) and targets.startswith("model"):
        assert all(m.name.startswith("model.layers.1.") for m in report.replaced)


def test_exclude_and_filter_fn():
    model = FAMILIES["llama"][0]()
    report = shrink(
        model,
        GPConvConfig(min_channels_per_group=MCPG, exclude_modules=["down_proj"]),
        filter_fn=lambda mod, name: ".layers.0." in name,
    )
    names = [m.name for m in report.replaced]
    assert names and all(".layers.0." in n and not n.endswith("down_proj") for n in names)
    assert isinstance(model.model.layers[1].mlp.down_proj, nn.Linear)


def test_untied_lm_head_can_be_targeted_explicitly():
    model = FAMILIES["llama"][0]()
    report = shrink(model, GPConvConfig(target_modules=["lm_head"], min_channels_per_group=MCPG))
    assert [m.name for m in report.replaced] == ["lm_head"]
    assert report.after.embedding < report.before.embedding  # the untied head counts as embedding


def test_layers_without_saving_stay_dense_with_reason():
    model = FAMILIES["llama"][0]()
    # bound 64 // 32 = 2 groups: an io block would keep 2/2 = everything
    report = shrink(model, GPConvConfig(min_channels_per_group=32))
    dense = [m for m in report.modules if m.status == "dense"]
    assert dense and all("no saving" in m.reason for m in dense if m.in_features == 64)
    assert all(isinstance(model.get_submodule(m.name), nn.Linear) for m in dense)
    # down_proj (128 in) has bound 4 -> replaced
    assert {m.name.rsplit(".", 1)[-1] for m in report.replaced} == {"down_proj"}


def test_per_pattern_min_channels_override():
    model = FAMILIES["llama"][0]()
    report = shrink(
        model, GPConvConfig(min_channels_per_group=MCPG, min_channels_per_group_overrides={"down_proj": 4})
    )
    groups = {m.name.rsplit(".", 1)[-1]: m.groups for m in report.replaced}
    assert groups["down_proj"] == 32  # 128 // 4 = 32 and 32 | gcd(128, 64)
    assert groups["q_proj"] == 4


def test_chained_variant():
    model = FAMILIES["phi3"][0]()
    ids = _ids()
    report = shrink(model, GPConvConfig(min_channels_per_group=MCPG, variant="chained"))
    assert {m.variant for m in report.replaced} == {"chained"}
    dense = gpconv.densify(copy.deepcopy(model))
    torch.testing.assert_close(_logits(dense, ids), _logits(model, ids), atol=1e-5, rtol=1e-5)


def test_dry_run_predicts_the_real_counts():
    model = FAMILIES["qwen2"][0]()
    cfg = GPConvConfig(min_channels_per_group=MCPG)
    planned = shrink(copy.deepcopy(model), cfg, dry_run=True)
    real = shrink(model, cfg)
    assert planned.after == real.after
    assert planned.dry_run and not real.dry_run


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(min_channels_per_group=0), "positive"),
        (dict(min_channels_per_group=-4), "positive"),
        (dict(variant="zigzag"), "unknown variant"),
        (dict(init="magic"), "unknown init"),
        (dict(target_modules="(unclosed"), "regex"),
        (dict(num_layers=2, keep_layers=(0, 1)), "not both"),
        (dict(num_layers=0), "positive"),
        (dict(target_params="lots"), "fraction"),
        (dict(layer_selection="random"), "layer_selection"),
        (dict(rank=1.5), "rank"),
        (dict(min_channels_per_group_overrides={"q_proj": 0}), "override"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(GPConvError, match=match):
        GPConvConfig(**kwargs)


def test_custom_module():
    model = TinyMLPLM()
    ids = _ids()
    report = shrink(model, GPConvConfig(min_channels_per_group=MCPG, init="project"))
    assert [m.name for m in report.replaced] == ["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down"]
    assert isinstance(model.head, nn.Linear)  # the vocabulary-wide layer is the output layer
    assert report.after.total == sum(p.numel() for p in model.parameters())
    assert report.after.embedding == model.embed.weight.numel() + model.head.weight.numel()
    with torch.no_grad():
        y = model(ids)
    dense = gpconv.densify(copy.deepcopy(model))
    with torch.no_grad():
        torch.testing.assert_close(dense(ids), y, atol=1e-5, rtol=1e-5)


def test_pipeline_text_generation_on_demo_model():
    from transformers import pipeline

    model, tok = gpconv.load_model("tiny-phi3")
    shrink(model, GPConvConfig(min_channels_per_group=64))
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    out = pipe("Hello", max_new_tokens=5, do_sample=False)
    assert out[0]["generated_text"].startswith("Hello")


def test_preset_none_truncates_depth_alone():
    from tiny_models import FAMILIES

    model = FAMILIES["llama"][0]()
    rep = shrink(model, GPConvConfig(target_modules="none", num_layers=1))
    assert rep.layers_kept == [0] and rep.unmatched_patterns == [] and not rep.replaced
    assert not any(is_gpconv_module(m) for m in model.modules())
    with pytest.raises(GPConvError, match="no module matched"):
        shrink(FAMILIES["llama"][0](), GPConvConfig(target_modules="none"))
