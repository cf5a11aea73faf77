"""The CLI: commands work end to end; every user error is one line, exit 2, nothing written."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from gpconv_cli.main import app
from test_report import phi3_mini_config

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def phi3_config_dir(tmp_path):
    d = tmp_path / "phi3-2l"
    phi3_mini_config(num_hidden_layers=2).save_pretrained(d)  # config.json only
    return d


def test_report_config_only_dir_dense_and_shrunk(phi3_config_dir):
    r = run("report", phi3_config_dir, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["after"]["non_embedding"] == 226_507_776

    cfg = json.loads((phi3_config_dir / "config.json").read_text())
    cfg["intermediate_size"] = 9216
    (phi3_config_dir / "config.json").write_text(json.dumps(cfg))
    r = run("report", phi3_config_dir, "-m", 256, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["after"]["non_embedding"] == 35_011_584 and d["dry_run"]


def test_shrink_demo_then_report_and_densify(tmp_path):
    out = tmp_path / "tiny-kphi3"
    r = run("shrink", "tiny-phi3", "--out", out, "-m", 64, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert (out / "config.json").is_file() and (out / "gpconv_report.md").is_file()
    r2 = run("report", out, "--json")
    assert json.loads(r2.stdout)["after"] == rep["after"]
    r3 = run("densify", out, "--out", tmp_path / "dense")
    assert r3.exit_code == 0, r3.output
    assert json.loads(run("report", tmp_path / "dense", "--json").stdout)["after"] == rep["before"]


def test_dry_run_writes_nothing(tmp_path):
    r = run("shrink", "tiny-phi3", "--out", tmp_path / "o", "--dry-run", "-m", 64, "-t", "mlp", "--json")
    assert r.exit_code == 0, r.output
    assert {m["kind"] for m in json.loads(r.stdout)["modules"]} == {"mlp"}
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["shrink", "./no/such/model", "--out", "{out}"], "no such file or directory"),
        (["shrink", "tiny-phi3", "--out", "{out}", "-t", "nonexistent_proj"], "no module matched target_modules='nonexistent_proj'"),
        (["shrink", "tiny-phi3", "--out", "{out}", "-m", "0"], "min_channels_per_group must be a positive integer"),
        (["shrink", "tiny-phi3", "--out", "{out}", "-m", "-5"], "min_channels_per_group must be a positive integer"),
        (["shrink", "tiny-phi3", "--out", "{out}", "--variant", "zigzag"], "unknown variant"),
        (["shrink", "tiny-phi3", "--out", "{out}", "--dtype", "float7"], "unknown dtype"),
        (["shrink", "tiny-phi3", "--out", "{out}", "--override", "down_proj"], "PATTERN=N"),
        (["shrink", "tiny-phi3"], "--out DIR is required"),
        (["report", "{tmp}"], "without config.json"),
        (["densify", "{tmp}/nothing", "--out", "{out}"], "no such model directory"),
        (["shrink", "tiny-phi3", "--out", "{out}", "-m", "4096"], "nothing to save: no layer was replaced"),
        (["shrink", "{tmp}/corrupt", "--out", "{out}", "--init", "project"], "not a valid safetensors file"),
        (["shrink", "tiny-phi3", "--out", "{out}", "--refine-steps", "5"], "--refine-steps needs --sequential"),
        (["distill", "tiny-phi3", "--teacher", "tiny-phi3", "--data", "{tmp}/d.json", "--out", "{out}",
          "--grouped-lr-scale", "-1"], "grouped_lr_scale must be >= 0"),
    ],
)
def test_user_errors_are_one_line_exit_2_nothing_written(tmp_path, args, message):
    out = tmp_path / "out"
    corrupt = tmp_path / "corrupt"  # a valid config beside a truncated weights file
    phi3_mini_config(num_hidden_layers=1).save_pretrained(corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x08\x00")
    args = [a.format(out=out, tmp=tmp_path) for a in args]
    r = run(*args)
    assert r.exit_code == 2, r.output
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert "Traceback" not in r.output
    assert not out.exists()


def test_existing_output_refused_before_any_work(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "f").write_text("x")
    r = run("shrink", "tiny-phi3", "--out", out, "-m", 64)
    assert r.exit_code == 2 and "--overwrite" in r.stderr
    assert [p.name for p in out.iterdir()] == ["f"]
    r = run("shrink", "tiny-phi3", "--out", out, "-m", 64, "--overwrite", "--json")
    assert r.exit_code == 0 and (out / "config.json").is_file()


def test_help_has_examples():
    for args in ([], ["shrink"], ["report"], ["densify"], ["bench"], ["run"]):
        r = run(*args, "--help")
        assert r.exit_code == 0 and "Example" in r.output, args
    assert "gpconv shrink tiny-phi3" in run("shrink", "--help").output


def test_console_script_installed(tmp_path):
    # the real entry point, as a user runs it
    r = subprocess.run([sys.executable, "-m", "gpconv_cli", "report", "tiny-phi3", "-m", "64", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["after"]["non_embedding"] == 2_559_744
