"""Training and evaluation data: instruction or text sources -> fixed-length token blocks.

The pipeline, one small step per function:

    source (alias, hub id, local file) -> rows (dicts) -> records -> token segments -> blocks

* A **row** is whatever the source holds. Its columns are detected once per source
  (:data:`SCHEMAS`): instruction/response (LaMini), instruction/input/output (Alpaca),
  instruction/context/response (Dolly), messages (chat), text.
* A **record** is either ``{"messages": [{"role", "content"}, ...]}`` or ``{"text": str}``.
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

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .errors import GPConvError

FORMATS = ("kphi3", "chat-template", "plain")

# alias -> (hub path, config name, split, stream by default)
HUB_ALIASES = {
    "lamini": ("MBZUAI/LaMini-instruction", None, "train", True),  # 2.58M rows: always streamed
    "dolly": ("databricks/databricks-dolly-15k", None, "train", False),
    "wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1", "train", False),
}

# schema name -> the columns it needs; the first schema whose columns are all present wins
SCHEMAS = (
    ("messages", ("messages",)),
    ("alpaca", ("instruction", "input", "output")),
    ("dolly", ("instruction", "context", "response")),
    ("lamini", ("instruction", "response")),
    ("text", ("text",)),
)

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".txt")
STREAM_SHUFFLE_BUFFER = 10_000  # rows held by the streaming shuffle: enough to mix sources, small in RAM
AUTO_VAL_ROWS = 1_000  # default validation size cap: 5% of rows, at most this many


# --------------------------------------------------------------------------------------------
# Rows -> records
# --------------------------------------------------------------------------------------------


def detect_schema(columns: Iterable[str], where: str) -> str:
    """The schema name that fits ``columns``, or a one-line error naming the columns found."""
    cols = set(columns)
    for name, needed in SCHEMAS:
        if cols.issuperset(needed):
            return name
    fits = "; ".join("/".join(c) for _, c in SCHEMAS)
    raise GPConvError(f"{where}: columns {sorted(cols)} fit none of the known layouts ({fits})")


def _join(*parts: str | None) -> str:
    return "\n\n".join(p.strip() for p in parts if p and p.strip())


def to_record(row: dict, schema: str) -> dict:
    """One row in a known schema -> ``{"messages": [...]}`` or ``{"text": ...}``."""
    if schema == "text":
        # rows of a .txt file are paragraphs of one document: no end-of-text between them
        return {"text": row["text"] or "", "eos": row.get("_eos", True)}
    if schema == "messages":
        msgs = row["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            raise GPConvError("a 'messages' row must be a list of {role, content} objects")
        return {"messages": [{"role": m["role"], "content": m["content"] or ""} for m in msgs]}
    if schema == "alpaca":
        user, answer = _join(row["instruction"], row["input"]), row["output"]
    elif schema == "dolly":
        user, answer = _join(row["instruction"], row["context"]), row["response"]
    else:  # lamini
        user, answer = row["instruction"], row["response"]
    return {"messages": [{"role": "user", "content": user or ""}, {"role": "assistant", "content": answer or ""}]}


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


@dataclass
class Rows:
    """Rows of one source: a list (in memory) or a ``datasets.IterableDataset`` (streamed)."""

    rows: object
    schema: str
    name: str

    @property
    def streaming(self) -> bool:
        return not isinstance(self.rows, list)


def _read_local(path: Path) -> list[dict]:
    """A small local file as a list of row dicts (no datasets cache, no arrow conversion)."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        # Paragraphs (split at blank lines) are the records, so a text file can be split into
        # train and validation; they are rejoined with the blank line and no end-of-text token.
        text = path.read_text(encoding="utf-8")
        return [{"text": p.strip("\n") + "\n\n", "_eos": False} for p in re.split(r"\n[ \t]*\n", text) if p.strip()]
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if "Extra data" not in str(e):  # a .json file holding JSON Lines is common on the hub
                raise GPConvError(f"{path} is not valid JSON ({e})") from None
        else:
            if isinstance(data, dict):  # columnar {"col": [...]} or {"data": [...]}
                if isinstance(data.get("data"), list):
                    data = data["data"]
                elif data and all(isinstance(v, list) for v in data.values()):
                    data = [dict(zip(data, vals)) for vals in zip(*data.values())]
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise GPConvError(f"{path}: expected a list of JSON objects (one per row)")
            return data
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise GPConvError(f"{path}:{i} is not valid JSON ({e})") from None
    return rows


def _stream_local(path: Path):
    """A local file as a lazily read ``datasets.IterableDataset`` (for files too big for RAM)."""
    from datasets import load_dataset

    builder = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}[path.suffix.lower()]
    if builder != "text":
        return load_dataset(builder, data_files=str(path), split="train", streaming=True)
    ds = load_dataset("text", data_files=str(path), split="train", streaming=True, sample_by="paragraph")
    # the same records as an in-memory .txt: paragraphs of one document
    return ds.map(lambda r: {"text": r["text"].strip("\n") + "\n\n", "_eos": False})


def _hub(path: str, name: str | None, split: str, streaming: bool):
    from datasets import load_dataset

    try:
        return load_dataset(path, name, split=split, streaming=streaming)
    except Exception as e:  # offline, unknown id, gated: one line, not a traceback
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise GPConvError(f"cannot load dataset {path!r}: {first}") from None


def _columns(ds) -> list[str]:
    cols = getattr(ds, "column_names", None)
    if cols:
        return list(cols)
    first = next(iter(ds), None)  # streamed datasets may not know their columns up front
    if first is None:
        return []
    return list(first)


def load_rows(source: str, *, split: str | None = None, streaming: bool | None = None,
              max_samples: int | None = None) -> Rows:
    """Rows of ``source``: an alias (:data:`HUB_ALIASES`), a local file, or a hub dataset id.

    ``streaming=None`` streams LaMini and reads everything else into memory.
    ``max_samples`` caps the rows read (before the train/validation split).
    """
    path = Path(source).expanduser()
    if path.suffix.lower() in LOCAL_SUFFIXES or path.exists():
        if not path.is_file():
            raise GPConvError(f"no such data file: {source}")
        if path.suffix.lower() not in LOCAL_SUFFIXES:
            raise GPConvError(f"{source}: unsupported data file type; use one of {', '.join(LOCAL_SUFFIXES)}")
        if streaming:
            ds = _stream_local(path)
            rows = ds.take(max_samples) if max_samples else ds
            return Rows(rows, detect_schema(_columns(ds), str(path)), str(path))
        rows = _read_local(path)
        if not rows:
            raise GPConvError(f"{source} holds no rows")
        rows = rows[:max_samples] if max_samples else rows
        return Rows(rows, detect_schema(rows[0].keys(), str(path)), str(path))
    if source in HUB_ALIASES:
        hub_path, name, default_split, stream_default = HUB_ALIASES[source]
    else:
        hub_path, name, default_split, stream_default = source, None, "train", False
    stream = stream_default if streaming is None else streaming
    ds = _hub(hub_path, name, split or default_split, stream)
    if stream:
        rows = ds.take(max_samples) if max_samples else ds
        return Rows(rows, detect_schema(_columns(ds), hub_path), hub_path)
    if max_samples:
        ds = ds.select(range(min(max_samples, len(ds))))
    return Rows(ds.to_list(), detect_schema(ds.column_names, hub_path), hub_path)


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


@dataclass(frozen=True)
class Tokenization:
    """How records become blocks; the same settings must be used for training and evaluation."""

    tokenizer: object
    format: str = "kphi3"
    block_size: int = 512
    response_only: bool = False
    pack: bool = True

    def __post_init__(self):
        if self.format not in FORMATS:
            raise GPConvError(f"unknown data format {self.format!r}; choose one of: {', '.join(FORMATS)}")
        if self.block_size < 2:
            raise GPConvError(f"block_size must be at least 2, got {self.block_size}")

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return 0 if pad is None else pad

    def blocks(self, records: Iterable[dict]) -> Iterator[tuple[list[int], list[int]]]:
        samples = (tokenize(r, self.tokenizer, self.format, self.response_only) for r in records)
        return pack(samples, self.block_size, self.pad_id, self.pack)


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


def build_datasets(
    source: str | Rows,
    tokenizer,
    *,
    format: str = "kphi3",
    block_size: int = 512,
    val_size: int | float | None = None,
    seed: int = 0,
    response_only: bool = False,
    max_samples: int | None = None,
    pack: bool = True,
    streaming: bool | None = None,
    split: str | None = None,
) -> tuple[TokenBlocks | StreamingBlocks, TokenBlocks | None]:
    """``(train, val)`` token blocks from a data source (see module docs).

    ``val_size``: rows held out (int) or a fraction (float); None = 5% up to 1,000 rows; 0 = no
    validation set (``val`` is None). ``split`` picks the hub split (default "train").
    """
    tok = Tokenization(tokenizer, format, block_size, response_only, pack)
    rows = source if isinstance(source, Rows) else load_rows(source, split=split, streaming=streaming, max_samples=max_samples)
    if rows.streaming:
        k = _val_count(val_size, None)
        # the stream's first k rows validate: fixed, so they never leak into a reshuffled epoch
        val_rows = list(rows.rows.take(k)) if k else []
        train = StreamingBlocks(rows.rows.skip(k), rows.schema, tok, seed)
    else:
        train_rows, val_rows = split_rows(rows.rows, val_size, seed)
        train = TokenBlocks.from_blocks(tok.blocks(to_record(r, rows.schema) for r in train_rows), block_size)
        if len(train) == 0:
            raise GPConvError(f"{rows.name}: no training tokens after the split")
    val = None
    if val_rows:
        val = TokenBlocks.from_blocks(tok.blocks(to_record(r, rows.schema) for r in val_rows), block_size)
    return train, val
