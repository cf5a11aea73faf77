"""benchmarks/compare.py's student hand-over (surgery on one machine, recovery on another):
``--save-students`` writes a student that ``--students`` loads back with identical logits, and
benchmarks/pack_student.py's smaller copy (tensors equal to the teacher's left out, matrices in
bf16) loads back to the same model up to bf16 rounding; benchmarks/bench_precision.py trains in both
precisions."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import gpconv
from gpconv import GPConvConfig, shrink
from gpconv.layers.cpu import native

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_saved_and_packed_students_load_back(tmp_path, monkeypatch):
    compare, pack = _script("compare"), _script("pack_student")
    teacher, tok = gpconv.load_model("tiny-phi3")
    student, _ = gpconv.load_model("tiny-phi3")
    report = shrink(student, GPConvConfig(variant="lowrank", rank=0.25, init="project"))
    ids = torch.randint(0, teacher.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    want = _logits(student, ids)

    saved = tmp_path / "students" / "svd@0.25"
    compare.save_student(saved, student, report, "grouped", 1.5, tok)
    loaded, rep, mode, surgery_s = compare.load_student(saved, teacher, "cpu")
    replaced = sum(m.status == "replaced" for m in report.modules)
    assert replaced and (mode, surgery_s, compare._variant_counts(rep)) == ("grouped", 1.5, {"lowrank": replaced})
    assert rep.after.non_embedding == report.after.non_embedding == gpconv.surgery.count_parameters(loaded).non_embedding
    assert rep.kept_fraction == report.kept_fraction
    torch.testing.assert_close(_logits(loaded, ids), want, atol=0, rtol=0)

    packed = tmp_path / "packed" / "svd@0.25"
    monkeypatch.setattr(sys, "argv", ["pack_student.py", str(saved), str(packed), "--teacher", "tiny-phi3"])
    pack.main()
    from safetensors import safe_open

    with safe_open(str(packed / "model.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
        dtypes = {fh.get_tensor(k).dtype for k in keys if fh.get_tensor(k).dim() >= 2}
    assert "model.embed_tokens.weight" not in keys  # the teacher's, unchanged by surgery
    assert dtypes == {torch.bfloat16}
    small, *_ = compare.load_student(packed, teacher, "cpu")
    assert all(p.dtype == torch.float32 for p in small.parameters())
    torch.testing.assert_close(small.model.embed_tokens.weight, teacher.model.embed_tokens.weight, atol=0, rtol=0)
    got = _logits(small, ids)
    assert not torch.equal(got, want)  # bf16 rounding is visible ...
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.05)  # ... and small


def test_bench_precision_runs_both_precisions(tmp_path, monkeypatch, capsys):
    import json

    bench = _script("bench_precision")
    student, tok = gpconv.load_model("tiny-phi3")
    shrink(student, GPConvConfig(min_channels_per_group=64, init="project"))
    gpconv.save_pretrained(student, tmp_path / "student", tok)
    rows = [{"instruction": f"Say {w}", "response": w} for w in ["one", "two", "three", "four"] * 12]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    monkeypatch.setattr(sys, "argv", ["bench_precision.py", str(tmp_path / "student"), "--teacher", "tiny-phi3",
                                      "--data", str(tmp_path / "d.jsonl"), "--format", "kphi3", "--steps", "2",
                                      "--rounds", "1", "--batch-size", "2", "--block-size", "32", "--native-off"])
    bench.main()
    out = capsys.readouterr().out
    losses = {line.split()[2].rstrip(":"): float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if line.startswith("round")}
    assert set(losses) == {"fp32", "bf16", "fp32-native-off"}
    assert abs(losses["bf16"] - losses["fp32"]) < 0.05 * losses["fp32"]  # same step, bf16 rounding only
    assert abs(losses["fp32-native-off"] - losses["fp32"]) < 1e-3 * losses["fp32"]  # same maths, fp32
    assert "fp32 / bf16 time, best of 1:" in out and "fp32 native off / on time, best of 1:" in out
    from gpconv.layers import KernelConfig, kernel_config

    assert kernel_config() == KernelConfig.detect()  # restored


def test_bench_block_times_every_side(tmp_path):
    """bench_block.py at one Phi-3 shape on the many-token CPU path: dense, grouped, floor and the
    block under other routings (native kernels off, ..., Triton off: the same CPU path here), in
    one run, with ratios computed from the same medians."""
    import json

    bench = _script("bench_block")
    out = tmp_path / "block.json"
    assert bench.main(["--layers", "o_proj", "--tokens", "128", "--reps", "1", "--threads", "1",
                       "--floor", "--torch-copy", "--two-gemm", "--fused", "--unfused-dx", "--no-triton",
                       "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert [r["pass_"] for r in rep["rows"]] == ["forward", "forward+backward"]
    for r in rep["rows"]:
        assert r["groups"] == 12 and r["param_ratio"] == 2 / 12
        assert set(r["samples_ms"]) == {"dense", "grouped", "floor", "torch-copy", "two-gemm", "fused", "unfused-dx",
                                        "no-triton"}
        assert r["time_over_param"] == pytest.approx(r["grouped_ms"] / r["dense_ms"] / r["param_ratio"])
        assert r["torch-copy_ms"] > 0 and r["floor_ms"] > 0
    assert rep["machine"]["native"] == gpconv.layers.native_status()


@pytest.mark.skipif(native.ext is None or native.isa() == "portable",
                    reason="the gradient kernels need gpconv's C kernels on an AVX2 CPU")
def test_bench_backward_times_both_gradients(tmp_path, capsys):
    """bench_backward.py checks the fused and unfused gradients agree, then times both, per shape."""
    import json

    bench = _script("bench_backward")
    out = tmp_path / "bwd.json"
    assert bench.main(["--shapes", "a=96:72:12", "b=64:24:64", "--tokens", "50", "--reps", "2", "--threads", "1",
                       "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["shape"], r["grad"], r["groups"]) for r in rows] == [("a", "dx", 8), ("a", "dW", 8), ("b", "dx", 1),
                                                                   ("b", "dW", 1)]
    for r in rows:
        assert len(r["samples_ms"]["fused"]) == 2 and r["fused_ms"] > 0 and r["unfused_ms"] > 0
    with pytest.raises(SystemExit, match="bad --shapes entry"):
        bench.main(["--shapes", "a=96:72"])
    out = tmp_path / "steps.json"  # whole training steps of a shrunk model, kernels on and off, and dense
    assert bench.main(["--model", "tiny-phi3", "--mcpg", "64", "--batch", "1", "--seq", "16", "--reps", "1",
                       "--threads", "1", "--json", str(out)]) == 0
    (r,) = json.loads(out.read_text())["rows"]
    assert r["tokens"] == 16 and set(r["samples_ms"]) == {"fused", "unfused", "dense"} and r["dense_ms"] > 0


def test_bench_routes_times_every_path_and_names_the_default(tmp_path, capsys):
    """bench_routes.py checks every inference path equals the block, times them, and reports the
    fastest and the path gpconv's defaults take (recorded from the real call)."""
    import json

    bench = _script("bench_routes")
    out = tmp_path / "routes.json"
    assert bench.main(["--shapes", "a=96:72:12", "--tokens", "1", "20", "40", "130", "--reps", "2", "--threads", "1",
                       "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["tokens"], r["groups"]) for r in rows] == [(1, 8), (20, 8), (40, 8), (130, 8)]
    kernels = native.ext is not None and native.isa() != "portable"  # timed
    used = kernels and gpconv.layers.kernel_config().native and gpconv.layers.kernel_config().fused_forward  # taken by default
    expected = {"gather+bmm", "two-gemm"} | ({"io_small", "io_forward"} if kernels else set())
    for r in rows:
        assert set(r["ms"]) == expected and all(len(v) == 2 for v in r["samples_ms"].values())
        assert r["fastest"] == min(r["ms"], key=r["ms"].get)
        assert r["default_over_fastest"] == pytest.approx(r["ms"][r["default"]] / r["ms"][r["fastest"]])
    small = gpconv.layers.kernel_config().small_max_tokens
    assert [r["default"] for r in rows] == (
        ["io_small", "io_small" if small >= 20 else "gather+bmm", "io_forward", "io_forward"] if used
        else ["gather+bmm", "gather+bmm", "gather+bmm", "two-gemm"])
    with pytest.raises(SystemExit, match="bad --shapes entry"):
        bench.main(["--shapes", "a=96:72"])


def test_bench_block_takes_other_shapes(tmp_path, capsys):
    """--shapes NAME=IN:OUT times any layer shape (groups from --min-channels-per-group); a
    malformed one is one clear line and exit code 2."""
    import json

    bench = _script("bench_block")
    out = tmp_path / "block.json"
    assert bench.main(["--shapes", "down=96:36", "q=48:48", "--min-channels-per-group", "8", "--tokens", "40",
                       "--reps", "1", "--threads", "1", "--fused", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["layer"], r["in_features"], r["out_features"], r["groups"]) for r in rows] == [
        ("down", 96, 36, 12), ("down", 96, 36, 12), ("q", 48, 48, 6), ("q", 48, 48, 6)]
    assert all(r["fused_ms"] > 0 for r in rows)
    assert bench.main(["--shapes", "down=96x36"]) == 2
    assert "--shapes takes NAME=IN:OUT" in capsys.readouterr().err


def test_profile_decode_splits_a_step(capsys):
    """profile_decode.py times every gpconv layer and the output head inside real decode steps;
    the parts add up to the wall time, and a missing model is one line and exit code 2."""
    from tiny_models import FAMILIES, MCPG

    prof = _script("profile_decode")
    build, _, _ = FAMILIES["phi3"]
    model = build()
    report = shrink(model, GPConvConfig(min_channels_per_group=MCPG, init="project"))
    res = prof.profile(model, prompt_len=6, steps=3, warmup=1)
    assert res["gpconv_layers"] == len(report.replaced) > 0
    assert res["gpconv_layers_ms"] > 0 and res["head_ms"] > 0 and res["rest_ms"] > 0
    assert res["gpconv_layers_ms"] + res["head_ms"] + res["rest_ms"] == pytest.approx(res["wall_ms"])
    assert res["gpconv_layers_ms"] + res["head_ms"] < res["wall_ms"]
    assert prof.main(["/nonexistent/model"]) == 2
    assert "profile_decode: no such file or directory" in capsys.readouterr().err
