"""End-to-end speed of a shrunk model against its dense baseline: ``gpconv bench``.

Three numbers per model, measured in one run:

* **prefill tokens/s** - one forward pass over a prompt of ``prompt_len`` tokens (batch
  ``batch``), filling the KV cache; only the last position's logits are computed, as
  ``generate`` does;
* **decode tokens/s** - ``new_tokens`` single-token steps on that KV cache. The tokens fed
  are fixed random ids (teacher forcing), not each model's argmax, so both models do exactly
  the same work whatever their weights say;
* **peak memory** - on CUDA ``torch.cuda.max_memory_allocated`` while only that model is on
  the GPU; on CPU the peak RSS (VmHWM) of a fresh child process that loads only that model and
  runs the same prefill + decode once (so one model's weights never count for the other). The
  child's RSS before loading (Python + torch + transformers) is reported too, and the weight
  bytes are counted exactly.

Timings interleave the two models (dense, shrunk, dense, shrunk, ...) after one warm-up round
and keep medians, so machine load affects both alike. Every ratio is shrunk / dense: a speed-up
reads as a tokens/s ratio > 1, a saving as a memory ratio < 1.
"""

from __future__ import annotations

import copy
import inspect
import json
import multiprocessing as mp
import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from . import system
from .errors import GPConvError
from .hfutil import parse_dtype
from .hub import is_gpconv_dir, load_model
from .layers import native_status
from .surgery import densify


@dataclass
class ModelResult:
    name: str
    params: int
    weight_bytes: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    peak_memory_bytes: int | None = None
    base_memory_bytes: int | None = None  # CPU: child RSS before loading the model
    prefill_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)


@dataclass
class BenchResult:
    device: str
    dtype: str
    batch: int
    prompt_len: int
    new_tokens: int
    repeats: int
    threads: int
    memory_kind: str  # "rss" | "cuda_max_allocated" | "skipped"
    dense: ModelResult
    shrunk: ModelResult
    machine: dict
    loadavg: tuple[str, str]
    static_cache: bool = False
    """Decode ran on a static KV cache with a compiled step (CUDA graphs on a GPU)."""

    @property
    def ratios(self) -> dict:
        d, s = self.dense, self.shrunk
        r = {
            "params": s.params / d.params,
            "weight_bytes": s.weight_bytes / d.weight_bytes,
            "prefill_tokens_per_s": s.prefill_tokens_per_s / d.prefill_tokens_per_s,
            "decode_tokens_per_s": s.decode_tokens_per_s / d.decode_tokens_per_s,
        }
        if d.peak_memory_bytes and s.peak_memory_bytes:
            r["peak_memory"] = s.peak_memory_bytes / d.peak_memory_bytes
        return r

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ratios"] = self.ratios
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        d, s, r = self.dense, self.shrunk, self.ratios
        mib = 2**20

        def mem(m: ModelResult) -> str:
            return "-" if m.peak_memory_bytes is None else f"{m.peak_memory_bytes / mib:,.0f} MiB"

        rows = [
            ("parameters", f"{d.params:,}", f"{s.params:,}", f"{r['params']:.3f}"),
            ("weights", f"{d.weight_bytes / mib:,.1f} MiB", f"{s.weight_bytes / mib:,.1f} MiB", f"{r['weight_bytes']:.3f}"),
            ("prefill tokens/s", f"{d.prefill_tokens_per_s:,.1f}", f"{s.prefill_tokens_per_s:,.1f}", f"{r['prefill_tokens_per_s']:.2f}x"),
            ("decode tokens/s", f"{d.decode_tokens_per_s:,.1f}", f"{s.decode_tokens_per_s:,.1f}", f"{r['decode_tokens_per_s']:.2f}x"),
            (f"peak memory ({self.memory_kind})", mem(d), mem(s), f"{r['peak_memory']:.3f}" if "peak_memory" in r else "-"),
        ]
        w0 = max(len(x[0]) for x in rows)
        w = [max(len(x[i]) for x in rows + [("", "dense", "shrunk", "shrunk/dense")]) for i in range(4)]
        head = f"{'':<{w0}}  {'dense':>{w[1]}}  {'shrunk':>{w[2]}}  {'shrunk/dense':>{w[3]}}"
        lines = [
            f"{s.name} vs {d.name}",
            f"{self.device} {self.dtype}, threads {self.threads}, batch {self.batch}, prompt {self.prompt_len}, "
            f"decode {self.new_tokens}{' (static cache, compiled step)' if self.static_cache else ''}, "
            f"{self.repeats} interleaved repeats (medians)",
            head,
        ]
        lines += [f"{a:<{w0}}  {b:>{w[1]}}  {c:>{w[2]}}  {e:>{w[3]}}" for a, b, c, e in rows]
        if self.memory_kind == "rss" and d.base_memory_bytes:
            lines.append(f"(RSS of a child before loading a model: {d.base_memory_bytes / mib:,.0f} MiB)")
        lines.append(f"loadavg before/after: {self.loadavg[0]} / {self.loadavg[1]}")
        if self.device == "cpu" and "native_kernels" in self.machine:
            lines.append(f"gpconv C kernels: {self.machine['native_kernels']}; malloc: {self.machine.get('allocator', '?')}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The workload
# --------------------------------------------------------------------------------------------


def _token_ids(vocab: int, batch: int, length: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    hi = max(2, min(vocab, 32000))
    return torch.randint(1, hi, (batch, length), generator=g)


def _forward_kwargs(model) -> tuple[str, bool]:
    """(name of the KV-cache argument, whether ``logits_to_keep`` exists) for ``model.forward``.

    transformers 5.x renamed ``past_key_values`` to ``cache``; older versions only know the former.
    A torch.compile'd model is read through to the module it wraps (its own forward takes **kwargs).
    """
    params = inspect.signature(getattr(model, "_orig_mod", model).forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


def _forward(model, ids, past, names):
    cache_arg, keep = names
    kw = dict(input_ids=ids, use_cache=True)
    if past is not None:
        kw[cache_arg] = past
    if keep:
        kw["logits_to_keep"] = 1  # the last position only, as generate() does
    out = model(**kw)
    return out.get("cache") if "cache" in out else out.get("past_key_values")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def run_once(model, ids: torch.Tensor, prompt_len: int, new_tokens: int) -> tuple[float, float]:
    """Seconds for the prefill of ``ids[:, :prompt_len]`` and for ``new_tokens`` cached decode steps."""
    device = ids.device
    names = _forward_kwargs(model)
    _sync(device)
    t0 = time.perf_counter()
    past = _forward(model, ids[:, :prompt_len], None, names)
    _sync(device)
    t1 = time.perf_counter()
    for k in range(new_tokens):
        past = _forward(model, ids[:, prompt_len + k: prompt_len + k + 1], past, names)
    _sync(device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


class StaticDecoder:
    """Decode steps on a static KV cache with the one-token step compiled once
    (``torch.compile(mode="reduce-overhead")``: CUDA graphs on a GPU, where a 1-token step is
    bound by kernel launches; on a CPU the same compiled step without graphs)."""

    def __init__(self, model, max_len: int):
        from transformers import StaticCache  # (only this decode path needs it)

        self.model, self.max_len = model, max_len
        self.cache_arg, self.keep = _forward_kwargs(model)
        self.step = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True, dynamic=False)
        self.cache_cls = StaticCache

    def new_cache(self):
        return self.cache_cls(config=self.model.config, max_cache_len=self.max_len)

    def forward(self, ids, cache, start: int, compiled: bool):
        kw = dict(input_ids=ids, use_cache=True, cache_position=torch.arange(start, start + ids.shape[1], device=ids.device))
        kw[self.cache_arg] = cache
        if self.keep:
            kw["logits_to_keep"] = 1
        return (self.step if compiled else self.model)(**kw)

    @torch.inference_mode()
    def run_once(self, ids: torch.Tensor, prompt_len: int, new_tokens: int) -> tuple[float, float]:
        device = ids.device
        cache = self.new_cache()
        _sync(device)
        t0 = time.perf_counter()
        self.forward(ids[:, :prompt_len], cache, 0, compiled=False)  # prefill: one pass, eager
        _sync(device)
        t1 = time.perf_counter()
        for k in range(new_tokens):
            self.forward(ids[:, prompt_len + k: prompt_len + k + 1], cache, prompt_len + k, compiled=True)
        _sync(device)
        return t1 - t0, time.perf_counter() - t1


def _param_stats(model) -> tuple[int, int]:
    seen, n, b = set(), 0, 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        b += t.numel() * t.element_size()
        if isinstance(t, torch.nn.Parameter):
            n += t.numel()
    return n, b


# --------------------------------------------------------------------------------------------
# Loading the pair
# --------------------------------------------------------------------------------------------


def load_pair(model_dir: str, baseline: str | None, dtype=None):
    """``(dense, shrunk, dense_name, shrunk_name)``; without ``baseline``, dense = densify(copy)."""
    if not os.path.isdir(os.path.expanduser(model_dir)):
        raise GPConvError(f"no such model directory: {model_dir}")
    if not is_gpconv_dir(model_dir) and baseline is None:
        raise GPConvError(f"{model_dir} is not a gpconv checkpoint; pass --baseline DENSE to compare two models")
    shrunk, _ = load_model(str(model_dir), dtype=dtype)
    if baseline is None:
        dense = densify(copy.deepcopy(shrunk))
        dense_name = f"densify({model_dir})"
    else:
        dense, _ = load_model(baseline, dtype=dtype)
        dense_name = baseline
    dense_vocab, shrunk_vocab = dense.config.vocab_size, shrunk.config.vocab_size
    if dense_vocab != shrunk_vocab:
        raise GPConvError(f"the baseline's vocabulary ({dense_vocab}) differs from the model's ({shrunk_vocab})")
    return dense.eval(), shrunk.eval(), dense_name, str(model_dir)


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def _rss_bytes(field_name: str = "VmRSS") -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_rss_bytes() -> int:
    hwm = _rss_bytes("VmHWM")
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _memory_child(which: str, model_dir: str, baseline: str | None, dtype, batch, prompt_len, new_tokens, threads, q):
    """In a fresh process: load one model, run the workload once, report peak RSS."""
    try:
        torch.set_num_threads(threads)
        base = _rss_bytes()
        if which == "shrunk":
            model, _ = load_model(model_dir, dtype=dtype)
        elif baseline is not None:
            model, _ = load_model(baseline, dtype=dtype)
        else:
            model, _ = load_model(model_dir, dtype=dtype)
            densify(model)
        ids = _token_ids(model.config.vocab_size, batch, prompt_len + new_tokens)
        run_once(model.eval(), ids, prompt_len, new_tokens)
        q.put((base, _peak_rss_bytes(), None))
    except BaseException as e:  # report, never hang the parent
        q.put((None, None, f"{type(e).__name__}: {e}"))


def _cpu_peak_rss(which, model_dir, baseline, dtype, batch, prompt_len, new_tokens, threads):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_memory_child, args=(which, model_dir, baseline, dtype, batch, prompt_len, new_tokens, threads, q))
    p.start()
    try:
        base, peak, err = q.get(timeout=3600)
    finally:
        p.join()
    if err is not None:
        raise GPConvError(f"memory probe of the {which} model failed: {err}")
    return base, peak


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------


def bench(
    model_dir: str,
    baseline: str | None = None,
    *,
    device: str = "cpu",
    dtype=None,
    batch: int = 1,
    prompt_len: int = 128,
    new_tokens: int = 32,
    repeats: int = 3,
    memory: bool = True,
    threads: int | None = None,
    static_cache: bool = False,
) -> BenchResult:
    """Measure dense vs shrunk (see module docs).

    Args:
        device: cpu | cuda.
        dtype: float32 | bfloat16 | float16 for both models; None (auto) keeps the checkpoints'.
        batch: Sequences per forward pass.
        prompt_len: Prompt tokens (prefill).
        new_tokens: Decode steps with the KV cache.
        repeats: Interleaved repetitions per model (medians).
        memory: CPU: measure peak RSS in a child process per model.
        threads: torch.set_num_threads (default: torch's).
        static_cache: Decode on a static KV cache with the step compiled (torch.compile, mode
            reduce-overhead: CUDA graphs on a GPU), both models alike; prefill stays eager.
    """
    for name, v, lo in (("batch", batch, 1), ("prompt_len", prompt_len, 1), ("new_tokens", new_tokens, 1), ("repeats", repeats, 1)):
        if v < lo:
            raise GPConvError(f"{name} must be >= {lo}, got {v}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise GPConvError(f"unknown device {device!r}; gpconv bench runs on cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GPConvError("--device cuda, but torch sees no CUDA device")
    if dev.type not in ("cpu", "cuda"):
        raise GPConvError(f"gpconv bench runs on cpu or cuda, not {device!r}")
    td = parse_dtype(dtype)
    before = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise GPConvError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        return _bench(model_dir, baseline, dev, dtype, td, batch, prompt_len, new_tokens, repeats, memory, static_cache)
    finally:
        torch.set_num_threads(before)


def _bench(model_dir, baseline, dev, dtype, td, batch, prompt_len, new_tokens, repeats, memory,
           static_cache=False) -> BenchResult:
    load_before = system.loadavg()
    dense, shrunk, dense_name, shrunk_name = load_pair(model_dir, baseline, td)
    max_pos = getattr(dense.config, "max_position_embeddings", None)
    if max_pos is not None and prompt_len + new_tokens > max_pos:
        raise GPConvError(f"prompt_len + new_tokens = {prompt_len + new_tokens} exceeds the model's {max_pos} positions")
    ids = _token_ids(dense.config.vocab_size, batch, prompt_len + new_tokens).to(dev)
    models = {"dense": dense, "shrunk": shrunk}
    stats = {k: _param_stats(m) for k, m in models.items()}
    run_dtype = next((str(p.dtype).replace("torch.", "") for p in shrunk.parameters() if p.is_floating_point()), "?")
    times = {k: ([], []) for k in models}
    static = {k: StaticDecoder(m, prompt_len + new_tokens) for k, m in models.items()} if static_cache else None
    peaks: dict[str, tuple[int | None, int | None]] = {}

    # on CUDA each model is on the GPU only while it runs, so its peak memory is its own; compiled
    # static-cache steps (CUDA graphs) hold their weights' addresses, so both then stay there
    move = dev.type == "cuda" and not static_cache
    for m in models.values():
        m.to("cpu" if move else dev)
    for r in range(repeats + 1):  # round 0 warms up (allocator, kernels, caches, compilation) and is dropped
        for k, m in models.items():
            if move:
                m.to(dev)
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
            pf, dc = static[k].run_once(ids, prompt_len, new_tokens) if static else run_once(m, ids, prompt_len, new_tokens)
            if move:
                peaks[k] = (None, max(peaks.get(k, (None, 0))[1] or 0, torch.cuda.max_memory_allocated(dev)))
                m.to("cpu")
                torch.cuda.empty_cache()
            if r:
                times[k][0].append(pf)
                times[k][1].append(dc)
    memory_kind = ("cuda_max_allocated" if move else "skipped") if dev.type == "cuda" else ("rss" if memory else "skipped")
    if dev.type == "cpu" and memory:
        del dense, shrunk, models  # the children load their own copies
        for k in ("dense", "shrunk"):
            peaks[k] = _cpu_peak_rss(k, str(model_dir), baseline, dtype, batch, prompt_len, new_tokens, torch.get_num_threads())

    def result(k, name):
        pf, dc = times[k]
        base, peak = peaks.get(k, (None, None))
        return ModelResult(
            name=name, params=stats[k][0], weight_bytes=stats[k][1],
            prefill_tokens_per_s=batch * prompt_len / statistics.median(pf),
            decode_tokens_per_s=batch * new_tokens / statistics.median(dc),
            peak_memory_bytes=peak, base_memory_bytes=base, prefill_s=pf, decode_s=dc,
        )

    return BenchResult(
        device=str(dev), dtype=run_dtype, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
        repeats=repeats, threads=torch.get_num_threads(), memory_kind=memory_kind, static_cache=static_cache,
        dense=result("dense", dense_name), shrunk=result("shrunk", shrunk_name),
        machine=machine_info(), loadavg=(load_before, system.loadavg()),
    )


def parse_shape_specs(specs: list[str]) -> dict[str, tuple[int, int, int]]:
    """``NAME=IN:OUT:MIN_CHANNELS_PER_GROUP`` strings (the benchmarks' ``--shapes``) -> {name: (in,
    out, min_channels_per_group)}; ValueError naming the bad entry."""
    out = {}
    for spec in specs:
        try:
            name, dims = spec.split("=")
            i, o, m = (int(v) for v in dims.split(":"))
        except ValueError:
            raise ValueError(f"bad --shapes entry {spec!r}: want NAME=IN:OUT:MIN_CHANNELS_PER_GROUP") from None
        out[name] = (i, o, m)
    return out


def machine_info() -> dict:
    """:func:`gpconv.system.machine_info` plus which gpconv kernels ran (``native_kernels``)."""
    return system.machine_info(native_kernels=native_status())
