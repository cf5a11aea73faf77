"""ONNX export of a (shrunk) causal LM that keeps the grouped structure: each io / hybrid block
becomes a Gather of its [own | interleaved] inputs and one batched MatMul (plus two MatMuls for
a low-rank term), never its dense matrix, so the file is about the size of the shrunk weights.

The graph follows the Hugging Face / ONNX Runtime convention for decoders with a KV cache:

    inputs   input_ids (batch, seq) int64, attention_mask (batch, past + seq) int64,
             position_ids (batch, seq) int64,
             past_key_values.{i}.key / .value (batch, kv_heads, past, head_dim), i = 0..layers-1
             logits_to_keep (1,) int64, optional (default 0: every position; k: the last k only)
    outputs  logits (batch, seq or k, vocab),
             present.{i}.key / .value (batch, kv_heads, past + seq, head_dim)

``logits_to_keep`` has transformers' meaning: a runtime that feeds 1 during generation runs the
output layer on the last position alone (ONNX Runtime executes every node of a graph whatever
outputs are asked for, so a second, last-position output would not save the full one's work:
SmolLM2's output layer is 29 GFLOP at 512 tokens). Its default sits in the graph, so a consumer
that knows only the usual decoder inputs gets every position's logits.

A first step feeds ``past`` of length 0. The export goes through ``torch.export`` (dynamic batch,
sequence and past lengths) and torch's ONNX translator, with the blocks traced as plain torch ops
(``use_kernels(custom_ops=False)``). ``gpconv_export.json`` beside the model names the inputs,
outputs and cache shapes that :class:`gpconv.deploy.OnnxCausalLM` reads.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache

from .._version import __version__
from ..errors import GPConvError
from ..fsutil import atomic_dir, check_output_dir
from ..hfutil import first_line, is_transformers, parse_dtype, quiet, unwrap
from ..hub import load_model
from ..layers import use_kernels
from ..surgery import current_plan

EXPORT_FILE = "gpconv_export.json"
MODEL_FILE = "model.onnx"
EXTERNAL_DATA_BYTES = 1 << 30  # weights above this go to model.onnx.data (protobuf stops at 2 GiB)
FORMATS = ("onnx",)


KEEP_INPUT = "logits_to_keep"
_HIDDEN_OUTPUT = "gpconv_last_hidden"  # a temporary output: where the output layer's input is in the graph


class _Decoder(nn.Module):
    """The model with its KV cache as flat tensors in and out (what an ONNX graph can carry);
    with ``keep`` the last hidden state too, so that the export can slice it (:func:`_add_logits_to_keep`)."""

    def __init__(self, model: nn.Module, layers: int, cache_arg: str, keep: bool):
        super().__init__()
        self.model, self.layers, self.cache_arg, self.keep = model, layers, cache_arg, keep

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)  # an empty past (length 0) starts the cache
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, output_hidden_states=self.keep, **{self.cache_arg: cache})
        present = _layers_of(out[self.cache_arg] if self.cache_arg in out else out["past_key_values"])
        extra = (out.hidden_states[-1],) if self.keep else ()
        return (out.logits, *[t for kv in present for t in kv], *extra)


def _add_logits_to_keep(proto) -> None:
    """Turn the temporary last-hidden-state output into the optional ``logits_to_keep`` input:
    the output layer then reads ``hidden[:, -k:]`` (a Slice from -k; k = 0 slices from 0: every
    position), with k's default 0 stored as an initializer of the same name (an input default)."""
    from onnx import TensorProto, helper, numpy_helper  # onnx is there: torch's exporter needs it

    g = proto.graph
    nodes = list(g.node)
    hidden, dead = _HIDDEN_OUTPUT, []
    # the exporter may name the output through an Identity of the value the output layer reads
    alias = next((n for n in nodes if n.op_type == "Identity" and n.output[0] == hidden), None)
    if alias is not None and not any(hidden in n.input for n in nodes):
        hidden, dead = alias.input[0], [alias]
    readers = [i for i, n in enumerate(nodes) if hidden in n.input and n not in dead]
    if not readers:
        raise GPConvError("ONNX export: nothing reads the last hidden state (a gpconv bug); export failed")
    kept = "gpconv_hidden_kept"
    for i in readers:
        n = nodes[i]
        n.input[:] = [kept if name == hidden else name for name in n.input]
    new = [helper.make_node("Neg", [KEEP_INPUT], ["gpconv_keep_start"], name="gpconv_keep_neg"),
           helper.make_node("Slice", [hidden, "gpconv_keep_start", "gpconv_keep_end", "gpconv_keep_axis"], [kept],
                            name="gpconv_keep_slice")]
    # nodes are stored in topological order: the Slice goes just before its first reader
    nodes[readers[0]:readers[0]] = new
    del g.node[:]
    g.node.extend(n for n in nodes if n not in dead)
    g.initializer.extend([numpy_helper.from_array(np.array([0], np.int64), KEEP_INPUT),
                          numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), "gpconv_keep_end"),
                          numpy_helper.from_array(np.array([1], np.int64), "gpconv_keep_axis")])
    g.input.append(helper.make_tensor_value_info(KEEP_INPUT, TensorProto.INT64, [1]))
    g.output.remove(next(o for o in g.output if o.name == _HIDDEN_OUTPUT))


def _layers_of(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per decoder layer of a transformers cache."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return [(k, v) for k, v in cache]  # older caches iterate as (key, value) pairs


@contextlib.contextmanager
def _silent_exporter():
    """torch's ONNX exporter prints its progress and logs a warning per torchvision op it skips:
    our caller reports what matters in one line."""
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def _strip_metadata(model) -> None:
    """Drop what the exporter records per node for debugging (the Python stack, the FX node and
    module names): it ran to ~3x the weights of a small model and nothing at run time reads it."""
    graphs = [model.graph, *model.functions.values()]
    for graph in graphs:
        for node in graph.all_nodes() if hasattr(graph, "all_nodes") else graph:
            node.metadata_props.clear()
            node.doc_string = None


def _cache_arg(model) -> str:
    """transformers 5 calls the KV-cache argument ``cache``; older versions ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def check_exportable(model: nn.Module) -> None:
    """Refuse, before any work, a model this exporter cannot carry (one line each)."""
    if not is_transformers(model):
        raise GPConvError(f"ONNX export needs a transformers causal LM; {type(unwrap(model)).__name__} is not one "
                          "(export a custom module with torch.onnx.export under gpconv.layers.use_kernels(custom_ops=False))")
    if not callable(getattr(model, "get_output_embeddings", None)) or model.get_output_embeddings() is None:
        raise GPConvError(f"ONNX export needs a causal LM with an output layer; {type(model).__name__} has none")


@torch.no_grad()
def _last_logits_match(model, cache_arg) -> bool:
    """Does the output layer on the last hidden state give the model's logits (true unless the
    model scales or caps its logits after the output layer)? Then the export can slice that
    hidden state for ``logits_to_keep`` and be sure the output layer is what reads it."""
    ids = torch.arange(1, 5)[None] % max(2, model.get_output_embeddings().weight.shape[0])
    out = model(input_ids=ids, use_cache=False, output_hidden_states=True)
    hidden = getattr(out, "hidden_states", None)
    if not hidden:
        return False
    head = model.get_output_embeddings()(hidden[-1])
    return bool(torch.allclose(head, out.logits, rtol=1e-5, atol=1e-5))


@torch.no_grad()
def _probe(model, decoder_kwargs) -> dict:
    """Cache shapes and dtype from one short forward pass (any architecture's own numbers)."""
    ids = torch.ones(1, 2, dtype=torch.long)
    out = model(input_ids=ids, use_cache=True)
    cache = out[decoder_kwargs] if decoder_kwargs in out else out.get("past_key_values")
    if cache is None:
        raise GPConvError(f"{type(model).__name__} returns no KV cache; the ONNX export needs one")
    layers = _layers_of(cache)
    k, v = layers[0]
    return {"layers": len(layers), "kv_heads": k.shape[1], "head_dim": k.shape[3], "value_dim": v.shape[3],
            "dtype": str(k.dtype).replace("torch.", ""), "vocab_size": out.logits.shape[-1]}


def export_onnx(model: nn.Module, out: str | os.PathLike, tokenizer=None, *, dtype="float32", overwrite: bool = False,
                max_len: int | None = None, optimize: bool = True, say=None) -> Path:
    """Write ``model`` to ``out`` as ONNX with its tokenizer and generation config; returns ``out``.

    ``dtype``: the exported weights' dtype (float32 by default: ONNX Runtime's CPU kernels are
    fp32). ``max_len``: the largest past + sequence length the graph accepts (default the
    model's max_position_embeddings). ``optimize``: simplify the graph with the ONNX optimizer
    (onnxscript) before it is written: SmolLM2 at ``-m 64`` decoded 1.51x instead of 1.24x as fast
    as its dense export in ONNX Runtime, for an export of ~6 minutes instead of ~2 on a 2-core CPU.
    Nothing is written unless the whole export succeeds.
    """
    check_exportable(model)
    out = check_output_dir(out, overwrite)
    td = parse_dtype(dtype)
    was = next((q.dtype for q in model.parameters() if q.is_floating_point()), None)
    was_training = model.training
    model.eval()
    attn = getattr(model.config, "_attn_implementation", None)
    try:
        if td is not None and td != was:
            model.to(td)
        if attn not in (None, "eager") and callable(getattr(model, "set_attn_implementation", None)):
            # the eager attention's graph (an additive mask, one softmax) ran faster in ONNX Runtime
            # than sdpa's translation (SmolLM2, 512 tokens: 836 against 992 ms per prefill)
            model.set_attn_implementation("eager")
        return _export(model, out, tokenizer, overwrite, max_len, optimize, say)
    finally:  # the caller's model as it was
        if td is not None and was is not None and td != was:
            model.to(was)
        if attn not in (None, "eager") and getattr(model.config, "_attn_implementation", None) != attn:
            model.set_attn_implementation(attn)
        model.train(was_training)


def _export(model, out: Path, tokenizer, overwrite: bool, max_len, optimize: bool, say) -> Path:
    cache_arg = _cache_arg(model)
    info = _probe(model, cache_arg)
    last = _last_logits_match(model, cache_arg)
    n_layers = info["layers"]
    limit = max_len or getattr(model.config, "max_position_embeddings", None) or 4096
    # example inputs: 2 sequences, 3 new tokens on a past of 2 (every length dynamic)
    batch, seq, past_len = 2, 3, 2
    ids = torch.randint(0, info["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, past_len + seq, dtype=torch.long)
    pos = torch.arange(past_len, past_len + seq).expand(batch, seq)
    kv_dtype = getattr(torch, info["dtype"])
    past = []
    for _ in range(n_layers):
        past += [torch.zeros(batch, info["kv_heads"], past_len, info["head_dim"], dtype=kv_dtype),
                 torch.zeros(batch, info["kv_heads"], past_len, info["value_dim"], dtype=kv_dtype)]
    b = torch.export.Dim("batch", min=1, max=1024)
    s = torch.export.Dim("sequence", min=1, max=limit)
    p = torch.export.Dim("past", min=0, max=limit)
    total = torch.export.Dim("total", min=1, max=2 * limit)
    shapes = {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: total}, "position_ids": {0: b, 1: s},
              "past": tuple({0: b, 2: p} for _ in past)}
    inputs = ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    outputs = ["logits"] + [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    weight_bytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in model.state_dict().values()}.values())
    t0 = time.perf_counter()
    try:
        with use_kernels(custom_ops=False), torch.no_grad(), quiet(), _silent_exporter():
            program = torch.onnx.export(_Decoder(model, n_layers, cache_arg, last).eval(), (ids, mask, pos, *past),
                                        dynamic_shapes=shapes, input_names=inputs,
                                        output_names=outputs + ([_HIDDEN_OUTPUT] if last else []), dynamo=True,
                                        external_data=False, verbose=False, optimize=optimize)
    except GPConvError:
        raise
    except Exception as e:  # torch.export / the translator refused this architecture
        raise GPConvError(f"ONNX export of {type(model).__name__} failed: {first_line(e)}") from None
    if say is not None:
        say(f"traced and translated in {time.perf_counter() - t0:.1f} s")
    meta = {"format": "onnx", "gpconv_version": __version__, "torch": torch.__version__, "inputs": inputs,
            "outputs": outputs, "optional_inputs": [KEEP_INPUT] if last else [], "layers": n_layers, "kv_heads": info["kv_heads"], "head_dim": info["head_dim"],
            "value_dim": info["value_dim"], "dtype": info["dtype"], "vocab_size": info["vocab_size"],
            "max_len": limit, "model_class": type(model).__name__, "gpconv_plan": current_plan(model)}
    _strip_metadata(program.model)
    proto = program.model_proto
    if last:
        _add_logits_to_keep(proto)
    with atomic_dir(out, overwrite) as tmp:
        _save_proto(proto, tmp / MODEL_FILE, external=weight_bytes > EXTERNAL_DATA_BYTES)
        model.config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / EXPORT_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return Path(out)


def _save_proto(proto, path: Path, external: bool) -> None:
    """``model.onnx``, with the weights in ``model.onnx.data`` beside it when ``external``."""
    import onnx  # torch's ONNX exporter needs it, so it is installed wherever an export ran

    if external:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))


def export(model, out: str | os.PathLike, *, format: str = "onnx", tokenizer=None, dtype="float32",
           overwrite: bool = False, max_len: int | None = None, optimize: bool = True, say=None) -> Path:
    """Export a model (a loaded one, or any model spec ``gpconv.load_model`` takes: a gpconv
    checkpoint directory, a built-in name, ...) for a deployment runtime; returns the output directory.

    ``format="onnx"``: ``OUT/model.onnx`` (+ ``model.onnx.data`` when the weights pass 1 GiB), the
    tokenizer, ``config.json``, ``generation_config.json`` and ``gpconv_export.json``; the grouped
    blocks stay grouped (see :mod:`gpconv.deploy.onnx`). Run it with
    :class:`gpconv.deploy.OnnxCausalLM` or ``gpconv generate OUT``.
    """
    if format not in FORMATS:
        raise GPConvError(f"unknown export format {format!r}; choose one of: {', '.join(FORMATS)}")
    check_output_dir(out, overwrite)  # before a model loads
    if isinstance(model, (str, os.PathLike)):
        model, loaded_tok = load_model(str(model))
        tokenizer = tokenizer if tokenizer is not None else loaded_tok
    return export_onnx(model, out, tokenizer, dtype=dtype, overwrite=overwrite, max_len=max_len, optimize=optimize,
                       say=say)
