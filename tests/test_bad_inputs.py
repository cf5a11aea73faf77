"""Bad inputs, one table: every command that reads a model or a data file refuses each kind of
broken input with exit status 2, exactly one ``error:`` line on stderr, no traceback, and nothing
new on disk.

Each case makes its bad input under ``tmp_path`` (a copy of a small saved checkpoint, a file with
the wrong bytes, ...), runs the CLI in-process and compares the directory tree before and after.
"""

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

import gpconv
from gpconv.hub import tiny_phi3
from gpconv_cli.main import app

SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)
ROWS = [{"text": f"row {i}: apple pear plum fig kiwi lime date lemon mango peach"} for i in range(24)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Good inputs, made once: a gpconv checkpoint, a plain dense checkpoint, a data file."""
    root = tmp_path_factory.mktemp("world")
    dense, tok = tiny_phi3(seed=0, **SMALL)
    dense.save_pretrained(root / "dense")
    tok.save_pretrained(root / "dense")
    shrunk, _ = tiny_phi3(seed=0, **SMALL)
    gpconv.shrink(shrunk, gpconv.GPConvConfig(min_channels_per_group=16, init="project"))
    gpconv.save_pretrained(shrunk, root / "ckpt", tok)
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    r = CliRunner().invoke(app, ["train", str(root / "ckpt"), "--data", str(root / "data.jsonl"), "--out", str(root / "run"),
                                 "--max-steps", "2", "--save-every", "1", "--block-size", "16", "--no-progress"])
    assert r.exit_code == 0 and (root / "run" / "checkpoints" / "step-000001").is_dir(), r.output
    return SimpleNamespace(root=root, dense=root / "dense", ckpt=root / "ckpt", data=root / "data.jsonl", run=root / "run",
                           files=_tree(root))


# -- ways to make a bad input in tmp ----------------------------------------------------------


def copy_of(which):
    def make(tmp, w):
        shutil.copytree(getattr(w, which), tmp / which)
    return make


def truncated_weights(which):
    """An interrupted download: the safetensors file cut short."""
    def make(tmp, w):
        copy_of(which)(tmp, w)
        f = tmp / which / "model.safetensors"
        f.write_bytes(f.read_bytes()[:1000])
    return make


def edit_config(which, change):
    def make(tmp, w):
        copy_of(which)(tmp, w)
        f = tmp / which / "config.json"
        f.write_text(change(f.read_text()))
    return make


def set_in_config(which, key, value):
    return edit_config(which, lambda t: json.dumps({**json.loads(t), key: value}))


def file_in_copy(which, name, content):
    """A copy of a checkpoint with one of its files replaced (a truncated tokenizer, say)."""
    def make(tmp, w):
        copy_of(which)(tmp, w)
        (tmp / which / name).write_text(content)
    return make


def wrong_shapes(tmp, w):
    """A checkpoint whose config says one width and whose weights have another."""
    copy_of("ckpt")(tmp, w)
    cfg = json.loads((w.ckpt / "config.json").read_text())
    other, _ = tiny_phi3(seed=0, **{**SMALL, "intermediate_size": 256})
    gpconv.shrink(other, gpconv.GPConvConfig(min_channels_per_group=16, init="project"))
    gpconv.save_pretrained(other, tmp / "other")
    shutil.copy(tmp / "other" / "model.safetensors", tmp / "ckpt" / "model.safetensors")
    shutil.rmtree(tmp / "other")
    (tmp / "ckpt" / "config.json").write_text(json.dumps(cfg))


def file(name, content):
    def make(tmp, w):
        p = tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return make


def mkdir(name):
    def make(tmp, w):
        (tmp / name).mkdir(parents=True)
    return make


def both(*makers):
    def make(tmp, w):
        for m in makers:
            m(tmp, w)
    return make


def nothing(tmp, w):
    pass


def without(which, *patterns):
    """A copy of a checkpoint with some of its files gone (the tokenizer, the weights...)."""
    def make(tmp, w):
        copy_of(which)(tmp, w)
        for pat in patterns:
            for f in (tmp / which).glob(pat):
                f.unlink()
    return make


def index_to_missing_shard(tmp, w):
    """A sharded checkpoint whose index names a shard that never arrived."""
    without("dense", "model.safetensors")(tmp, w)
    (tmp / "dense" / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))


def onnx_export_without_model(tmp, w):
    """An export directory whose model.onnx never arrived (the configs and tokenizer did)."""
    copy_of("dense")(tmp, w)
    d = tmp / "dense"
    (d / "model.safetensors").unlink()
    (d / "gpconv_export.json").write_text(json.dumps({"format": "onnx", "dtype": "float32"}))
    d.rename(tmp / "onnx")


NOT_UTF8 = b"caf\xe9 au lait\n\nna\xefve\n"
BAD_LINE = '{"text": "ok"}\n{"text": "no closing quote}\n'
NO_TEXT = '{"title": "a"}\n{"title": "b"}\n'
RECIPE_BAD_YAML = "model: {name: tiny-phi3\ndata: [\n"
RECIPE_BAD_KEY = "model: {name: tiny-phi3}\ntrain: {learning_rate: 0.1}\n"
RECIPE_BAD_TYPE = "model: {name: tiny-phi3}\ntrain: {max_steps: many}\n"

# the pieces of argv: {w.x} is a good input made once, {tmp} the case's own directory, {out} an
# output path that must not appear
DATA = ("--data", "{w.data}")
TRAIN_OUT = ("--out", "{out}", "--max-steps", "1", "--block-size", "16", "--no-progress")

# id, make the bad input, argv, what the message says
CASES = [
    # -- models: missing, not a model, truncated, corrupt metadata --------------------------
    ("shrink-missing-dir", nothing, ["shrink", "{tmp}/nope", "--out", "{out}"], "no such file or directory"),
    ("shrink-no-config", mkdir("m"), ["shrink", "{tmp}/m", "--out", "{out}"], "without config.json"),
    ("shrink-config-not-json", edit_config("dense", lambda t: t[:40]), ["shrink", "{tmp}/dense", "--out", "{out}"],
     "not valid JSON"),
    ("shrink-truncated-stream", truncated_weights("dense"), ["shrink", "{tmp}/dense", "--out", "{out}", "-m", "16"],
     "not a valid safetensors file"),
    ("shrink-truncated-loaded", truncated_weights("dense"),
     ["shrink", "{tmp}/dense", "--out", "{out}", "-m", "16", "--calibration-data", "{w.data}"], "model.safetensors"),
    ("shrink-truncated-gguf", file("m.gguf", b"GGUF\x03\x00\x00\x00"), ["shrink", "{tmp}/m.gguf", "--out", "{out}"], "m.gguf"),
    ("shrink-missing-gguf", nothing, ["shrink", "{tmp}/m.gguf", "--out", "{out}"], "no such GGUF file"),
    ("shrink-out-is-file", file("o", "x"), ["shrink", "tiny-phi3", "--out", "{tmp}/o"], "exists and is not a directory"),
    ("shrink-out-under-a-file", file("f", "x"), ["shrink", "tiny-phi3", "--out", "{tmp}/f/o", "-m", "64"], "{tmp}/f"),
    ("train-out-under-a-file", file("f", "x"), ["train", "{w.ckpt}", *DATA, "--out", "{tmp}/f/o", "--max-steps", "1"], "{tmp}/f"),
    ("shrink-bad-device", nothing, ["shrink", "tiny-phi3", "--out", "{out}", "--device", "tpu9"], "tpu9"),
    ("shrink-bad-dtype", nothing, ["shrink", "tiny-phi3", "--out", "{out}", "--dtype", "float7"], "unknown dtype"),
    ("report-config-field-type", set_in_config("dense", "hidden_size", "many"), ["report", "{tmp}/dense"], "hidden_size"),
    ("shrink-config-field-type", set_in_config("dense", "hidden_size", "many"),
     ["shrink", "{tmp}/dense", "--out", "{out}", "--calibration-data", "{w.data}"], "hidden_size"),
    ("densify-config-field-type", set_in_config("ckpt", "hidden_size", "many"), ["densify", "{tmp}/ckpt", "--out", "{out}"],
     "hidden_size"),
    ("report-no-config", mkdir("m"), ["report", "{tmp}/m"], "without config.json"),
    ("report-config-not-json", edit_config("dense", lambda t: t[:40]), ["report", "{tmp}/dense"], "not valid JSON"),
    ("report-plan-not-a-mapping", set_in_config("ckpt", "gpconv", "oops"), ["report", "{tmp}/ckpt"], "gpconv"),
    ("report-plan-no-modules", set_in_config("ckpt", "gpconv", {"format": 1}), ["report", "{tmp}/ckpt"], "modules"),
    ("report-markdown-in-missing-dir", nothing, ["report", "tiny-phi3", "--markdown", "{tmp}/no/dir/r.md"], "r.md"),
    ("densify-missing", nothing, ["densify", "{tmp}/nope", "--out", "{out}"], "no such model directory"),
    ("densify-dense-model", copy_of("dense"), ["densify", "{tmp}/dense", "--out", "{out}"], "not a gpconv checkpoint"),
    ("densify-truncated", truncated_weights("ckpt"), ["densify", "{tmp}/ckpt", "--out", "{out}"], "model.safetensors"),
    ("densify-wrong-shapes", wrong_shapes, ["densify", "{tmp}/ckpt", "--out", "{out}"], "shape"),
    ("densify-plan-corrupt", set_in_config("ckpt", "gpconv", {"format": 1, "modules": {"model.layers.0.mlp.down_proj": {"groups": 3}}}),
     ["densify", "{tmp}/ckpt", "--out", "{out}"], "down_proj"),
    ("densify-out-is-file", both(copy_of("ckpt"), file("o", "x")), ["densify", "{tmp}/ckpt", "--out", "{tmp}/o"],
     "exists and is not a directory"),
    ("eval-truncated", truncated_weights("ckpt"), ["eval", "{tmp}/ckpt", *DATA], "model.safetensors"),
    ("eval-dense-truncated", truncated_weights("dense"), ["eval", "{tmp}/dense", *DATA], "model.safetensors"),
    ("eval-missing-model", nothing, ["eval", "{tmp}/nope", *DATA], "no such file or directory"),
    ("eval-tasks-missing-yaml", nothing, ["eval", "{w.ckpt}", "--tasks", "{tmp}/nope.yaml"], "nope.yaml"),
    ("eval-tasks-yaml-broken", file("t.yaml", "task: [x\n"), ["eval", "{w.ckpt}", "--tasks", "{tmp}/t.yaml"], "t.yaml"),
    ("eval-tasks-yaml-no-data", file("t.yaml", "task: mine\ndataset_path: json\ndataset_kwargs: {data_files: {test: /nope.jsonl}}\n"
                                      "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: '{{text}}'\n"
                                      "doc_to_target: ''\nmetric_list: [{metric: word_perplexity, aggregation: weighted_perplexity, "
                                      "higher_is_better: false}]\n"),
     ["eval", "{w.ckpt}", "--tasks", "{tmp}/t.yaml"], "mine"),
    ("eval-bad-dtype", nothing, ["eval", "{w.ckpt}", *DATA, "--dtype", "float7"], "unknown dtype"),
    ("generate-truncated", truncated_weights("ckpt"), ["generate", "{tmp}/ckpt", "hi"], "model.safetensors"),
    ("generate-config-not-json", edit_config("ckpt", lambda t: t[:40]), ["generate", "{tmp}/ckpt", "hi"], "not valid JSON"),
    ("generate-onnx-incomplete", onnx_export_without_model, ["generate", "{tmp}/onnx", "hi"], "model.onnx"),
    ("generate-tokenizer-corrupt", file_in_copy("ckpt", "tokenizer.json", "{"), ["generate", "{tmp}/ckpt", "hi"], "tokenizer"),
    ("generate-generation-config-corrupt", file_in_copy("ckpt", "generation_config.json", "{"), ["generate", "{tmp}/ckpt", "hi"],
     "generation_config.json"),
    ("generate-onnx-truncated", both(onnx_export_without_model, file("onnx/model.onnx", b"\x08\x01\x12")),
     ["generate", "{tmp}/onnx", "hi"], "ONNX Runtime cannot load"),
    ("generate-onnx-meta-damaged", both(onnx_export_without_model, file("onnx/model.onnx", b"\x08\x01"),
                                        file("onnx/gpconv_export.json", "[1]")), ["generate", "{tmp}/onnx", "hi"], "gpconv_export.json"),
    ("generate-bad-dtype", nothing, ["generate", "{w.ckpt}", "hi", "--dtype", "float7"], "unknown dtype"),
    ("distill-truncated-student", truncated_weights("ckpt"), ["distill", "{tmp}/ckpt", "--teacher", "{w.dense}", *DATA, *TRAIN_OUT],
     "model.safetensors"),
    ("distill-truncated-teacher", truncated_weights("dense"), ["distill", "{w.ckpt}", "--teacher", "{tmp}/dense", *DATA, *TRAIN_OUT],
     "model.safetensors"),
    ("train-truncated", truncated_weights("ckpt"), ["train", "{tmp}/ckpt", *DATA, *TRAIN_OUT], "model.safetensors"),
    ("train-config-json-broken", file("c.json", '{"model_type": "phi3",'), ["train", "{tmp}/c.json", "--tokenizer", "byte", *DATA, *TRAIN_OUT],
     "c.json"),
    ("shrink-calib-no-tokenizer", without("dense", "tokenizer*", "special_tokens_map.json", "chat_template.jinja"),
     ["shrink", "{tmp}/dense", "--out", "{out}", "-m", "16", "--calibration-data", "{w.data}"], "tokenizer"),
    ("report-truncated-gguf", file("m.gguf", b"GGUF\x03\x00\x00\x00"), ["report", "{tmp}/m.gguf"], "not a valid GGUF file"),
    ("report-plan-file-only", file("m/gpconv.json", "{"), ["report", "{tmp}/m"], "config.json"),
    ("eval-index-missing-shard", index_to_missing_shard, ["eval", "{tmp}/dense", *DATA], "model-00002-of-00002.safetensors"),
    ("eval-no-weights", without("dense", "*.safetensors"), ["eval", "{tmp}/dense", *DATA], "no weights"),
    ("eval-no-tokenizer", without("ckpt", "tokenizer*"), ["eval", "{tmp}/ckpt", *DATA], "no tokenizer"),
    ("eval-teacher-missing", nothing, ["eval", "{w.ckpt}", "--teacher", "{tmp}/nope", *DATA], "nope"),
    ("generate-no-weights", without("dense", "*.safetensors"), ["generate", "{tmp}/dense", "hi"], "no weights"),
    ("generate-no-tokenizer", without("ckpt", "tokenizer*"), ["generate", "{tmp}/ckpt", "hi"], "tokenizer"),
    ("distill-teacher-no-weights", without("dense", "*.safetensors"),
     ["distill", "{w.ckpt}", "--teacher", "{tmp}/dense", *DATA, *TRAIN_OUT], "no weights"),
    ("distill-teacher-cache-corrupt", both(file("tc/teacher_cache.json", "{"), file("tc/teacher_cache.safetensors", b"\x08\x00")),
     ["distill", "{w.ckpt}", "--teacher", "{w.dense}", *DATA, *TRAIN_OUT, "--teacher-cache", "{tmp}/tc"], "teacher cache"),
    ("train-tokenizer-missing", nothing, ["train", "{w.ckpt}", *DATA, *TRAIN_OUT, "--tokenizer", "{tmp}/nope"], "nope"),
    ("train-config-unknown-type", file("c.json", '{"model_type": "no-such-arch"}'),
     ["train", "{tmp}/c.json", "--tokenizer", "byte", *DATA, *TRAIN_OUT], "c.json"),
    ("bench-bad-device", nothing, ["bench", "{w.ckpt}", "--device", "tpu9"], "tpu9"),
    ("bench-truncated", truncated_weights("ckpt"), ["bench", "{tmp}/ckpt"], "model.safetensors"),
    ("bench-missing", nothing, ["bench", "{tmp}/nope"], "nope"),
    ("bench-baseline-truncated", truncated_weights("dense"), ["bench", "{w.ckpt}", "--baseline", "{tmp}/dense"], "model.safetensors"),
    ("export-truncated", truncated_weights("ckpt"), ["export", "{tmp}/ckpt", "--out", "{out}"], "model.safetensors"),
    ("export-out-is-file", file("o", "x"), ["export", "{w.ckpt}", "--out", "{tmp}/o"], "exists and is not a directory"),
    ("export-bad-format", nothing, ["export", "{w.ckpt}", "--out", "{out}", "--format", "tflite"], "unknown export format"),
    # -- data files ---------------------------------------------------------------------------
    ("eval-data-not-utf8", file("d.txt", NOT_UTF8), ["eval", "{w.ckpt}", "--data", "{tmp}/d.txt"], "UTF-8"),
    ("eval-data-jsonl-not-utf8", file("d.jsonl", NOT_UTF8), ["eval", "{w.ckpt}", "--data", "{tmp}/d.jsonl"], "UTF-8"),
    ("eval-data-csv-not-utf8", file("d.csv", b"text\n" + NOT_UTF8), ["eval", "{w.ckpt}", "--data", "{tmp}/d.csv"], "UTF-8"),
    ("eval-data-empty", file("d.jsonl", ""), ["eval", "{w.ckpt}", "--data", "{tmp}/d.jsonl"], "holds no rows"),
    ("eval-data-blank-txt", file("d.txt", "\n\n  \n"), ["eval", "{w.ckpt}", "--data", "{tmp}/d.txt"], "holds no rows"),
    ("eval-data-empty-texts", file("d.jsonl", '{"text": ""}\n{"text": ""}\n'), ["eval", "{w.ckpt}", "--data", "{tmp}/d.jsonl"],
     "validation split is empty"),
    ("eval-data-bad-line", file("d.jsonl", BAD_LINE), ["eval", "{w.ckpt}", "--data", "{tmp}/d.jsonl"], "d.jsonl:2"),
    ("eval-data-no-text-field", file("d.jsonl", NO_TEXT), ["eval", "{w.ckpt}", "--data", "{tmp}/d.jsonl"], "fit none of the known"),
    ("eval-data-not-objects", file("d.jsonl", "1\n2\n"), ["eval", "{w.ckpt}", "--data", "{tmp}/d.jsonl"], "d.jsonl:1"),
    ("eval-data-is-dir", mkdir("d.jsonl"), ["eval", "{w.ckpt}", "--data", "{tmp}/d.jsonl"], "is a directory"),
    ("eval-data-json-not-rows", file("d.json", '"just a string"'), ["eval", "{w.ckpt}", "--data", "{tmp}/d.json"],
     "expected a list of JSON objects"),
    ("eval-data-missing", nothing, ["eval", "{w.ckpt}", "--data", "{tmp}/d.jsonl"], "no such data file"),
    ("eval-data-bad-parquet", file("d.parquet", b"PAR1garbage"), ["eval", "{w.ckpt}", "--data", "{tmp}/d.parquet"], "d.parquet"),
    ("train-data-streamed-not-utf8", file("d.jsonl", NOT_UTF8), ["train", "{w.ckpt}", "--data", "{tmp}/d.jsonl", "--streaming",
                                                                  *TRAIN_OUT], "d.jsonl"),
    ("train-data-not-utf8", file("d.txt", NOT_UTF8), ["train", "{w.ckpt}", "--data", "{tmp}/d.txt", *TRAIN_OUT], "UTF-8"),
    ("distill-data-bad-line", file("d.jsonl", BAD_LINE), ["distill", "{w.ckpt}", "--teacher", "{w.dense}", "--data", "{tmp}/d.jsonl",
                                                         *TRAIN_OUT], "d.jsonl:2"),
    ("shrink-calib-not-utf8", file("d.txt", NOT_UTF8),
     ["shrink", "tiny-phi3", "--out", "{out}", "--init", "fit", "--calibration-data", "{tmp}/d.txt"], "UTF-8"),
    ("shrink-calib-is-dir", mkdir("calib"), ["shrink", "tiny-phi3", "--out", "{out}", "--init", "fit", "--calibration-data", "{tmp}/calib"],
     "is a directory"),
    ("shrink-calib-empty", file("d.jsonl", ""),
     ["shrink", "tiny-phi3", "--out", "{out}", "--init", "fit", "--calibration-data", "{tmp}/d.jsonl"], "holds no rows"),
    # -- budgets and runs ---------------------------------------------------------------------
    ("shrink-target-unreachable-before-calibration", nothing,
     ["shrink", "tiny-phi3", "--out", "{out}", "--init", "fit", "--calibration-data", "{w.data}", "--target-params", "0.05",
      "-m", "64"], "--target-params"),
    ("train-resume-nothing", nothing, ["train", "{w.ckpt}", *DATA, *TRAIN_OUT, "--resume"], "nothing to resume"),
    ("distill-resume-empty-dir", mkdir("run"),
     ["distill", "{w.ckpt}", "--teacher", "{w.dense}", *DATA, "--out", "{tmp}/run", "--max-steps", "1", "--resume"], "nothing to resume"),
    ("train-resume-no-checkpoint", both(file("run/train_config.json", "{}"), mkdir("run/checkpoints/.step-000004.tmp-x")),
     ["train", "{w.ckpt}", *DATA, "--out", "{tmp}/run", "--max-steps", "1", "--resume"], "saved no complete checkpoint"),
    ("train-resume-not-a-run", file("run/notes.txt", "x"),
     ["train", "{w.ckpt}", *DATA, "--out", "{tmp}/run", "--max-steps", "1", "--resume"], "not a gpconv training run"),
    ("train-resume-checkpoint-truncated", file_in_copy("run", "checkpoints/step-000001/trainable.safetensors", "\x08\x00"),
     ["train", "{w.ckpt}", *DATA, "--out", "{tmp}/run", "--max-steps", "2", "--save-every", "1", "--block-size", "16",
      "--no-progress", "--resume"], "cannot read the checkpoint"),
    ("train-out-is-file", file("o", "x"), ["train", "{w.ckpt}", *DATA, "--out", "{tmp}/o", "--max-steps", "1"],
     "exists and is not a directory"),
    # -- recipes ------------------------------------------------------------------------------
    ("run-missing-recipe", nothing, ["run", "{tmp}/r.yaml"], "r.yaml"),
    ("run-yaml-broken", file("r.yaml", RECIPE_BAD_YAML), ["run", "{tmp}/r.yaml", "--out", "{out}"], "not valid YAML"),
    ("run-yaml-not-utf8", file("r.yaml", b"name: caf\xe9\n"), ["run", "{tmp}/r.yaml", "--out", "{out}"], "UTF-8"),
    ("run-unknown-key", file("r.yaml", RECIPE_BAD_KEY), ["run", "{tmp}/r.yaml", "--out", "{out}"], "learning_rate"),
    ("run-wrong-type", file("r.yaml", RECIPE_BAD_TYPE), ["run", "{tmp}/r.yaml", "--out", "{out}"], "max_steps"),
    ("run-config-unknown-type", file("r.yaml", "model: {config: {model_type: nope}, tokenizer: byte}\n"),
     ["run", "{tmp}/r.yaml", "--set", "data.source={w.data}", "--out", "{out}"], "unknown model_type 'nope'"),
    ("run-config-field-type", file("r.yaml", "model: {config: {model_type: phi3, hidden_size: many}, tokenizer: byte}\n"),
     ["run", "{tmp}/r.yaml", "--set", "data.source={w.data}", "--out", "{out}"], "hidden_size"),
    ("train-config-field-type", file("c.json", '{"model_type": "phi3", "hidden_size": "many"}'),
     ["train", "{tmp}/c.json", "--tokenizer", "byte", *DATA, *TRAIN_OUT], "hidden_size"),
    ("run-bad-set", nothing, ["run", "tiny-demo", "--set", "train.lr"], "train.lr"),
    ("run-data-not-utf8", file("d.txt", NOT_UTF8), ["run", "tiny-demo", "--set", "data.source={tmp}/d.txt", "--out", "{out}"], "UTF-8"),
    ("run-resume-nothing", nothing, ["run", "tiny-demo", "--set", "data.source={w.data}", "--out", "{out}", "--resume"],
     "nothing to resume"),
]

# every command reads a model, a data file or a recipe: each must appear in the table (a new
# command fails this test until it has its cases)
COMMANDS = {c.name or c.callback.__name__ for c in app.registered_commands}


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_table_covers_every_command():
    assert COMMANDS == {"shrink", "report", "densify", "eval", "generate", "distill", "train", "bench", "export", "run"}
    assert {argv[0] for _, _, argv, _ in CASES} == COMMANDS
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case, make, argv, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(world, tmp_path, monkeypatch, case, make, argv, message):
    if "--tasks" in argv:
        pytest.importorskip("lm_eval")  # the eval extra; without it --tasks is its own one-line error
    monkeypatch.chdir(tmp_path)  # a command that wrote relative to the working directory would show too
    make(tmp_path, world)
    before = _tree(tmp_path)
    args = [a.format(w=world, tmp=tmp_path, out=tmp_path / "out") for a in argv]
    r = CliRunner().invoke(app, args)
    err = r.stderr.strip()
    assert r.exception is None or isinstance(r.exception, SystemExit), (r.exception, r.output)  # no traceback
    assert "Traceback" not in r.output
    assert r.exit_code == 2, r.output
    assert len(err.splitlines()) == 1 and err.startswith("gpconv: error:"), err
    assert message.format(tmp=tmp_path) in err, err
    assert _tree(tmp_path) == before
    assert _tree(world.root) == world.files  # nor beside the good inputs it read


def test_unreachable_target_is_refused_before_calibration(world, tmp_path, monkeypatch):
    """The plan's shapes decide reachability: no calibration pass runs first (minutes on a real model)."""
    shrink_mod = sys.modules["gpconv.surgery.shrink"]  # the module; gpconv.surgery.shrink is the function

    def no_calibration(*a, **k):
        raise AssertionError("calibration ran before the target was checked")

    monkeypatch.setattr(shrink_mod, "collect_stats", no_calibration)
    r = CliRunner().invoke(app, ["shrink", "tiny-phi3", "--out", str(tmp_path / "out"), "--init", "fit", "-m", "64",
                                 "--calibration-data", str(world.data), "--target-params", "0.05"])
    assert r.exit_code == 2 and "--target-params 0.05 is out of reach" in r.stderr, (r.exception, r.output)
    assert not (tmp_path / "out").exists()
    # a reachable target does reach the calibration
    r = CliRunner().invoke(app, ["shrink", "tiny-phi3", "--out", str(tmp_path / "out"), "--init", "fit", "-m", "64",
                                 "--calibration-data", str(world.data), "--target-params", "0.9"])
    assert isinstance(r.exception, AssertionError) and "calibration ran" in str(r.exception)
