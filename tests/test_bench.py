"""gpconv bench: runs end to end on tiny models and reports ratios; user errors are one line."""

import json
import os

import pytest
import torch
from typer.testing import CliRunner

import gpconv
from gpconv import GPConvConfig
from gpconv.bench import run_once
from gpconv_cli.main import app
from tiny_models import FAMILIES, MCPG

runner = CliRunner()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    dense = FAMILIES["llama"][0]()
    dense.save_pretrained(root / "dense")
    gpconv.shrink(dense, GPConvConfig(min_channels_per_group=MCPG, init="project"))
    gpconv.save_pretrained(dense, root / "shrunk")
    return root


def _bench(*args):
    return runner.invoke(app, ["bench", *map(str, args)])


def test_bench_json_against_own_dense_equivalent(dirs):
    r = _bench(dirs / "shrunk", "--prompt-len", 16, "--new-tokens", 4, "--repeats", 2, "--no-memory", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["dense"]["name"].startswith("densify(")
    assert 0 < d["ratios"]["params"] < 1 and d["ratios"]["params"] == pytest.approx(
        d["shrunk"]["params"] / d["dense"]["params"])
    for side in ("dense", "shrunk"):
        assert d[side]["prefill_tokens_per_s"] > 0 and d[side]["decode_tokens_per_s"] > 0
        assert len(d[side]["prefill_s"]) == 2 and len(d[side]["decode_s"]) == 2
    assert d["memory_kind"] == "skipped" and d["prompt_len"] == 16 and d["new_tokens"] == 4
    from gpconv.layers import native_status

    assert d["machine"]["native_kernels"] == native_status()  # the numbers say which code made them
    assert d["machine"]["allocator"] in ("glibc", "tcmalloc", "jemalloc", "unknown")  # and which malloc


def test_allocator_names_a_preloaded_malloc(tmp_path):
    """allocator() reads the process's own mappings: glibc here, tcmalloc in a child that preloads it
    (where the library is installed)."""
    import subprocess
    import sys

    from gpconv.system import allocator

    assert allocator() in ("glibc", "unknown")  # the test process preloads nothing
    lib = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
    if not os.path.exists(lib):
        pytest.skip("tcmalloc not installed here")
    out = subprocess.run([sys.executable, "-c", "from gpconv.bench import allocator; print(allocator())"],
                         env={**os.environ, "LD_PRELOAD": lib}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "tcmalloc"


def test_bench_table_with_baseline_and_memory(dirs):
    r = _bench(dirs / "shrunk", "--baseline", dirs / "dense", "--prompt-len", 8, "--new-tokens", 2, "--repeats", 1)
    assert r.exit_code == 0, r.output
    for word in ("prefill tokens/s", "decode tokens/s", "peak memory (rss)", "shrunk/dense", "MiB"):
        assert word in r.stdout, word
    assert str(dirs / "dense") in r.stdout
    assert "gpconv C kernels: " in r.stdout and "; malloc: " in r.stdout


def test_run_once_feeds_the_same_tokens_to_any_model(dirs):
    # teacher forcing: the decode work does not depend on the weights
    m = gpconv.from_pretrained(dirs / "shrunk")
    ids = torch.randint(3, 100, (1, 12))
    calls = []
    real = m.forward

    def spy(*a, **kw):
        calls.append(kw["input_ids"].clone())
        return real(*a, **kw)

    m.forward = spy
    pf, dc = run_once(m, ids, 8, 4)
    assert pf > 0 and dc > 0
    assert torch.equal(calls[0], ids[:, :8]) and [c.shape[1] for c in calls[1:]] == [1, 1, 1, 1]
    assert torch.equal(torch.cat(calls[1:], 1), ids[:, 8:12])


@pytest.mark.parametrize(
    "args, message",
    [
        (["{tmp}/nothing"], "no such model directory"),
        (["{dense}"], "not a gpconv checkpoint; pass --baseline"),
        (["{shrunk}", "--prompt-len", "100000"], "exceeds the model's"),
        (["{shrunk}", "--repeats", "0"], "repeats must be >= 1"),
        (["{shrunk}", "--device", "tpu"], "cpu or cuda"),
        (["{shrunk}", "--dtype", "float7"], "unknown dtype"),
    ],
)
def test_user_errors_one_line_exit_2(dirs, tmp_path, args, message):
    args = [a.format(tmp=tmp_path, dense=dirs / "dense", shrunk=dirs / "shrunk") for a in args]
    r = _bench(*args, "--no-memory")
    assert r.exit_code == 2, r.output
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert "Traceback" not in r.output


def test_static_cache_decode_gives_the_dynamic_caches_logits(tmp_path):
    """The compiled static-cache decode (CUDA graphs on a GPU) computes what the plain cached
    decode computes; gpconv bench --static-cache runs it for both models."""
    import torch

    import gpconv
    from gpconv.bench import StaticDecoder, bench

    from tiny_models import FAMILIES, MCPG

    model = FAMILIES["llama"][0]()
    gpconv.shrink(model, gpconv.GPConvConfig(min_channels_per_group=MCPG, variant="hybrid", rank=3, init="project"))
    ids = torch.randint(3, 128, (1, 14), generator=torch.Generator().manual_seed(0))
    dec = StaticDecoder(model, 14)
    cache = dec.new_cache()
    with torch.no_grad():
        got = [dec.forward(ids[:, :10], cache, 0, compiled=False).logits[:, -1]]
        for t in range(10, 13):
            got.append(dec.forward(ids[:, t:t + 1], cache, t, compiled=True).logits[:, -1])
        ref = model(ids[:, :13]).logits[:, 9:]
    torch.testing.assert_close(torch.stack(got, 1), ref, rtol=1e-4, atol=1e-4)
    gpconv.save_pretrained(model, tmp_path / "m")
    res = bench(str(tmp_path / "m"), prompt_len=8, new_tokens=3, repeats=1, memory=False, static_cache=True)
    assert res.static_cache and res.dense.decode_tokens_per_s > 0 and res.shrunk.decode_tokens_per_s > 0


def test_generate_on_a_static_cache_gives_the_same_tokens():
    import gpconv
    from gpconv.recovery import generate

    model, tok = gpconv.load_model("tiny-phi3")
    a = generate(model, tok, "Hello", max_new_tokens=6)
    b = generate(model, tok, "Hello", max_new_tokens=6, static_cache=True)
    assert a == b
