"""`gpconv eval --tasks`: lm-eval-harness on local task YAMLs (offline), equal to lm-eval's own run."""

import json
import sys

import pytest
from tiny_models import TinyMLPLM, save_teacher_student
from typer.testing import CliRunner

import gpconv
from gpconv import GPConvError
from gpconv.hub import byte_tokenizer, tiny_phi3
from gpconv.recovery import evaluate_tasks, resolve_tasks
from gpconv_cli.main import app

runner = CliRunner()
SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)
PPL_METRICS = {"word_perplexity", "byte_perplexity", "bits_per_byte"}
MC_METRICS = {"acc", "acc_norm"}

TEXTS = [
    "the cat sat on the mat and looked at the door",
    "a grouped convolution mixes the channels of each group on its own",
    "hello world, this line is scored by rolling loglikelihood",
    "short",
]
QUESTIONS = [
    ("The sky is", [" blue", " green", " loud"], 0),
    ("Two plus two is", [" four", " five"], 0),
    ("Cats say", [" woof", " meow"], 1),
    ("Ice is", [" hot", " cold", " purple", " late"], 1),
    ("The sun rises in the", [" east", " west"], 0),
    ("Fish live in", [" trees", " water", " clouds"], 1),
]

PPL_YAML = """task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/ppl.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
"""
MC_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
process_docs: !function utils.keep_all
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Nothing may reach the hub: local JSON files only."""
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A teacher and its shrunk student (both saved with the byte tokenizer), two local tasks."""
    d = tmp_path_factory.mktemp("lmeval")
    save_teacher_student(d)
    tasks = d / "tasks"
    tasks.mkdir()
    (d / "ppl.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (d / "mc.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "label": a}) + "\n"
                                        for q, c, a in QUESTIONS))
    (tasks / "ppl.yaml").write_text(PPL_YAML.format(dir=d))
    (tasks / "mc.yaml").write_text(MC_YAML.format(dir=d))
    (tasks / "utils.py").write_text("def keep_all(docs):\n    return docs\n")
    (tasks / "_template.yaml").write_text("output_type: multiple_choice\n")  # an include base: no task of its own
    return d


def lm_eval_own_run(model_dir, task_dir, **kw) -> dict:
    """lm-eval's own run of a saved checkpoint (its HF loader, trust_remote_code for gpconv's modules)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    res = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={model_dir},trust_remote_code=True,dtype=float32,device=cpu",
        tasks=["tiny_ppl", "tiny_mc"], task_manager=manager, log_samples=False, **kw)
    return res["results"]


def test_tasks_equal_lm_eval_own_run(setup):
    d = setup
    r = run("eval", d / "student", "--teacher", d / "teacher", "--tasks",
            f"{d / 'tasks' / 'ppl.yaml'},{d / 'tasks' / 'mc.yaml'}", "--batch-size", 2, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["models"] == {"student": str(d / "student"), "teacher": str(d / "teacher")}
    assert set(res["tasks"]) == {"tiny_ppl", "tiny_mc"}
    assert set(res["tasks"]["tiny_ppl"]) == PPL_METRICS and set(res["tasks"]["tiny_mc"]) == MC_METRICS
    assert res["samples"] == {"tiny_ppl": len(TEXTS), "tiny_mc": len(QUESTIONS)}
    assert res["higher_is_better"]["tiny_mc"]["acc"] is True and res["higher_is_better"]["tiny_ppl"]["bits_per_byte"] is False
    assert set(res["stderr"]["tiny_mc"]["acc"]) == {"student", "teacher"}  # perplexities have none
    ppl = res["tasks"]["tiny_ppl"]
    assert ppl["bits_per_byte"]["student"] != ppl["bits_per_byte"]["teacher"]  # two models, not one twice
    for role in ("student", "teacher"):
        own = lm_eval_own_run(d / role, d / "tasks", batch_size=2)
        for task, metrics in res["tasks"].items():
            for metric, vals in metrics.items():
                # the same computation in the same order: equal up to float rounding
                assert vals[role] == pytest.approx(own[task][f"{metric},none"], rel=1e-6, abs=1e-9), (role, task, metric)


def test_task_dir_limit_and_table(setup):
    d = setup
    r = run("eval", d / "student", "--tasks", d / "tasks", "--limit", 2, "--num-fewshot", 1, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["samples"] == {"tiny_ppl": 2, "tiny_mc": 2} and res["limit"] == 2 and res["num_fewshot"] == 1
    assert set(next(iter(res["tasks"]["tiny_mc"].values()))) == {"model"}
    own = lm_eval_own_run(d / "student", d / "tasks", limit=2, num_fewshot=1, batch_size=8)
    assert res["tasks"]["tiny_mc"]["acc"]["model"] == pytest.approx(own["tiny_mc"]["acc,none"])
    assert res["tasks"]["tiny_ppl"]["bits_per_byte"]["model"] == pytest.approx(own["tiny_ppl"]["bits_per_byte,none"],
                                                                                rel=1e-6)

    r = run("eval", d / "student", "--teacher", d / "teacher", "--tasks", d / "tasks" / "mc.yaml", "--limit", 3)
    assert r.exit_code == 0, r.output
    assert "student - teacher" in r.stdout and "limit 3" in r.stdout
    assert "acc ↑" in r.stdout and "acc_norm ↑" in r.stdout and "tiny_ppl" not in r.stdout


def test_resolve_tasks(setup):
    d = setup
    spec = resolve_tasks(f"{d / 'tasks'},hellaswag, {d / 'tasks' / 'mc.yaml'}")
    # the directory's two tasks (the template has none), the name, the YAML once
    assert spec.names == ["tiny_mc", "tiny_ppl", "hellaswag"]
    assert spec.include_paths == [str((d / "tasks").resolve())] and spec.registered == ["hellaswag"]
    with pytest.raises(GPConvError, match="does not exist"):
        resolve_tasks(str(d / "nope.yaml"))
    with pytest.raises(GPConvError, match="defines no lm-eval task"):
        resolve_tasks(str(d / "tasks" / "_template.yaml"))
    with pytest.raises(GPConvError, match="names no task"):
        resolve_tasks(" , ")


def test_needs_a_transformers_model_and_a_tokenizer(setup):
    mc = str(setup / "tasks" / "mc.yaml")
    with pytest.raises(GPConvError, match="need a transformers model; m .TinyMLPLM. has no"):
        evaluate_tasks({"m": TinyMLPLM()}, byte_tokenizer(), mc)
    model, _ = tiny_phi3(**SMALL)
    with pytest.raises(GPConvError, match="need a tokenizer"):
        evaluate_tasks({"m": model}, None, mc)


def test_without_lm_eval_one_line(setup, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed: importing it raises ImportError
    r = run("eval", setup / "student", "--tasks", setup / "tasks")
    assert r.exit_code == 2 and "pip install 'gpconv[eval]'" in r.output and "Traceback" not in r.output, r.output


@pytest.mark.parametrize("args, message", [
    ((), "either --data"),
    (("--data", "x.json", "--tasks", "t.yaml"), "either --data"),
    (("--data", "x.json", "--limit", 2), "--limit and --num-fewshot apply to --tasks"),
    (("--tasks", "nope.yaml"), "task YAML nope.yaml does not exist"),
    (("--tasks", "TASKDIR/mc.yaml", "--max-batches", 1), "--max-batches applies to --data"),
])
def test_user_errors(setup, args, message):
    args = [str(a).replace("TASKDIR", str(setup / "tasks")) for a in args]
    r = run("eval", setup / "student", *args)
    assert r.exit_code == 2 and message in r.output, r.output
    assert "Traceback" not in r.output


def test_bad_task_data_is_one_line(setup, tmp_path):
    (tmp_path / "bad.yaml").write_text(PPL_YAML.format(dir=tmp_path).replace("task: tiny_ppl", "task: tiny_missing"))
    r = run("eval", setup / "student", "--tasks", tmp_path / "bad.yaml")
    assert r.exit_code == 2 and "cannot load lm-eval task(s) tiny_missing" in r.output, r.output
    assert "Traceback" not in r.output


@pytest.mark.slow  # lm-eval indexes its own registry of thousands of task YAMLs (~17 s) to look a name up
def test_unknown_task_name(setup):
    r = run("eval", setup / "student", "--tasks", "no_such_task_xyz")
    assert r.exit_code == 2 and "unknown lm-eval task(s): no_such_task_xyz" in r.output, r.output
