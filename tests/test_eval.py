"""Evaluation (loss, perplexity, accuracy, response-only) and generation."""

import json
import math

import pytest
import torch
from torch import nn

from gpconv import GPConvError, build_datasets, evaluate
from gpconv.data import TokenBlocks
from gpconv.recovery import chat_prompt, compare, generate
from gpconv.hub import byte_tokenizer, tiny_phi3

V = 320


class Oracle(nn.Module):
    """Knows the next token (reads it from the input): loss ~0, accuracy 1."""

    def forward(self, ids):
        nxt = torch.roll(ids, -1, dims=1)
        return torch.nn.functional.one_hot(nxt, V).float() * 50.0


class Uniform(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(()))

    def forward(self, ids):
        return torch.zeros(*ids.shape, V) + self.p


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is fastest on a shared machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def blocks():
    tok = byte_tokenizer()
    return tok, TokenBlocks(torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(0)))


def test_metrics_of_known_models(blocks):
    _, data = blocks
    good = evaluate(Oracle(), data, batch_size=4)
    assert good["accuracy"] == 1.0 and good["loss"] < 1e-6 and good["tokens"] == 6 * 15
    flat = evaluate(Uniform(), data)
    assert flat["loss"] == pytest.approx(math.log(V)) and flat["perplexity"] == pytest.approx(V)
    both = compare({"oracle": Oracle(), "uniform": Uniform()}, data, max_batches=1, batch_size=2)
    assert both["oracle"]["tokens"] == both["uniform"]["tokens"] == 2 * 15


def test_response_only_counts_responses(tmp_path):
    tok = byte_tokenizer()
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"instruction": "a long question " * 3, "response": "ok"}) for _ in range(4)))
    full, _ = build_datasets(str(f), tok, block_size=64, val_size=0)
    resp, _ = build_datasets(str(f), tok, block_size=64, val_size=0, response_only=True)
    # each response: "ok<|end|><|endoftext|>" = 4 tokens, all predicted from inside the block
    assert evaluate(Uniform(), resp)["tokens"] == 4 * 4
    assert evaluate(Uniform(), full)["tokens"] > 4 * 4


def test_empty_data_is_an_error():
    with pytest.raises(GPConvError, match="no tokens"):
        evaluate(Uniform(), TokenBlocks(torch.zeros(1, 4, dtype=torch.long), torch.full((1, 4), -100)))


def test_generate_uses_chat_template_and_limits(one_thread):
    model, tok = tiny_phi3(seed=0, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)
    ids = chat_prompt(tok, "hi")
    assert tok.decode(ids[0]) == "<|user|>hi<|end|><|assistant|>"
    assert tok.decode(chat_prompt(tok, "hi", chat=False)[0]) == "hi"
    a = generate(model, tok, "hello", max_new_tokens=6)
    b = generate(model, tok, "hello", max_new_tokens=6)
    assert a == b  # greedy
    assert len(generate(model, tok, "hello", max_new_tokens=1)) == 1  # one byte token, one character
    s1 = generate(model, tok, "hello", max_new_tokens=6, do_sample=True, top_p=0.9, temperature=1.5, seed=1)
    s2 = generate(model, tok, "hello", max_new_tokens=6, do_sample=True, top_p=0.9, temperature=1.5, seed=1)
    assert s1 == s2  # seeded
    with pytest.raises(GPConvError, match="transformers model"):
        generate(Uniform(), tok, "x")
