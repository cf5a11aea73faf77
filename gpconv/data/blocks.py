"""Training and evaluation data: instruction or text sources -> fixed-length token blocks.

The pipeline, one small step per function:

    source (alias, hub id, local file) -> rows (dicts) -> records -> token segments -> blocks

Sources, rows and records are :mod:`gpconv.data.sources`; this module goes on from records:

* A record is **rendered** into text segments, each flagged prompt or response, in one of
  :data:`FORMATS`; segments are tokenized separately (``add_special_tokens=False``), so the
  response mask is exact whatever the tokenizer does at segment boundaries.
* Records are **packed** end to end into blocks of ``block_size`` tokens (as the kphi-3 paper
  concatenated samples up to the context length); the last partial block is padded. Labels
  equal the input ids where the loss counts and -100 elsewhere (padding, and the prompt when
  ``response_only``); models shift them by one position themselves.

The train/validation split is made on records, before packing, so no validation text leaks into
a training block. In-memory sources are split by a seeded permutation; streaming sources (LaMini's
2.58M rows) take their first ``val_size`` rows as validation and shuffle the rest with a seeded
buffer, so nothing is tokenized before it is needed.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from ..errors import GPConvError
from ..schema import updated
from .config import DataConfig
from .sources import Rows, load_rows, to_record

STREAM_SHUFFLE_BUFFER = 10_000  # rows held by the streaming shuffle: enough to mix sources, small in RAM
AUTO_VAL_ROWS = 1_000  # default validation size cap: 5% of rows, at most this many

# --------------------------------------------------------------------------------------------
# Records -> token segments
# --------------------------------------------------------------------------------------------


def _render_kphi3(msgs: list[dict], eos: str) -> list[tuple[str, bool]]:
    """``<|user|>{instruction}<|end|><|assistant|>{response}<|end|>`` then end-of-text (the paper)."""
    segs = []
    for m in msgs:
        if m["role"] == "assistant":
            segs += [("<|assistant|>", False), (f"{m['content']}<|end|>", True)]
        else:
            segs.append((f"<|{m['role']}|>{m['content']}<|end|>", False))
    segs.append((eos, True))  # the model learns to stop
    return segs


def _render_plain(msgs: list[dict], eos: str) -> list[tuple[str, bool]]:
    """Turns separated by a blank line, no role markers; end-of-text after the last turn."""
    segs = []
    for i, m in enumerate(msgs):
        sep = "" if i == len(msgs) - 1 else "\n\n"
        segs.append((m["content"] + sep, m["role"] == "assistant"))
    segs.append((eos, True))
    return segs


def _render_chat_template(msgs: list[dict], tokenizer) -> list[tuple[str, bool]]:
    """The tokenizer's own chat template; each assistant turn is the text its message adds."""
    eos = tokenizer.eos_token or ""

    def render(upto, gen):
        text = tokenizer.apply_chat_template(msgs[:upto], tokenize=False, add_generation_prompt=gen)
        # Templates such as Phi-3's close a finished conversation with end-of-text; a prefix that
        # the conversation goes on from must not, or no later rendering would start with it.
        if not gen and upto < len(msgs) and eos and text.endswith(eos):
            text = text[: -len(eos)]
        return text

    segs, done = [], ""
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            prompt = render(i, True)
            if not prompt.startswith(done):
                raise GPConvError("the tokenizer's chat template does not render conversations prefix by prefix; use --format kphi3")
            segs.append((prompt[len(done):], False))
            done = prompt
        full = render(i + 1, False)
        if not full.startswith(done):
            raise GPConvError("the tokenizer's chat template does not render conversations prefix by prefix; use --format kphi3")
        segs.append((full[len(done):], m["role"] == "assistant"))
        done = full
    return [s for s in segs if s[0]]


def render(record: dict, tokenizer, fmt: str) -> list[tuple[str, bool]]:
    """A record as text segments, each ``(text, is_response)``."""
    eos = tokenizer.eos_token or ""
    if "text" in record:
        tail = [(eos, True)] if record.get("eos", True) and eos else []
        return [(record["text"], True)] + tail
    msgs = record["messages"]
    if fmt == "kphi3":
        return _render_kphi3(msgs, eos)
    if fmt == "plain":
        return _render_plain(msgs, eos)
    if not getattr(tokenizer, "chat_template", None):
        raise GPConvError("--format chat-template: this tokenizer has no chat template; use --format kphi3")
    return _render_chat_template(msgs, tokenizer)


def tokenize(record: dict, tokenizer, fmt: str, response_only: bool) -> tuple[list[int], list[bool]]:
    """Token ids of one record and, per token, whether the loss counts it."""
    segs = render(record, tokenizer, fmt)
    enc = tokenizer([s for s, _ in segs], add_special_tokens=False)["input_ids"]
    ids, counted = [], []
    for (_, is_resp), seg in zip(segs, enc):
        ids += seg
        counted += [is_resp or not response_only] * len(seg)
    return ids, counted


# --------------------------------------------------------------------------------------------
# Token segments -> blocks
# --------------------------------------------------------------------------------------------


def _labels(ids: list[int], counted: list[bool]) -> list[int]:
    return [i if c else -100 for i, c in zip(ids, counted)]


def pack(samples: Iterable[tuple[list[int], list[bool]]], block_size: int, pad_id: int,
         concatenate: bool = True) -> Iterator[tuple[list[int], list[int]]]:
    """Blocks of ``block_size`` ``(input_ids, labels)``.

    ``concatenate``: samples run end to end across blocks and only the final block is padded;
    otherwise each sample is one block, truncated or padded (padding is never counted).
    """
    buf_ids: list[int] = []
    buf_lab: list[int] = []
    for ids, counted in samples:
        if not concatenate:
            ids, lab = ids[:block_size], _labels(ids, counted)[:block_size]
            n = block_size - len(ids)
            yield ids + [pad_id] * n, lab + [-100] * n
            continue
        buf_ids += ids
        buf_lab += _labels(ids, counted)
        while len(buf_ids) >= block_size:
            yield buf_ids[:block_size], buf_lab[:block_size]
            buf_ids, buf_lab = buf_ids[block_size:], buf_lab[block_size:]
    if concatenate and buf_ids:
        n = block_size - len(buf_ids)
        yield buf_ids + [pad_id] * n, buf_lab + [-100] * n


class Tokenization:
    """How records become blocks (a tokenizer and a :class:`DataConfig`); the same settings must
    be used for training and evaluation. ``Tokenization(tok, block_size=64)`` changes the config's
    fields by name."""

    def __init__(self, tokenizer, config: DataConfig | None = None, **changes):
        self.tokenizer = tokenizer
        self.config = updated(config or DataConfig(), changes)

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return 0 if pad is None else pad

    def blocks(self, records: Iterable[dict]) -> Iterator[tuple[list[int], list[int]]]:
        c = self.config
        samples = (tokenize(r, self.tokenizer, c.format, c.response_only) for r in records)
        return pack(samples, c.block_size, self.pad_id, c.pack)


class TokenBlocks(torch.utils.data.Dataset):
    """Packed blocks held in memory: ``input_ids`` and ``labels``, both ``(n_blocks, block_size)``."""

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        if input_ids.dim() != 2:
            raise GPConvError(f"token blocks must be (n_blocks, block_size), got shape {tuple(input_ids.shape)}")
        self.input_ids = input_ids.long()
        self.labels = self.input_ids.clone() if labels is None else labels.long()

    @classmethod
    def from_blocks(cls, blocks: Iterable[tuple[list[int], list[int]]], block_size: int) -> "TokenBlocks":
        pairs = list(blocks)
        if not pairs:
            return cls(torch.empty(0, block_size, dtype=torch.long))
        ids, labels = zip(*pairs)
        return cls(torch.tensor(ids), torch.tensor(labels))

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}

    @property
    def block_size(self) -> int:
        return self.input_ids.shape[1]

    @property
    def loss_tokens(self) -> int:
        return int((self.labels != -100).sum())

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.input_ids[index], self.labels[index]


class StreamingBlocks(torch.utils.data.IterableDataset):
    """Blocks tokenized on the fly from streamed rows; ``set_epoch`` reshuffles the stream.

    Its length is unknown, so training on it needs ``max_steps``.
    """

    def __init__(self, rows, schema: str, tok: Tokenization, seed: int = 0):
        self.rows, self.schema, self.tok, self.seed = rows, schema, tok, seed
        self.epoch = 0

    @property
    def block_size(self) -> int:
        return self.tok.block_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict]:
        rows = self.rows.shuffle(seed=self.seed + self.epoch, buffer_size=STREAM_SHUFFLE_BUFFER)
        for ids, labels in self.tok.blocks(to_record(r, self.schema) for r in rows):
            yield {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}


# --------------------------------------------------------------------------------------------
# Split and build
# --------------------------------------------------------------------------------------------


def _val_count(val_size: int | float | None, n: int | None) -> int:
    """Rows to hold out: ``val_size`` rows (int) or that fraction of ``n`` (float)."""
    if val_size is None:  # default: 5% of the rows, at most AUTO_VAL_ROWS
        return AUTO_VAL_ROWS if n is None else min(AUTO_VAL_ROWS, round(0.05 * n))
    if isinstance(val_size, float):
        if not 0 <= val_size < 1:
            raise GPConvError(f"val_size as a fraction must be in [0, 1), got {val_size}; give a row count as an integer")
        if n is None:
            raise GPConvError("a streamed dataset needs val_size as a number of rows, not a fraction")
        k = round(val_size * n)
    else:
        k = int(val_size)
        if k < 0:
            raise GPConvError(f"val_size must be >= 0, got {val_size}")
    if n is not None and k >= n:
        raise GPConvError(f"val_size={val_size} leaves no training rows (the source has {n})")
    return k


def split_rows(rows: list, val_size: int | float | None, seed: int) -> tuple[list, list]:
    """A seeded random choice of ``val_size`` rows validates, the rest train; both keep the
    source order (a text file stays readable; training shuffles blocks itself)."""
    k = _val_count(val_size, len(rows))
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
    held = torch.zeros(len(rows), dtype=torch.bool)
    held[perm[:k]] = True
    return [r for r, h in zip(rows, held.tolist()) if not h], [r for r, h in zip(rows, held.tolist()) if h]


def build_datasets(source: str | Rows, tokenizer, config: DataConfig | None = None, *, seed: int = 0,
                   **changes) -> tuple[TokenBlocks | StreamingBlocks, TokenBlocks | None]:
    """``(train, val)`` token blocks from a data source (see module docs).

    ``config`` (a :class:`DataConfig`, default ``DataConfig()``) says how; keyword arguments
    change its fields: ``build_datasets("data.jsonl", tok, block_size=256, val_size=100)``.
    ``val_size``: rows held out (int) or a fraction (float); None = 5% up to 1,000 rows; 0 = no
    validation set (``val`` is None). ``seed`` decides the split and a stream's shuffle.
    """
    cfg = updated(config or DataConfig(), changes)
    tok = Tokenization(tokenizer, cfg)
    rows = source if isinstance(source, Rows) else load_rows(source, split=cfg.split, streaming=cfg.streaming,
                                                             max_samples=cfg.max_samples)
    if rows.streaming:
        k = _val_count(cfg.val_size, None)
        # the stream's first k rows validate: fixed, so they never leak into a reshuffled epoch
        val_rows = list(rows.rows.take(k)) if k else []
        train = StreamingBlocks(rows.rows.skip(k), rows.schema, tok, seed)
    else:
        train_rows, val_rows = split_rows(rows.rows, cfg.val_size, seed)
        train = TokenBlocks.from_blocks(tok.blocks(to_record(r, rows.schema) for r in train_rows), cfg.block_size)
        if len(train) == 0:
            raise GPConvError(f"{rows.name}: no training tokens after the split")
    val = None
    if val_rows:
        val = TokenBlocks.from_blocks(tok.blocks(to_record(r, rows.schema) for r in val_rows), cfg.block_size)
    return train, val


def as_blocks(data, streamed: bool = False) -> TokenBlocks | StreamingBlocks:
    """Token blocks from blocks (in memory, or streamed when ``streamed`` allows) or an
    ``(n_blocks, block_size)`` tensor of ids."""
    if isinstance(data, TokenBlocks) or (streamed and isinstance(data, StreamingBlocks)):
        return data
    if isinstance(data, torch.Tensor):
        return TokenBlocks(data)
    raise GPConvError(f"expected gpconv token blocks (gpconv.build_datasets) or an id tensor, got {type(data).__name__}")
