"""Data for recovery: column detection, formats, packing, split, response-only masks, streaming."""

import csv
import json

import pytest
import torch

from gpconv import GPConvError, build_datasets
from gpconv.data import Tokenization, detect_schema, load_rows, pack, tokenize
from gpconv.hub import byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _qa(n=30):
    return [{"instruction": f"question {i}?", "response": f"answer {i}."} for i in range(n)]


def _decode(tok, ids):
    return tok.decode([i for i in ids.tolist() if i != -100])


# -- columns ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row, user, answer",
    [
        ({"instruction": "Q", "response": "A", "instruction_source": "x"}, "Q", "A"),  # LaMini
        ({"instruction": "Q", "input": "ctx", "output": "A"}, "Q\n\nctx", "A"),  # Alpaca
        ({"instruction": "Q", "input": "", "output": "A"}, "Q", "A"),
        ({"instruction": "Q", "context": "ctx", "response": "A", "category": "open_qa"}, "Q\n\nctx", "A"),  # Dolly
        ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}, "Q", "A"),
    ],
)
def test_columns_are_detected_and_rendered_kphi3(tmp_path, tok, row, user, answer):
    f = _jsonl(tmp_path / "d.jsonl", [row] * 3)
    train, _ = build_datasets(str(f), tok, block_size=512, val_size=0)
    text = _decode(tok, train.input_ids[0])
    assert text.startswith(f"<|user|>{user}<|end|><|assistant|>{answer}<|end|><|endoftext|>")


def test_unknown_columns_give_one_line_naming_them(tmp_path, tok):
    f = _jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(GPConvError) as e:
        build_datasets(str(f), tok)
    msg = str(e.value)
    assert "\n" not in msg and "'answer'" in msg and "'question'" in msg and "instruction/response" in msg


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_file_types(tmp_path, tok, suffix):
    rows = _qa(5)
    f = tmp_path / f"d{suffix}"
    if suffix == ".json":
        f.write_text(json.dumps(rows))
    elif suffix == ".jsonl":
        _jsonl(f, rows)
    elif suffix == ".csv":
        with f.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["instruction", "response"])
            w.writeheader()
            w.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), f)
    r = load_rows(str(f))
    assert r.schema == "lamini" and r.rows[3]["response"] == "answer 3."


def test_text_file_paragraphs_are_records_without_eos(tmp_path, tok):
    f = tmp_path / "book.txt"
    f.write_text("First para line one.\nline two.\n\nSecond para.\n \nThird.\n")
    rows = load_rows(str(f))
    assert [r["text"] for r in rows.rows] == ["First para line one.\nline two.\n\n", "Second para.\n\n", "Third.\n\n"]
    train, _ = build_datasets(str(f), tok, block_size=64, val_size=0)
    assert _decode(tok, train.labels[0]).startswith("First para line one.\nline two.\n\nSecond para.\n\nThird.\n\n")
    assert tok.eos_token_id not in train.input_ids[0].tolist()


def test_missing_file_and_bad_val_size(tmp_path, tok):
    with pytest.raises(GPConvError, match="no such data file"):
        build_datasets(str(tmp_path / "nope.jsonl"), tok)
    f = _jsonl(tmp_path / "d.jsonl", _qa(4))
    with pytest.raises(GPConvError, match="leaves no training rows"):
        build_datasets(str(f), tok, val_size=4)
    with pytest.raises(GPConvError, match="unknown data format"):
        build_datasets(str(f), tok, format="alpaca")


def test_detect_schema_priority():
    assert detect_schema(["instruction", "input", "output", "response"], "x") == "alpaca"
    assert detect_schema(["text", "meta"], "x") == "text"


# -- packing, split, masks -------------------------------------------------------------------


def test_pack_concatenates_and_pads_last_block():
    samples = [([1, 2, 3], [True] * 3), ([4, 5], [False, True]), ([6, 7, 8, 9], [True] * 4)]
    blocks = list(pack(samples, 4, pad_id=0))
    assert [b[0] for b in blocks] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 0, 0, 0]]
    assert [b[1] for b in blocks] == [[1, 2, 3, -100], [5, 6, 7, 8], [9, -100, -100, -100]]
    one_each = list(pack(samples, 3, pad_id=0, concatenate=False))
    assert [b[0] for b in one_each] == [[1, 2, 3], [4, 5, 0], [6, 7, 8]]  # truncated / padded


def test_split_is_deterministic_and_disjoint(tmp_path, tok):
    f = _jsonl(tmp_path / "d.jsonl", _qa(40))
    a_train, a_val = build_datasets(str(f), tok, block_size=32, val_size=8, seed=3)
    b_train, b_val = build_datasets(str(f), tok, block_size=32, val_size=8, seed=3)
    c_train, c_val = build_datasets(str(f), tok, block_size=32, val_size=8, seed=4)
    assert torch.equal(a_train.input_ids, b_train.input_ids) and torch.equal(a_val.input_ids, b_val.input_ids)
    assert not torch.equal(a_val.input_ids, c_val.input_ids)
    train_text = tok.decode(a_train.input_ids.flatten())
    val_text = tok.decode(a_val.input_ids.flatten())
    val_answers = {w for w in val_text.split("<|assistant|>")[1:]}
    assert len(val_answers) == 8
    assert not any(ans in train_text for ans in val_answers)  # no held-out row in a training block
    _, frac_val = build_datasets(str(f), tok, block_size=32, val_size=0.25, seed=3)
    assert tok.decode(frac_val.input_ids.flatten()).count("<|assistant|>") == 10


def test_response_only_mask_kphi3(tmp_path, tok):
    f = _jsonl(tmp_path / "d.jsonl", [{"instruction": "Name a fruit", "input": "", "output": "A pear."}] * 2)
    train, _ = build_datasets(str(f), tok, block_size=128, val_size=0, response_only=True)
    ids, labels = train.input_ids[0], train.labels[0]
    counted = labels != -100
    assert torch.equal(labels[counted], ids[counted])
    assert _decode(tok, labels) == "A pear.<|end|><|endoftext|>" * 2
    full, _ = build_datasets(str(f), tok, block_size=128, val_size=0, response_only=False)
    assert full.loss_tokens > 2 * train.loss_tokens


def test_response_only_mask_chat_template_and_plain(tok):
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                        {"role": "user", "content": "again"}, {"role": "assistant", "content": "sure"}]}
    ids, counted = tokenize(rec, tok, "chat-template", response_only=True)
    assert tok.decode(ids) == tok.apply_chat_template(rec["messages"], tokenize=False)
    assert tok.decode([i for i, c in zip(ids, counted) if c]) == "yo<|end|>sure<|end|>"
    ids, counted = tokenize(rec, tok, "plain", response_only=True)
    assert tok.decode(ids) == "hi\n\nyo\n\nagain\n\nsure<|endoftext|>"
    assert tok.decode([i for i, c in zip(ids, counted) if c]) == "yo\n\nsure<|endoftext|>"


# The shape of Phi-3-mini-4k-instruct's template: end-of-text closes a finished conversation.
PHI3_STYLE_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)


def test_chat_template_that_ends_conversations_with_eos():
    tok = byte_tokenizer()
    tok.chat_template = PHI3_STYLE_TEMPLATE
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                        {"role": "user", "content": "again"}, {"role": "assistant", "content": "sure"}]}
    ids, counted = tokenize(rec, tok, "chat-template", response_only=True)
    assert tok.decode(ids) == tok.apply_chat_template(rec["messages"], tokenize=False)
    assert tok.decode(ids).count("<|endoftext|>") == 1  # only the finished conversation's
    assert tok.decode([i for i, c in zip(ids, counted) if c]) == "yo<|end|>sure<|end|><|endoftext|>"


def test_streaming_local_file(tmp_path, tok):
    f = _jsonl(tmp_path / "d.jsonl", _qa(30))
    train, val = build_datasets(str(f), tok, block_size=32, val_size=5, streaming=True, seed=0)
    assert val is not None and tok.decode(val.input_ids.flatten()).count("<|assistant|>") == 5
    assert "question 0?" in tok.decode(val.input_ids.flatten())  # streams hold out their first rows
    def text_of(ds):
        return tok.decode(torch.cat([b["input_ids"] for b in ds])).replace("<|pad|>", "")

    text = text_of(train)
    assert text.count("<|assistant|>") == 25 and "question 0?" not in text
    train.set_epoch(1)
    again = text_of(train)
    assert sorted(again.split("<|user|>")) == sorted(text.split("<|user|>")) and again != text  # reshuffled
    with pytest.raises(GPConvError, match="number of rows"):
        build_datasets(str(f), tok, val_size=0.1, streaming=True)


def test_tokenization_settings_are_checked(tok):
    with pytest.raises(GPConvError, match="block_size"):
        Tokenization(tok, block_size=1)


def test_streamed_text_file_matches_in_memory(tmp_path, tok):
    f = tmp_path / "book.txt"
    f.write_text("".join(f"Paragraph {i} line.\nMore {i}.\n\n" for i in range(12)))
    mem, _ = build_datasets(str(f), tok, block_size=48, val_size=0)
    streamed, _ = build_datasets(str(f), tok, block_size=48, val_size=0, streaming=True)
    s_ids = torch.cat([b["input_ids"] for b in streamed])
    assert tok.eos_token_id not in s_ids.tolist()

    def paragraphs(ids):
        return sorted(p for p in tok.decode(ids).replace("<|pad|>", "").split("\n\n") if p)

    assert paragraphs(s_ids) == paragraphs(mem.input_ids.flatten()) and len(paragraphs(s_ids)) == 12


# -- hub shortcuts (no network: datasets.load_dataset is replaced by a recorder) -------------------

HUB_ROWS = {
    "MBZUAI/LaMini-instruction": [{"instruction": f"q{i}", "response": f"a{i}", "instruction_source": "alpaca"}
                                  for i in range(40)],
    "databricks/databricks-dolly-15k": [{"instruction": f"q{i}", "context": f"c{i}", "response": f"a{i}",
                                         "category": "open_qa"} for i in range(40)],
    "Salesforce/wikitext": [{"text": f" = Heading {i} = \n"} for i in range(40)],
}


@pytest.fixture
def fake_hub(monkeypatch):
    import datasets

    calls = []

    def load_dataset(path, name=None, split=None, streaming=False, **kw):
        calls.append((path, name, split, streaming))
        ds = datasets.Dataset.from_list(HUB_ROWS[path])
        return ds.to_iterable_dataset() if streaming else ds

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


@pytest.mark.parametrize(
    "alias, call, schema, streamed",
    [
        ("lamini", ("MBZUAI/LaMini-instruction", None, "train", True), "lamini", True),
        ("dolly", ("databricks/databricks-dolly-15k", None, "train", False), "dolly", False),
        ("wikitext2", ("Salesforce/wikitext", "wikitext-2-raw-v1", "train", False), "text", False),
    ],
)
def test_hub_aliases(fake_hub, tok, alias, call, schema, streamed):
    rows = load_rows(alias)
    assert fake_hub == [call]
    assert rows.schema == schema and rows.streaming == streamed
    train, val = build_datasets(rows, tok, block_size=32, val_size=4, seed=0)
    text = tok.decode(val.input_ids.flatten())
    if alias == "dolly":  # the context joins the instruction after a blank line
        assert "<|user|>q" in text and "\n\nc" in text and "<|assistant|>a" in text
    elif alias == "lamini":  # streams hold out their first rows
        assert "<|user|>q0<|end|><|assistant|>a0<|end|>" in text
    else:
        assert "Heading" in text and "<|user|>" not in text
    assert load_rows(alias, split="validation") is not None and fake_hub[-1][2] == "validation"
