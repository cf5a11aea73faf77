"""Tiny random models built from config classes (no downloads), shared by the tests.

Sizes are chosen so that at min_channels_per_group=16 every layer gets >= 4 groups
(hidden 64 -> bound 4), so the io block really replaces them.
"""

import torch
from torch import nn

VOCAB = 128
MCPG = 16


def _hf(config_cls, **kw):
    from transformers import AutoModelForCausalLM

    def build(seed=0):
        cfg = config_cls(**kw)
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()

    return build


def _llama_like(cls_name, **extra):
    import transformers

    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kw.update(extra)
    return _hf(getattr(transformers, cls_name), **kw)


def _gpt2():
    from transformers import GPT2Config

    return _hf(GPT2Config, vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
               bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _opt():
    from transformers import OPTConfig

    return _hf(OPTConfig, vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64,
               pad_token_id=0, bos_token_id=1, eos_token_id=2, dropout=0.0)


def _phi3():
    from transformers import Phi3Config

    return _hf(Phi3Config, vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               original_max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)


# name -> (builder, expected number of replaced layers at MCPG, tied embeddings?)
FAMILIES = {
    "phi3": (_phi3(), 2 * 4, False),  # fused qkv_proj, gate_up_proj
    "llama": (_llama_like("LlamaConfig"), 2 * 7, False),  # GQA: k/v 64 -> 32
    "llama-tied": (_llama_like("LlamaConfig", tie_word_embeddings=True), 2 * 7, True),
    "mistral": (_llama_like("MistralConfig"), 2 * 7, False),
    "qwen2": (_llama_like("Qwen2Config"), 2 * 7, False),  # q/k/v with bias
    "gpt2": (_gpt2(), 2 * 4, True),  # Conv1D, tied lm_head
    "opt": (_opt(), 2 * 6, False),  # biases everywhere
}


class TinyMLPLM(nn.Module):
    """A non-HF causal model: embedding, two residual MLP blocks, a head."""

    def __init__(self, vocab=VOCAB, d=64):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"up": nn.Linear(d, 4 * d), "down": nn.Linear(4 * d, d)}) for _ in range(2)
        )
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        for b in self.blocks:
            h = h + b["down"](torch.relu(b["up"](h)))
        return self.head(h)


def shrunk_logit_errors(dense, ids, settings: dict) -> dict:
    """Mean squared logit error against ``dense`` on ``ids`` of a shrunk copy per setting.

    ``settings`` maps a label to ``(GPConvConfig, Calibration)``; ``dense`` is left untouched.
    Tests compare the errors of two settings (e.g. with and without a correction).
    """
    import copy

    from gpconv import shrink

    with torch.no_grad():
        ref = dense(ids).logits
    errs = {}
    for label, (config, calibration) in settings.items():
        m = copy.deepcopy(dense)
        shrink(m, config, calibration=calibration)
        with torch.no_grad():
            errs[label] = (m(ids).logits - ref).square().mean().item()
    return errs


SMALL_PHI3 = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)


def save_teacher_student(d):
    """A small tiny-phi3 teacher (seed 1) and its io-shrunk student (-m 16, init project), both
    saved under ``d`` with the byte tokenizer (``d/teacher``, ``d/student``)."""
    import gpconv
    from gpconv.hub import tiny_phi3

    teacher, tok = tiny_phi3(seed=1, **SMALL_PHI3)
    gpconv.save_pretrained(teacher, d / "teacher", tok)
    gpconv.shrink(teacher, gpconv.GPConvConfig(min_channels_per_group=16, init="project"))
    gpconv.save_pretrained(teacher, d / "student", tok)
