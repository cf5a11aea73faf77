"""Calibration statistics: the right inputs, shared only when truly shared."""

import torch

from gpconv.surgery import Calibration, collect_stats, run_sequential
from tiny_models import FAMILIES, VOCAB, shrunk_logit_errors


def _batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (2, 16), generator=g) for _ in range(n)]


def test_stats_equal_direct_input_moments():
    model = FAMILIES["llama"][0]()
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj",
             "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj"]
    seen = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: seen[n].append(a[0].detach().reshape(-1, a[0].shape[-1]).double())) for n in names]
    batches = _batches()
    for b in batches:
        with torch.no_grad():
            model(b)
    for h in hooks:
        h.remove()
    stats = collect_stats(model, Calibration(batches, holdout_every=4), names)
    for n in names:
        x_fit = torch.cat(seen[n][:3])  # batches 0..2 fit, batch 3 held out
        x_ho = seen[n][3]
        torch.testing.assert_close(stats[n].fit, x_fit.t() @ x_fit / len(x_fit))
        torch.testing.assert_close(stats[n].held_out, x_ho.t() @ x_ho / len(x_ho))
    # o_proj (attention output) and gate_proj (normed residual) see different tensors of the
    # same shape: their statistics must differ even though memory may be reused between them
    assert not torch.allclose(stats[names[1]].fit, stats[names[2]].fit)


def test_shared_inputs_are_computed_once():
    model = FAMILIES["llama"][0]()
    names = [f"model.layers.1.self_attn.{p}_proj" for p in "qkv"]
    stats = collect_stats(model, Calibration(_batches()), names)
    assert stats[names[0]].fit is stats[names[1]].fit is stats[names[2]].fit


def test_sequential_sees_the_modified_prefix():
    model = FAMILIES["llama"][0]()
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    calls = []

    def on_stage(st):
        calls.append(sorted(st))
        if "model.layers.0.mlp.down_proj" in st:  # silence layer 0's MLP: layer 1's input changes
            with torch.no_grad():
                model.model.layers[0].mlp.down_proj.weight.zero_()

    ref = collect_stats(model, Calibration(_batches()), names[1:])
    run_sequential(model, Calibration(_batches()), names, on_stage)
    assert calls == [[names[0]], [names[1]]]
    after = collect_stats(model, Calibration(_batches()), names[1:])
    assert not torch.allclose(ref[names[1]].fit, after[names[1]].fit)


def test_corrected_target_compensates_a_damaged_prefix():
    """With the dense model's inputs known, a layer can undo what the prefix lost."""
    from gpconv.surgery import LayerStats

    torch.manual_seed(0)
    n = 16
    w = torch.randn(8, n, dtype=torch.float64)
    xd = torch.randn(2000, n, dtype=torch.float64)
    damage = torch.eye(n, dtype=torch.float64) + 0.3 * torch.randn(n, n, dtype=torch.float64)
    xs = xd @ damage.t()  # the shrunk prefix feeds a distorted (but invertible) version
    st = LayerStats(xs.t() @ xs / 2000, None, 2000, 0, cross=xd.t() @ xs / 2000)
    m = st.target(w, ridge=1e-9)
    # W x_d == M x_s: the corrected map reproduces the dense output from the distorted input
    torch.testing.assert_close(xs @ m.t(), xd @ w.t(), atol=1e-5, rtol=1e-5)
    assert LayerStats(st.fit, None, 2000, 0).target(w, 1e-9) is w


def test_sequential_correction_tracks_the_dense_model():
    from gpconv import GPConvConfig

    cfg = GPConvConfig(min_channels_per_group=16, init="fit")
    errs = shrunk_logit_errors(FAMILIES["llama"][0](), _batches(1, seed=9)[0], {
        correct: (cfg, Calibration(_batches(8), sequential=True, correct=correct)) for correct in (False, True)})
    assert errs[True] < errs[False]
