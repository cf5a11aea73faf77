"""The recovery commands end to end on tiny models: distill, train, eval, generate; user errors."""

import json

import pytest
from typer.testing import CliRunner

import gpconv
from gpconv import GPConvConfig, shrink
from gpconv.models import tiny_phi3
from gpconv_cli.main import app

runner = CliRunner()
SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    teacher, tok = tiny_phi3(seed=1, **SMALL)
    gpconv.save_pretrained(teacher, d / "teacher", tok)
    shrink(teacher, GPConvConfig(min_channels_per_group=16, init="project"))
    gpconv.save_pretrained(teacher, d / "student", tok)
    rows = [{"instruction": f"Spell {w}", "output": " ".join(w), "input": ""} for w in ["cat", "dog", "emu", "owl"] * 8]
    (d / "data.json").write_text(json.dumps(rows))
    (d / "odd.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    return d


COMMON = ("--block-size", 32, "--batch-size", 4, "--val-size", 4, "--no-progress")


def test_distill_eval_generate(setup, tmp_path):
    d = setup
    out = tmp_path / "kd"
    r = run("distill", d / "student", "--teacher", d / "teacher", "--data", d / "data.json", "--out", out,
            "--max-steps", 4, "--save-every", 2, "--lr", 3e-3, *COMMON)
    assert r.exit_code == 0, r.output
    assert "validation: loss" in r.output and (out / "config.json").is_file() and (out / "loss.png").is_file()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]

    r = run("eval", out, "--teacher", d / "teacher", "--data", d / "data.json", "--block-size", 32, "--val-size", 4, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert set(res) >= {"student", "teacher"} and res["student"]["tokens"] == res["teacher"]["tokens"] > 0
    final = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert res["student"]["loss"] == pytest.approx(final["loss"], rel=1e-5)  # the same held-out rows

    r = run("generate", out, "Spell cat", "--max-new-tokens", 4)
    assert r.exit_code == 0, r.output

    # --resume after the run finished picks up the last checkpoint and ends at the same step
    r = run("distill", d / "student", "--teacher", d / "teacher", "--data", d / "data.json", "--out", out,
            "--max-steps", 4, "--save-every", 2, "--lr", 3e-3, "--resume", *COMMON)
    assert r.exit_code == 0, r.output
    assert "trained 4 steps" in r.output


def test_train_from_config_file(setup, tmp_path):
    cfg = tmp_path / "config.json"
    tiny_phi3(**SMALL)[0].config.to_json_file(cfg)
    r = run("train", cfg, "--data", setup / "data.json", "--out", tmp_path / "scratch", "--max-steps", 2,
            "--tokenizer", "tiny-phi3", *COMMON)
    assert r.exit_code == 0, r.output
    assert gpconv.load_model(str(tmp_path / "scratch"))[0].config.hidden_size == 64  # a plain dense checkpoint
    r = run("train", cfg, "--data", setup / "data.json", "--out", tmp_path / "x", "--max-steps", 2, *COMMON)
    assert r.exit_code == 2 and "--tokenizer" in r.output


@pytest.mark.parametrize(
    "args, message",
    [
        (("--data", "{d}/odd.jsonl"), "fit none of the known layouts"),
        (("--data", "{d}/data.json", "--train", "everything"), "unknown train mode"),
        (("--data", "{d}/data.json", "--format", "alpaca"), "unknown data format"),
        (("--data", "{d}/data.json", "--val-size", "lots"), "--val-size"),
        (("--data", "{d}/missing.jsonl"), "no such data file"),
    ],
)
def test_user_errors_are_one_line(setup, tmp_path, args, message):
    out = tmp_path / "out"
    r = run("distill", setup / "student", "--teacher", setup / "teacher", "--out", out,
            *COMMON, *[a.format(d=setup) for a in args])
    assert r.exit_code == 2, r.output
    assert message in r.output and r.output.strip().count("\n") == 0
    assert not out.exists() or not any(out.iterdir())


def test_checks_come_before_loading_models(setup, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "file").write_text("x")
    r = run("distill", "does-not-matter", "--teacher", "nor-this", "--data", setup / "data.json", "--out", out)
    assert r.exit_code == 2 and "not empty" in r.output
    r = run("distill", "does-not-matter", "--teacher", "nor-this", "--data", setup / "odd.jsonl", "--out", tmp_path / "new")
    assert r.exit_code == 2 and "fit none" in r.output
    # a stream has no length: without --max-steps it is refused before any model loads
    r = run("distill", "does-not-matter", "--teacher", "nor-this", "--data", setup / "data.json", "--streaming",
            "--out", tmp_path / "new")
    assert r.exit_code == 2 and "--max-steps" in r.output and not (tmp_path / "new").exists()


def test_help_has_examples():
    for cmd in ("distill", "train", "eval", "generate"):
        r = run(cmd, "--help")
        assert r.exit_code == 0 and "Examples" in r.output
