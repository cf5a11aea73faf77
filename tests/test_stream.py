"""Streaming shrink (gpconv.stream): same checkpoint as load + shrink + save, bit for bit."""

import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import gpconv
from gpconv import GPConvConfig, GPConvError
from gpconv.hub import StreamUnsupported, stream_shrink, weight_files as _weight_files
from gpconv.hub.stream import parse_size, unsupported
from gpconv_cli.main import app
from tiny_models import FAMILIES, MCPG, VOCAB


def _tensors(d):
    out = {}
    for f in _weight_files(d):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                out[k] = fh.get_tensor(k)
    return out


def _assert_same_checkpoint(a_dir, b_dir):
    a, b = _tensors(a_dir), _tensors(b_dir)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ca = json.loads((a_dir / "config.json").read_text())
    cb = json.loads((b_dir / "config.json").read_text())
    assert ca == cb
    assert (a_dir / "modeling_gpconv.py").read_text() == (b_dir / "modeling_gpconv.py").read_text()


def _in_memory(src, out, cfg, dtype=None, seed=7):
    model, tok = gpconv.load_model(str(src), dtype=dtype)
    torch.manual_seed(seed)
    report = gpconv.shrink(model, cfg)
    gpconv.save_pretrained(model, out, tok)
    return model, report


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Plain transformers checkpoints of some tiny families (written once)."""
    root = tmp_path_factory.mktemp("src")
    dirs = {}
    for fam in ("phi3", "gpt2", "llama-tied", "opt"):
        model = FAMILIES[fam][0]()
        model.save_pretrained(root / fam, max_shard_size="40KB")  # sharded input
        dirs[fam] = root / fam
    return dirs


@pytest.mark.parametrize(
    "family, kw, dtype",
    [
        ("phi3", dict(init="random"), None),  # fused qkv / gate_up, random draws in the same order
        ("phi3", dict(init="project"), "bfloat16"),
        ("gpt2", dict(init="project"), None),  # Conv1D (in, out) weights, tied lm_head
        ("llama-tied", dict(init="random", variant="chained"), None),
        ("opt", dict(init="project", variant="hybrid", rank=3), None),  # biases
        ("opt", dict(init="project", permute=True), None),
        ("opt", dict(init="random", variant="lowrank", target_modules=["fc1", "q_proj"],
                     exclude_modules=[r"model\.decoder\.layers\.0\..*"]), "bfloat16"),
    ],
)
def test_stream_equals_in_memory(tmp_path, sources, family, kw, dtype):
    src = sources[family]
    cfg = GPConvConfig(min_channels_per_group=MCPG, **kw)
    model, rep_mem = _in_memory(src, tmp_path / "mem", cfg, dtype)
    torch.manual_seed(7)
    rep = stream_shrink(src, tmp_path / "st", cfg, dtype=dtype, max_shard_size="30KB")
    _assert_same_checkpoint(tmp_path / "mem", tmp_path / "st")
    assert (tmp_path / "st" / "model.safetensors.index.json").is_file()  # really sharded
    assert len(list((tmp_path / "st").glob("*.safetensors"))) > 1
    assert rep.after == rep_mem.after and rep.before == rep_mem.before
    assert [m.name for m in rep.replaced] == [m.name for m in rep_mem.replaced]

    # it loads both ways, with the in-memory model's logits
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    loaded = gpconv.from_pretrained(tmp_path / "st")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_stream_output_loads_with_transformers(tmp_path, sources):
    from transformers import AutoModelForCausalLM

    cfg = GPConvConfig(min_channels_per_group=MCPG, init="project")
    stream_shrink(sources["phi3"], tmp_path / "st", cfg)
    ref = gpconv.from_pretrained(tmp_path / "st")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "st", trust_remote_code=True)
    ids = torch.randint(3, VOCAB, (1, 7))
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, ref(ids).logits)


def test_cli_shrink_streams_local_safetensors(tmp_path, sources, monkeypatch):
    # the in-memory path would load the model: forbid it
    def no_loading(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(gpconv, "load_model", no_loading)
    out = tmp_path / "o"
    r = CliRunner().invoke(app, ["shrink", str(sources["phi3"]), "--out", str(out), "-m", str(MCPG), "--init", "project", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["after"]["total"] < json.loads(r.stdout)["before"]["total"]
    assert (out / "gpconv_report.json").is_file() and (out / "config.json").is_file()
    assert "gpconv" in json.loads((out / "config.json").read_text())


def test_cli_shrink_demo_name_still_loads(tmp_path):
    out = tmp_path / "o"
    r = CliRunner().invoke(app, ["shrink", "tiny-phi3", "--out", str(out), "-m", "64", "--json"])
    assert r.exit_code == 0, r.output
    assert (out / "config.json").is_file()


def test_unsupported_configs_fall_back_before_writing(tmp_path, sources):
    out = tmp_path / "o"
    for cfg in (GPConvConfig(min_channels_per_group=MCPG, init="fit"),
                GPConvConfig(min_channels_per_group=MCPG, variant="hybrid", rank=None)
                if "target_params" in GPConvConfig.__dataclass_fields__ else GPConvConfig(init="fit")):
        assert unsupported(cfg) is not None
        with pytest.raises(StreamUnsupported):
            stream_shrink(sources["phi3"], out, cfg)
    with pytest.raises(StreamUnsupported):  # not a local safetensors directory
        stream_shrink("tiny-phi3", out, GPConvConfig())
    assert not out.exists()


def test_checkpoint_missing_a_tensor_falls_back(tmp_path):
    model = FAMILIES["phi3"][0]()
    sd = {k: v for k, v in model.state_dict().items() if "layers.1.mlp.down_proj" not in k}
    src = tmp_path / "src"
    model.save_pretrained(src, state_dict=sd)
    with pytest.raises(StreamUnsupported, match="down_proj"):
        stream_shrink(src, tmp_path / "o", GPConvConfig(min_channels_per_group=MCPG))
    assert not (tmp_path / "o").exists()


def test_failure_midway_leaves_nothing(tmp_path, sources, monkeypatch):
    import gpconv.hub.stream as init_mod  # the module that calls fit_layer

    real, calls = init_mod.fit_layer, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return real(*a, **k)

    monkeypatch.setattr(init_mod, "fit_layer", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        stream_shrink(sources["phi3"], tmp_path / "o", GPConvConfig(min_channels_per_group=MCPG))
    assert list(tmp_path.iterdir()) == []


def test_existing_output_refused(tmp_path, sources):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(GPConvError, match="not empty"):
        stream_shrink(sources["phi3"], out, GPConvConfig(min_channels_per_group=MCPG))
    assert [p.name for p in out.iterdir()] == ["keep"]


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size("40KB") == 40_000
    assert parse_size(123) == 123
    with pytest.raises(GPConvError, match="shard size"):
        parse_size("lots")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dtype", "float7"], "unknown dtype"),
        (["-m", "0"], "min_channels_per_group must be a positive integer"),
        (["-t", "nonexistent_proj"], "no module matched target_modules='nonexistent_proj'"),
    ],
)
def test_cli_streaming_user_errors_one_line_exit_2(tmp_path, sources, extra, message):
    out = tmp_path / "o"
    r = CliRunner().invoke(app, ["shrink", str(sources["phi3"]), "--out", str(out), "--init", "project", *extra])
    assert r.exit_code == 2, r.output
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert "Traceback" not in r.output
    assert not out.exists() and list(tmp_path.iterdir()) == []
