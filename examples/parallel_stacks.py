"""A custom architecture through gpconv's Python API: a decoder made of parallel stacks.

The model is plain PyTorch, no transformers: the token features are split across ``stacks``
independent stacks of decoder layers (each reads the embedding through its own projection),
and their outputs are concatenated back into the token features before the output layer. A
large version of this design has two stacks of 64 layers (128 decoder layers); the default
here is tiny, so it runs in seconds on a CPU.

The walk-through is the same for any ``nn.Module`` whose forward takes ``(batch, tokens)`` ids
and returns logits:

1. ``gpconv.shrink(model, GPConvConfig(...))`` swaps every ``nn.Linear`` but the output layer
   for a grouped pointwise block, in place, and returns the report (printed below);
2. ``gpconv.train(model, blocks, TrainConfig(...))`` trains it (next-token cross-entropy);
3. ``gpconv.save_pretrained(model, dir)`` writes ``model.safetensors`` + ``gpconv.json`` (the
   plan); ``gpconv.hub.load_into(ParallelStackLM(cfg), dir)`` rebuilds it from its own constructor.

    python examples/parallel_stacks.py                      # trains on this file's own text
    python examples/parallel_stacks.py --stacks 2 --layers 64 --steps 0    # two stacks of 64: the 128-layer shape
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gpconv


@dataclass
class StackConfig:
    vocab_size: int = 320  # gpconv's byte-level tokenizer (262 tokens), rounded up
    d_model: int = 256  # token features = the stacks' outputs side by side
    stacks: int = 2
    layers_per_stack: int = 2
    heads_per_stack: int = 2
    mlp_ratio: int = 4


class DecoderLayer(nn.Module):
    """Pre-norm causal self-attention and MLP, each with a residual connection."""

    def __init__(self, d: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.LayerNorm(d)
        self.attn = nn.ModuleDict({"qkv": nn.Linear(d, 3 * d), "out": nn.Linear(d, d)})
        self.mlp_norm = nn.LayerNorm(d)
        self.mlp = nn.ModuleDict({"up": nn.Linear(d, mlp_ratio * d), "down": nn.Linear(mlp_ratio * d, d)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.attn["qkv"](self.attn_norm(x)).view(B, T, 3, self.heads, D // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.attn["out"](a.transpose(1, 2).reshape(B, T, D))
        return x + self.mlp["down"](F.gelu(self.mlp["up"](self.mlp_norm(x))))


class Stack(nn.Module):
    """One stack: the token features projected to this stack's width, then its decoder layers."""

    def __init__(self, cfg: StackConfig):
        super().__init__()
        width = cfg.d_model // cfg.stacks
        self.in_proj = nn.Linear(cfg.d_model, width)
        self.layers = nn.ModuleList(DecoderLayer(width, cfg.heads_per_stack, cfg.mlp_ratio) for _ in range(cfg.layers_per_stack))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.in_proj(x)
        for layer in self.layers:
            h = layer(h)
        return h


class ParallelStackLM(nn.Module):
    """Embedding -> ``stacks`` stacks side by side -> concatenation -> norm -> output layer."""

    def __init__(self, cfg: StackConfig):
        super().__init__()
        if cfg.d_model % cfg.stacks or (cfg.d_model // cfg.stacks) % cfg.heads_per_stack:
            raise ValueError("d_model must split evenly into stacks, and each stack's width into heads")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.stacks = nn.ModuleList(Stack(cfg) for _ in range(cfg.stacks))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)  # gpconv leaves the output layer dense

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        h = torch.cat([stack(x) for stack in self.stacks], dim=-1)  # (B, T, d_model)
        return self.lm_head(self.norm(h + x))


def text_blocks(text: str, block_size: int, val_fraction: float = 0.1):
    """Byte-level token blocks of ``text``: ``(train, val)`` as gpconv.data.TokenBlocks."""
    tok = gpconv.hub.byte_tokenizer()
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    n = len(ids) // block_size
    if n < 2:
        raise ValueError(f"need at least {2 * block_size} tokens of text, got {len(ids)}")
    blocks = ids[: n * block_size].view(n, block_size)
    n_val = max(1, int(n * val_fraction))
    return gpconv.data.TokenBlocks(blocks[n_val:]), gpconv.data.TokenBlocks(blocks[:n_val])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="Shrink, train, save and reload a parallel-stack decoder.")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--stacks", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2, help="Decoder layers per stack.")
    ap.add_argument("--heads", type=int, default=2, help="Attention heads per stack.")
    ap.add_argument("-m", "--min-channels-per-group", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--data", type=Path, default=Path(__file__), help="A text file to train on (default: this file).")
    ap.add_argument("--out", type=Path, default=None, help="Where to save the model (default: a temporary directory).")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    cfg = StackConfig(d_model=args.d_model, stacks=args.stacks, layers_per_stack=args.layers, heads_per_stack=args.heads)
    torch.manual_seed(0)
    model = ParallelStackLM(cfg)

    # 1. surgery: every nn.Linear but lm_head becomes an io block
    report = gpconv.shrink(model, gpconv.GPConvConfig(min_channels_per_group=args.min_channels_per_group))
    if not args.quiet:
        report.print(max_rows=12)

    # 2. a few training steps (gpconv.train takes any module that maps ids to logits)
    result = None
    if args.steps:
        train, val = text_blocks(args.data.read_text(encoding="utf-8"), args.block_size)
        tcfg = gpconv.TrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_ratio=0.0,
                                  save_every=0, log_every=1, progress=False)
        result = gpconv.train(model, train, tcfg, val_data=val)
        first_val = next(r for r in result.history if r["split"] == "val")
        if not args.quiet:
            print(f"validation loss {first_val['loss']:.3f} -> {result.val['loss']:.3f} after {result.steps} steps")

    # 3. save, rebuild from the class's own constructor, load, and check the outputs match exactly
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "parallel-stacks"
        gpconv.save_pretrained(model, out, overwrite=True)
        fresh = gpconv.hub.load_into(ParallelStackLM(cfg), out)
        ids = torch.randint(0, cfg.vocab_size, (2, 16))
        model.eval()
        with torch.no_grad():
            same = torch.equal(model(ids), fresh.eval()(ids))
        files = sorted(p.name for p in Path(out).iterdir())
    if not args.quiet:
        print(f"saved {files}; reloaded with gpconv.hub.load_into: outputs {'identical' if same else 'DIFFER'}")
    return {"report": report, "train": result, "reloaded_identical": same, "files": files, "model": model}


if __name__ == "__main__":
    main()
