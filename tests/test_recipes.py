"""Recipes: every bundled recipe resolves, the paper's counts come out of their configs, overrides
and mistakes behave, and the runner goes end to end on a tiny model with data made here."""

import json

import pytest
import yaml
from typer.testing import CliRunner

import gpconv
from gpconv import GPConvError, recipes
from gpconv.hub import byte_tokenizer
from gpconv_cli.main import app

runner = CliRunner()

# a Phi-3-shaped model small enough for a test: hidden 64, 16 channels per group -> 4 groups
TINY = {
    "model.config.hidden_size": 64,
    "model.config.intermediate_size": 128,
    "model.config.num_attention_heads": 4,
    "model.config.num_key_value_heads": 4,
    "surgery.min_channels_per_group": 16,
    "data.block_size": 32,
    "train.batch_size": 4,
    "train.progress": False,
}


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture
def data(tmp_path):
    rows = [{"instruction": f"Spell {w}", "input": "", "output": " ".join(w)} for w in ["cat", "dog", "emu", "owl"] * 10]
    f = tmp_path / "spell.json"
    f.write_text(json.dumps(rows))
    return f


# -- bundled recipes ---------------------------------------------------------------------------


def test_bundled_recipes_are_found():
    names = set(recipes.list_recipes())
    assert {"JP47D54C", "JP47D55C", "JP47D56C", "phi3-mini-lamini", "smollm2-offline", "tiny-demo"} <= names


@pytest.mark.parametrize("name", sorted(recipes.list_recipes()))
def test_every_bundled_recipe_resolves(name):
    r = recipes.load_recipe(name)
    assert r["name"] == name and r["description"]
    assert set(r) == set(recipes.TOP)
    # resolving is idempotent: the dumped recipe (recipe.yaml of a run) loads to the same thing
    again = recipes.load_recipe(recipes.parse_value(recipes.dump(r)))
    assert again == r
    if r["train"] is not None:
        recipes.train_config(r)  # a valid TrainConfig
    if r["surgery"] is not None:
        recipes.surgery_config(r)
    assert set(recipes.missing_keys(r)) <= {"data.source"}


@pytest.mark.parametrize("name, layers, non_embedding", [
    ("JP47D54C", 2, 226_507_776),
    ("JP47D55C", 2, 35_011_584),
    ("JP47D56C", 3, 52_515_840),
])
def test_paper_recipes_give_the_papers_parameter_counts(name, layers, non_embedding):
    r = recipes.load_recipe(name)
    plan = recipes.plan(r)  # meta device: no weights, no data
    assert plan.after.non_embedding == non_embedding
    assert r["model"]["config"]["num_hidden_layers"] == layers
    # the report's training setup
    t, d = r["train"], r["data"]
    assert (t["lr"], t["warmup_ratio"], t["min_lr_ratio"], t["precision"]) == (1e-4, 0.0, 1.0, "bf16")
    assert (d["source"], d["block_size"], d["val_size"], d["pack"], d["format"]) == ("lamini", 4096, 5000, True, "kphi3")


# -- overrides and validation ------------------------------------------------------------------


def test_overrides_are_dotted_yaml_values():
    r = recipes.load_recipe("JP47D55C", ["train.lr=3e-4", "surgery.target_modules=[mlp]", "data.val_size=0.05",
                                         "eval.prompts=[]", "train.max_steps=7"])
    assert r["train"]["lr"] == 3e-4 and isinstance(r["train"]["lr"], float)
    assert r["surgery"]["target_modules"] == ["mlp"] and r["data"]["val_size"] == 0.05 and r["train"]["max_steps"] == 7
    dense = recipes.load_recipe("JP47D55C", ["surgery=null"])
    assert dense["surgery"] is None
    grouped = recipes.load_recipe("JP47D54C", ["surgery.min_channels_per_group=256"])  # a null section becomes one
    assert grouped["surgery"]["min_channels_per_group"] == 256 and grouped["surgery"]["variant"] == "io"
    assert recipes.load_recipe("JP47D54C", {"train.lr": 2})["train"]["lr"] == 2.0  # ints where floats are due


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown recipe key train.lrr; did you mean train.lr?"),
    ("modle.name=x", "unknown recipe key modle"),
    ("train.lr=fast", "train.lr: 'fast' is not a valid value"),
    ("train.lr=-1", "lr must be > 0"),
    ("surgery.variant=conv", "unknown variant 'conv'"),
    ("data.format=xml", "unknown data format 'xml'"),
    ("data.block_size=1", "block_size must be at least 2"),
    ("train.out_dir=x", "set train's out_dir through output.dir"),
    ("output.overwrite=yes please", "output.overwrite"),
    ("train.lr", "--set takes KEY=VALUE"),
    ("model.config.vocab_size.x=1", "cannot set model.config.vocab_size.x"),
])
def test_mistakes_are_one_line(override, message):
    with pytest.raises(GPConvError) as e:
        recipes.load_recipe("JP47D55C", [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unknown_recipe_and_missing_values(tmp_path):
    with pytest.raises(GPConvError, match="unknown recipe 'nope'.*JP47D55C"):
        recipes.load_recipe("nope")
    r = recipes.load_recipe("tiny-demo")
    with pytest.raises(GPConvError, match=r"needs a value for data.source \(--set data.source=...\)"):
        recipes.run_recipe(r)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: tiny-phi3}\ndata: [1, 2]\n")
    with pytest.raises(GPConvError, match="section data must be a mapping"):
        recipes.load_recipe(bad)


def test_yaml_reads_exponent_floats():
    assert recipes.parse_value("1e-4") == 1e-4 and recipes.parse_value("3E5") == 3e5
    assert recipes.parse_value("10") == 10 and recipes.parse_value("null") is None and recipes.parse_value("a:b") == "a:b"


# -- the runner, end to end ---------------------------------------------------------------------


def test_run_trains_from_scratch_and_writes_everything(data, tmp_path):
    out = tmp_path / "run"
    res = recipes.run_recipe("tiny-demo", {**TINY, "data.source": str(data), "train.max_steps": 6,
                                           "train.lr": 3e-3, "train.log_every": 1, "output.dir": str(out)},
                             say=lambda s: None)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "recipe.yaml", "results.json", "gpconv_report.json", "metrics.jsonl",
            "loss.png"} <= names
    summary = json.loads((out / "results.json").read_text())
    assert summary["mode"] == "train" and summary["steps"] == 6 and summary["tokens"] == 6 * 4 * 32
    assert summary["params"]["after"]["non_embedding"] < summary["params"]["before"]["non_embedding"]
    # the constant learning rate of the paper: no warm-up, no decay
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = [x["lr"] for x in rows if x["split"] == "train"]
    assert lrs == [3e-3] * 6
    val = [x for x in rows if x["split"] == "val"]
    assert val[-1]["loss"] < val[0]["loss"]
    # the saved model is the trained one, and results.json holds its held-out numbers
    reloaded = gpconv.from_pretrained(out)
    train, held = recipes.build_data(res.recipe, byte_tokenizer())
    assert gpconv.evaluate(reloaded, held)["loss"] == pytest.approx(summary["val"]["loss"], rel=1e-5)
    # recipe.yaml runs again as it is, and an existing output is refused before any work
    again = recipes.load_recipe(out / "recipe.yaml")
    assert again == res.recipe
    with pytest.raises(GPConvError, match="exists and is not empty"):
        recipes.run_recipe(out / "recipe.yaml", say=lambda s: None)


def test_run_distills_from_the_model_before_surgery(data, tmp_path):
    spec = {
        "name": "kd",
        "model": {"config": {"model_type": "phi3", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                             "eos_token_id": 256, "pad_token_id": 261, "bos_token_id": None}, "tokenizer": "byte"},
        "teacher": "model",
        "surgery": {"min_channels_per_group": 16, "init": "project"},
        "data": {"source": str(data), "block_size": 32, "val_size": 8},
        "train": {"max_steps": 3, "batch_size": 4, "lr": 3e-3, "progress": False, "save_every": 0},
        "eval": {"prompts": ["Spell cat"], "max_new_tokens": 4},
        "output": {"dir": None},
    }
    res = recipes.run_recipe(spec, say=lambda s: None)
    assert res.summary["mode"] == "distill" and res.out_dir is None
    assert set(res.metrics) == {"model", "teacher"} and res.metrics["teacher"]["loss"] < 10
    assert len(res.generations) == 1 and isinstance(res.generations[0]["reply"], str)
    assert sum(1 for m in res.model.modules() if type(m).__name__ == "GroupedPointwiseBlock") == 8


def test_tokenizer_must_fit_the_config(data):
    small = {**TINY, "data.source": str(data), "model.config.vocab_size": 100, "output.dir": None}
    with pytest.raises(GPConvError, match="cannot build the model.*Padding_idx"):  # pad id 261 is outside
        recipes.run_recipe("tiny-demo", small, say=lambda s: None)
    small.update({"model.config.pad_token_id": 0, "model.config.eos_token_id": 0})
    with pytest.raises(GPConvError, match="tokenizer has 262 tokens but model.config.vocab_size is 100"):
        recipes.run_recipe("tiny-demo", small, say=lambda s: None)


# -- Dolly-style dialog data -------------------------------------------------------------------


def test_dolly_columns_for_dialog_training(tmp_path):
    rows = [{"instruction": f"Question {i}?", "context": "Some context." if i % 2 else "", "response": f"Answer {i}.",
             "category": "open_qa" if i % 3 else "brainstorming"} for i in range(30)]
    f = tmp_path / "dolly.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    r = recipes.load_recipe("dolly-dialog", {
        "data.source": str(f), "data.val_size": 4, "data.block_size": 64, "data.filter": {"category": ["open_qa"]},
        "model.name": "tiny-phi3",
    })
    tok = byte_tokenizer()
    train, val = recipes.build_data(r, tok)
    text = tok.decode(train.input_ids.flatten().tolist())
    assert "Question 1?" in text and "Question 3?" not in text  # category filter: 3 is brainstorming
    assert "Question 1?\n\nSome context." in text  # the context joins the user turn
    # response-only: the counted tokens are the assistant's replies (and end markers), never the prompt
    counted = tok.decode([t for t in train.labels.flatten().tolist() if t != -100])
    assert "Answer 1." in counted and "Question" not in counted and "context" not in counted
    assert len(val) >= 1


# -- the CLI ----------------------------------------------------------------------------------


def test_cli_list_dry_run_and_errors(tmp_path):
    r = runner.invoke(app, ["run", "--list"])
    assert r.exit_code == 0 and "JP47D55C" in r.output and "smollm2-offline" in r.output
    r = runner.invoke(app, ["run", "JP47D56C", "--dry-run", "--set", "train.max_steps=5"])
    assert r.exit_code == 0, r.output
    assert "max_steps: 5" in r.output and "52,515,840" in r.output
    r = runner.invoke(app, ["run", "tiny-demo", "--dry-run"])
    assert r.exit_code == 0 and "still to set before a run: data.source" in r.output
    r = runner.invoke(app, ["run", "JP47D55C", "--set", "train.lrr=1"])
    assert r.exit_code == 2 and r.output.strip().endswith("did you mean train.lr?")
    r = runner.invoke(app, ["run", "tiny-demo", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "data.source" in r.output and not (tmp_path / "x").exists()


def test_cli_runs_a_recipe_file(data, tmp_path):
    recipe = tmp_path / "mine.yaml"
    base = recipes.read_yaml(recipes.find_recipe("tiny-demo"))
    recipe.write_text(yaml.safe_dump(base))
    args = ["run", str(recipe), "--out", str(tmp_path / "out"), "--no-progress", "--set", f"data.source={data}",
            "--set", "train.max_steps=2"]
    for k, v in TINY.items():
        args += ["--set", f"{k}={v}"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "validation loss" in r.output and (tmp_path / "out" / "results.json").is_file()


def test_data_is_checked_before_any_model_loads(tmp_path):
    # the model path does not exist either: the data error coming first shows the order
    r = {"model": {"name": str(tmp_path / "no-model")}, "data": {"source": str(tmp_path / "missing.json")},
         "train": {"max_steps": 1}, "output": {"dir": None}}
    with pytest.raises(GPConvError, match="no such data file"):
        recipes.run_recipe(r, say=lambda s: None)
