"""Decoder-layer refinement after the closed-form fit: ``Calibration(refine_steps=...)``.

Invariants: the held-out error of every refined layer never goes up (a refinement that does
not help is rolled back to the closed-form weights), it goes down where Adam has something to
fix, ``refine_steps=0`` is exactly the closed form, and bad settings are refused before any
work.
"""

import pytest
import torch

from gpconv import GPConvConfig, GPConvError, shrink
from gpconv.surgery import Calibration
from tiny_models import FAMILIES, MCPG, VOCAB, shrunk_logit_errors


def _batches(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (4, 32), generator=g) for _ in range(n)]


CASES = [
    ("llama", dict(min_channels_per_group=MCPG, init="fit")),
    ("phi3", dict(min_channels_per_group=MCPG, init="fit")),
    ("gpt2", dict(min_channels_per_group=MCPG, init="fit")),
    ("llama", dict(variant="lowrank", rank=0.25, init="fit")),
    ("qwen2", dict(variant="hybrid", min_channels_per_group=MCPG, rank=0.1, init="fit")),
]


def _shrunk(family, kw, **calib):
    model = FAMILIES[family][0]()
    report = shrink(model, GPConvConfig(**kw), calibration=Calibration(_batches(), sequential=True, **calib))
    return model, report


@pytest.mark.parametrize("family, kw", CASES, ids=[f"{f}-{kw.get('variant', 'io')}" for f, kw in CASES])
def test_refinement_lowers_held_out_layer_error(family, kw):
    model, report = _shrunk(family, kw, refine_steps=40, refine_lr=1e-3)
    layers = [r["layer"] for r in report.refined]
    assert layers == list(range(model.config.num_hidden_layers))
    assert all(r["after"] <= r["before"] for r in report.refined)
    assert any(r["after"] < r["before"] for r in report.refined)
    # the report carries it, in every format
    assert report.to_dict()["refined"] == report.refined
    assert "layer-output error" in report.to_markdown()


def test_refinement_without_correction_targets_the_dense_layer_on_shrunk_inputs():
    # correct=False: the closed form is unchanged by asking for refinement (no cross statistics),
    # and the refinement still runs and helps
    kw = dict(min_channels_per_group=MCPG, init="fit")
    plain, _ = _shrunk("llama", kw, correct=False)
    refined, rep = _shrunk("llama", kw, correct=False, refine_steps=40, refine_lr=1e-3)
    assert any(r["after"] < r["before"] for r in rep.refined)
    closed, _ = _shrunk("llama", kw, correct=False, refine_steps=5, refine_lr=10.0)  # every layer rolled back
    a, b = plain.state_dict(), closed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_refinement_improves_the_model_output():
    """End to end on held-out ids: closer to the dense model's logits than the closed form."""
    cfg = GPConvConfig(min_channels_per_group=MCPG, init="fit")
    errs = shrunk_logit_errors(FAMILIES["llama"][0](), _batches(1, seed=9)[0], {
        steps: (cfg, Calibration(_batches(), sequential=True, refine_steps=steps, refine_lr=1e-3)) for steps in (0, 60)})
    assert errs[60] < errs[0]


def test_zero_steps_is_the_closed_form_and_a_failed_refinement_is_rolled_back():
    kw = dict(min_channels_per_group=MCPG, init="fit")
    closed, rep0 = _shrunk("llama", kw)
    assert rep0.refined is None and "layer-output error" not in rep0.to_markdown()
    # a learning rate this large makes every layer worse: each is put back exactly
    wild, rep = _shrunk("llama", kw, refine_steps=5, refine_lr=10.0)
    assert all(r["after"] == r["before"] for r in rep.refined)
    a, b = closed.state_dict(), wild.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and the blocks' requires_grad flags are as surgery left them
    assert all(p.requires_grad for n, p in wild.named_parameters() if "proj" in n)


@pytest.mark.parametrize("kw, message", [
    (dict(refine_steps=3), "needs sequential"),
    (dict(sequential=True, refine_steps=-1), "non-negative integer"),
    (dict(sequential=True, refine_steps=True), "non-negative integer"),
    (dict(sequential=True, refine_steps=2, refine_lr=0), "positive number"),
])
def test_bad_settings_are_refused(kw, message):
    with pytest.raises(GPConvError, match=message):
        Calibration(_batches(2), **kw)


def test_recipe_refine_needs_sequential():
    from gpconv import recipes

    with pytest.raises(GPConvError, match="needs surgery.calibration.sequential"):
        recipes.load_recipe("tiny-demo", ["surgery.calibration.refine_steps=5"])
    with pytest.raises(GPConvError, match="refine_lr"):
        recipes.load_recipe("tiny-demo", ["surgery.calibration.sequential=true",
                                          "surgery.calibration.refine_steps=5", "surgery.calibration.refine_lr=-1"])
    r = recipes.load_recipe("tiny-demo", ["surgery.calibration.sequential=true", "surgery.calibration.refine_steps=5"])
    assert r["surgery"]["calibration"]["refine_steps"] == 5


def test_refine_on_a_model_without_decoder_layers_is_refused_untouched():
    from tiny_models import TinyMLPLM

    model = TinyMLPLM()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(GPConvError, match="stack of decoder layers"):
        shrink(model, GPConvConfig(min_channels_per_group=MCPG, init="fit"),
               calibration=Calibration(_batches(4), sequential=True, refine_steps=3))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
