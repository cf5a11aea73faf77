"""Running an ONNX export with ONNX Runtime: logits, and greedy or sampled generation with the
KV cache, the loop a deployment would write."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import GPConvError
from ..hfutil import first_line
from .onnx import EXPORT_FILE, MODEL_FILE


def is_onnx_export(path) -> bool:
    """Does ``path`` hold a gpconv ONNX export (its ``gpconv_export.json``)? A whole one or not:
    :class:`OnnxCausalLM` says what an incomplete one lacks, rather than the directory being
    read as a model (its config.json alone would load as a randomly initialised one)."""
    return (Path(path) / EXPORT_FILE).is_file()


class OnnxCausalLM:
    """An exported causal LM in ONNX Runtime.

        lm = OnnxCausalLM("smol-onnx")
        logits = lm.logits(ids)                       # (batch, seq, vocab), no cache
        ids = lm.generate(prompt_ids, max_new_tokens=32)

    ``threads``: ONNX Runtime's intra-op threads (None: its default, every core).
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None, providers=("CPUExecutionProvider",)):
        try:
            import onnxruntime as ort  # optional: only deployment needs it (pip install onnxruntime)
        except ImportError:
            raise GPConvError("running an ONNX export needs onnxruntime: pip install onnxruntime") from None
        self.path = Path(path).expanduser()
        if not is_onnx_export(self.path):
            raise GPConvError(f"{self.path} is not a gpconv ONNX export ({MODEL_FILE} and {EXPORT_FILE} expected)")
        if not (self.path / MODEL_FILE).is_file():
            raise GPConvError(f"{self.path} is an incomplete ONNX export: {MODEL_FILE} is missing; export it again (gpconv export)")
        try:
            self.meta = json.loads((self.path / EXPORT_FILE).read_text(encoding="utf-8"))
        except ValueError as e:  # not JSON, not UTF-8
            raise GPConvError(f"{self.path / EXPORT_FILE} is damaged ({first_line(e)}); export it again (gpconv export)") from None
        if not isinstance(self.meta, dict) or "dtype" not in self.meta:
            raise GPConvError(f"{self.path / EXPORT_FILE} is damaged (no dtype); export it again (gpconv export)")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # not its warning that logits_to_keep (an input with a default) is not a constant
        if threads is not None:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path / MODEL_FILE), opts, providers=list(providers))
        except Exception as e:  # a truncated or foreign file
            raise GPConvError(f"ONNX Runtime cannot load {self.path / MODEL_FILE}: {first_line(e)}") from None
        self.dtype = np.float16 if self.meta["dtype"] == "float16" else np.float32
        gen = self.path / "generation_config.json"
        self.generation = json.loads(gen.read_text()) if gen.is_file() else {}

    # -- one step ----------------------------------------------------------------------------

    def empty_past(self, batch: int) -> list[np.ndarray]:
        m = self.meta
        past = []
        for _ in range(m["layers"]):
            past += [np.zeros((batch, m["kv_heads"], 0, m["head_dim"]), self.dtype),
                     np.zeros((batch, m["kv_heads"], 0, m["value_dim"]), self.dtype)]
        return past

    def step(self, input_ids: np.ndarray, past: list[np.ndarray], attention_mask: np.ndarray | None = None,
             position_ids: np.ndarray | None = None, last_only: bool = False):
        """``(logits, present)`` for ``input_ids`` (batch, seq) after a cache of ``past``; with
        ``last_only`` the logits of the last position alone, (batch, 1, vocab)."""
        ids = np.asarray(input_ids, dtype=np.int64)
        b, t = ids.shape
        p = past[0].shape[2]
        if attention_mask is None:
            attention_mask = np.ones((b, p + t), np.int64)
        if position_ids is None:
            position_ids = np.broadcast_to(np.arange(p, p + t, dtype=np.int64), (b, t))
        feeds = {"input_ids": ids, "attention_mask": np.asarray(attention_mask, np.int64),
                 "position_ids": np.ascontiguousarray(position_ids, np.int64)}
        feeds.update(zip(self.meta["inputs"][3:], past))
        names = self.meta["outputs"]
        if last_only and "logits_to_keep" in self.meta.get("optional_inputs", ()):
            feeds["logits_to_keep"] = np.array([1], np.int64)  # the output layer on the last position only
        out = self.session.run(names[: 1 + 2 * self.meta["layers"]], feeds)
        logits = out[0][:, -1:] if last_only else out[0]
        return logits, out[1:]

    def logits(self, input_ids) -> np.ndarray:
        """Logits (batch, seq, vocab) of a whole sequence, from an empty cache."""
        ids = np.asarray(input_ids, dtype=np.int64)
        return self.step(ids, self.empty_past(ids.shape[0]))[0]

    # -- generation --------------------------------------------------------------------------

    def generate(self, input_ids, max_new_tokens: int = 128, *, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | None = None, eos_token_id=None) -> np.ndarray:
        """Prompt + new tokens (batch 1), greedy unless ``do_sample``; stops at an end token
        (``eos_token_id``, default the generation config's)."""
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.shape[0] != 1:
            raise GPConvError("OnnxCausalLM.generate takes one prompt at a time")
        eos = self.generation.get("eos_token_id") if eos_token_id is None else eos_token_id
        stop = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        rng = np.random.default_rng(seed)
        logits, past = self.step(ids, self.empty_past(1), last_only=True)
        out = [int(t) for t in ids[0]]
        for _ in range(max_new_tokens):
            nxt = self._pick(logits[0, -1].astype(np.float64), do_sample, temperature, top_p, rng)
            out.append(nxt)
            if nxt in stop:
                break
            logits, past = self.step(np.array([[nxt]], np.int64), past, last_only=True)
        return np.array([out], dtype=np.int64)

    @staticmethod
    def _pick(logits: np.ndarray, do_sample: bool, temperature: float, top_p: float, rng) -> int:
        if not do_sample:
            return int(logits.argmax())
        z = logits / max(temperature, 1e-6)
        prob = np.exp(z - z.max())
        prob /= prob.sum()
        order = np.argsort(-prob)
        keep = order[: int(np.searchsorted(np.cumsum(prob[order]), top_p) + 1)]
        p = prob[keep] / prob[keep].sum()
        return int(rng.choice(keep, p=p))
