"""The recovery commands end to end on tiny models: distill, train, eval, generate; user errors."""

import json

import pytest
from typer.testing import CliRunner

import gpconv
from gpconv.hub import tiny_phi3
from gpconv_cli.main import app
from tiny_models import save_teacher_student

runner = CliRunner()
SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    save_teacher_student(d)
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


def test_distill_with_a_teacher_cache(setup, tmp_path):
    d = setup
    cache = tmp_path / "tc"
    args = ("--data", d / "data.json", "--max-steps", 2, "--lr", 3e-3, *COMMON)
    r = run("distill", d / "student", "--teacher", d / "teacher", "--out", tmp_path / "a", "--teacher-top-k", 8,
            "--teacher-cache", cache, *args)
    assert r.exit_code == 0, r.output
    assert "teacher cache: " in r.output and gpconv.TeacherCache.load(cache).top_k == 8
    n = len(gpconv.TeacherCache.load(cache))
    # an epoch covers every block: after it the cache holds them all and the teacher is not loaded again
    r = run("distill", d / "student", "--teacher", d / "teacher", "--out", tmp_path / "b", "--teacher-cache", cache,
            "--data", d / "data.json", "--epochs", 1, "--lr", 3e-3, *COMMON)
    assert r.exit_code == 0, r.output
    full = len(gpconv.TeacherCache.load(cache))
    assert full > n
    r = run("distill", d / "student", "--teacher", "not-loaded-so-never-resolved", "--out", tmp_path / "c",
            "--teacher-cache", cache, *args)
    assert r.exit_code == 0, r.output
    assert f"holds all {full} training blocks: the teacher is not loaded" in r.output
    assert "0 computed" in r.output
    # settings that disagree with the cache: one line, before any model loads
    for extra, message in [(("--teacher-top-k", 4), "keeps the top 8"), (("--temperature", 2), "was made at 1.0"),
                           (("--hidden-weight", 1), "no --hidden-weight")]:
        r = run("distill", "nope", "--teacher", "nope", "--out", tmp_path / "x", "--teacher-cache", cache, *extra, *args)
        assert r.exit_code == 2 and message in r.output and r.output.strip().count("\n") == 0, r.output
    r = run("distill", "nope", "--teacher", "nope", "--out", tmp_path / "x", "--teacher-cache", tmp_path / "new", *args)
    assert r.exit_code == 2 and "give --teacher-top-k" in r.output


@pytest.mark.parametrize("command", ["distill", "train"])
def test_options_reach_the_run_config(setup, tmp_path, command):
    # every shared option lands in TrainConfig under its own name, including the three the CLI renames
    d = setup
    out = tmp_path / command
    extra = ("--teacher", d / "teacher", "--kl-weight", 0.5, "--ce-weight", 0.25) if command == "distill" else ()
    r = run(command, d / "student", *extra, "--data", d / "data.json", "--out", out, "--max-steps", 2, "--lr", 2e-3,
            "--grad-accum", 2, "--warmup-ratio", 0.5, "--weight-decay", 0.01, "--max-grad-norm", 0,
            "--grouped-lr-scale", 0.5, "--metrics", "csv", "--save-every", 0, "--log-every", 1, "--seed", 3, *COMMON)
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "train_config.json").read_text())
    assert (cfg["lr"], cfg["grad_accum"], cfg["warmup_ratio"], cfg["weight_decay"]) == (2e-3, 2, 0.5, 0.01)
    assert (cfg["max_grad_norm"], cfg["grouped_lr_scale"], cfg["metrics_format"]) == (None, 0.5, "csv")
    assert (cfg["progress"], cfg["save_every"], cfg["log_every"], cfg["seed"], cfg["batch_size"]) == (False, 0, 1, 3, 4)
    assert cfg["train"] == ("grouped" if command == "distill" else "all")
    if command == "distill":
        assert (cfg["kl_weight"], cfg["ce_weight"]) == (0.5, 0.25)
    assert (out / "metrics.csv").is_file()


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
