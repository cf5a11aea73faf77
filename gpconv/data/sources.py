"""Where training and evaluation text comes from: a source (alias, hub id, local file) -> rows
(dicts) -> records.

* A **row** is whatever the source holds. Its columns are detected once per source
  (:data:`SCHEMAS`): instruction/response (LaMini), instruction/input/output (Alpaca),
  instruction/context/response (Dolly), messages (chat), text.
* A **record** is either ``{"messages": [{"role", "content"}, ...]}`` or ``{"text": str}``.

:mod:`gpconv.data.blocks` turns records into token blocks.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..errors import GPConvError
from ..hfutil import first_line

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


def _read_text(path: Path) -> str:
    """The file's text as UTF-8; another encoding is one line naming the file and the first bad byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise GPConvError(f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} at line {line}); "
                          "convert it, e.g. iconv -f latin1 -t utf-8") from None


def _read_local(path: Path) -> list[dict]:
    """A small local file as a list of row dicts (no datasets cache, no arrow conversion)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow  # heavy, and only parquet files need it
        import pyarrow.parquet as pq  # heavy, and only parquet files need it

        try:
            return pq.read_table(path).to_pylist()
        except (pyarrow.ArrowException, OSError) as e:
            raise GPConvError(f"cannot read {path}: {first_line(e)}") from None
    text = _read_text(path)
    if suffix == ".txt":
        # Paragraphs (split at blank lines) are the records, so a text file can be split into
        # train and validation; they are rejoined with the blank line and no end-of-text token.
        return [{"text": p.strip("\n") + "\n\n", "_eos": False} for p in re.split(r"\n[ \t]*\n", text) if p.strip()]
    if suffix == ".csv":
        try:
            return list(csv.DictReader(io.StringIO(text, newline="")))
        except csv.Error as e:
            raise GPConvError(f"{path} is not a readable CSV file ({e})") from None
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
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise GPConvError(f"{path}:{i} is not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise GPConvError(f"{path}:{i}: expected a JSON object (one row per line), got {type(row).__name__}")
            rows.append(row)
    return rows


def _stream_local(path: Path):
    """A local file as a lazily read ``datasets.IterableDataset`` (for files too big for RAM)."""
    from datasets import load_dataset  # heavy (~1 s to import): only streamed and hub sources need it

    builder = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}[path.suffix.lower()]
    if builder != "text":
        return load_dataset(builder, data_files=str(path), split="train", streaming=True)
    ds = load_dataset("text", data_files=str(path), split="train", streaming=True, sample_by="paragraph")
    # the same records as an in-memory .txt: paragraphs of one document
    return ds.map(lambda r: {"text": r["text"].strip("\n") + "\n\n", "_eos": False})


def _hub(path: str, name: str | None, split: str, streaming: bool):
    from datasets import load_dataset  # heavy (~1 s to import): only streamed and hub sources need it

    try:
        return load_dataset(path, name, split=split, streaming=streaming)
    except Exception as e:  # offline, unknown id, gated: one line, not a traceback
        raise GPConvError(f"cannot load dataset {path!r}: {first_line(e)}") from None


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
        if path.is_dir():
            raise GPConvError(f"{source} is a directory; give a data file ({', '.join(LOCAL_SUFFIXES)})")
        if not path.is_file():
            raise GPConvError(f"no such data file: {source}")
        if path.suffix.lower() not in LOCAL_SUFFIXES:
            raise GPConvError(f"{source}: unsupported data file type; use one of {', '.join(LOCAL_SUFFIXES)}")
        if streaming:
            ds = _stream_local(path)
            rows = ds.take(max_samples) if max_samples else ds
            log = logging.getLogger("datasets")  # it logs a parse failure before raising it: the one line is ours
            level = log.level
            log.setLevel(logging.CRITICAL)
            try:
                columns = _columns(ds)  # reads the first rows: a file datasets cannot parse fails here
            except Exception as e:  # datasets wraps the parser's error (JSON, UTF-8, CSV, arrow) in its own types
                raise GPConvError(f"cannot read {source}: {first_line(e)}") from None
            finally:
                log.setLevel(level)
            return Rows(rows, detect_schema(columns, str(path)), str(path))
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


def check_local_source(source: str) -> None:
    """Read a local data file as :func:`load_rows` would, so that a bad one fails before a model
    loads (calibration reads its data only after). Hub ids and aliases are left to load time."""
    path = Path(source).expanduser()
    if path.suffix.lower() in LOCAL_SUFFIXES or path.exists():
        load_rows(source)
