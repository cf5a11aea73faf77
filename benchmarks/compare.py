"""Quality per parameter on a real pretrained model: gpconv against low-rank, depth pruning and
training from scratch, at the same size, the same recovery budget, the same teacher and data.

    python benchmarks/compare.py --fractions 0.5 0.25 --steps 120 --out benchmarks/results/recovery

For every target fraction of the non-embedding parameters and every method it builds a student
from the teacher (SmolLM2-135M-Instruct from the offline GGUF by default), measures held-out
perplexity right after surgery, distils it for ``--steps`` steps (KL to the teacher; the new
blocks train, or every weight for methods that add none), measuring perplexity every
``--eval-every`` steps, and writes ``results.json``, ``results.md`` and one PNG per fraction.

Methods (``--methods``):
  random   gpconv io block, uniform groups (g = 2 / fraction), the paper's random init
  project  the same block, closest to the dense weights (Frobenius)
  fit      the same block, fitted on calibration data, layer by layer on the shrunk prefix,
           matching the dense model's outputs (sequential, corrected)
  hybrid   every layer gets the io block's budget, split between a grouped and a low-rank part
           by held-out error (all grouped, all low-rank, or a mix), fitted as `fit`
  hybrid-permute  as hybrid, with grouped options also tried under gpconv's channel permutation
  hybrid-fixed  every layer: an io block with 64 groups (2/64 of the layer) plus low-rank for the
           rest of the budget, fitted as `fit` (a grouped share the error-based split would not pick)
  svd      activation-aware (whitened) truncated SVD, uniform rank fraction, fitted as `fit`
  svd-budget  the same SVD, ranks chosen per layer by gpconv's budget solver (--target-params)
  hybrid-budget  the budget solver sizes each layer, the hybrid split (with permutation) spends it
  depth    depth pruning: keep the decoder layers that change the hidden state most (all weights train)
  depth-svd  both: keep round(sqrt(fraction) * layers) layers as `depth` does, and give them whitened
           SVD at the rank fraction that lands on the target, fitted as `fit` (all weights train)
  scratch  the io student's shape with every weight random (all weights train)

Data (``../shared/data``, read by the script, not by the tests): Alpaca rows 0-999 calibrate,
rows 1000-4499 train, rows 4500-4999 evaluate (chat template); WikiText-2 validation text is a
second held-out set (raw text).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

import gpconv
from gpconv import GPConvConfig, shrink
from gpconv.surgery import Calibration, count_parameters
from gpconv.data import Rows, build_datasets, load_rows

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
METHODS = ("random", "project", "fit", "hybrid", "hybrid-permute", "hybrid-fixed", "svd", "svd-budget", "hybrid-budget", "depth", "depth-svd",
           "scratch")


def io_uniform(fraction: float, hidden: int, intermediate: int, **kw) -> GPConvConfig:
    """io blocks with the same group count g = 2 / fraction in every layer."""
    g = round(2 / fraction)
    return GPConvConfig(min_channels_per_group=hidden // g,
                        min_channels_per_group_overrides={"down_proj": intermediate // g}, **kw)


def build_student(method, teacher, fraction, calib_batches, ridge, refine_steps=0, refine_lr=1e-4):
    """The student of ``method`` at ``fraction`` of the teacher's non-embedding parameters.
    ``refine_steps``: decoder-layer refinement after the closed-form fits (methods that fit)."""
    cfg = teacher.config
    h, i = cfg.hidden_size, cfg.intermediate_size
    student = copy.deepcopy(teacher)
    seq = Calibration(calib_batches, sequential=True, refine_steps=refine_steps, refine_lr=refine_lr)
    if method == "random":
        return student, shrink(student, io_uniform(fraction, h, i, init="random")), "grouped"
    if method == "project":
        return student, shrink(student, io_uniform(fraction, h, i, init="project")), "grouped"
    if method == "fit":
        return student, shrink(student, io_uniform(fraction, h, i, init="fit", ridge=ridge), calibration=seq), "grouped"
    if method == "hybrid":  # every layer the io block's budget, split grouped / low-rank by error
        rep = shrink(student, io_uniform(fraction, h, i, variant="hybrid", init="fit", ridge=ridge), calibration=seq)
        return student, rep, "grouped"
    if method == "hybrid-permute":  # the same split, grouped options also tried with the channel permutation
        rep = shrink(student, io_uniform(fraction, h, i, variant="hybrid", init="fit", ridge=ridge, permute=True),
                     calibration=seq)
        return student, rep, "grouped"
    if method == "hybrid-fixed":  # a fixed small grouped share (g = 64: 2/64 of each layer), the rest low-rank
        g = 64
        rep = shrink(student, io_uniform(2 / g, h, i, variant="hybrid", rank=fraction - 2 / g, init="fit", ridge=ridge),
                     calibration=seq)
        return student, rep, "grouped"
    if method == "svd":
        rep = shrink(student, GPConvConfig(variant="lowrank", rank=fraction, init="fit", ridge=ridge), calibration=seq)
        return student, rep, "grouped"
    if method == "svd-budget":
        rep = shrink(student, GPConvConfig(variant="lowrank", init="fit", target_params=fraction,
                                           min_channels_per_group=16, ridge=ridge), calibration=seq)
        return student, rep, "grouped"
    if method == "hybrid-budget":  # the budget solver picks each layer's size, best_split divides it
        rep = shrink(student, GPConvConfig(variant="hybrid", init="fit", target_params=fraction, permute=True,
                                           min_channels_per_group=16, ridge=ridge), calibration=seq)
        return student, rep, "grouped"
    if method == "depth":
        n = max(1, round(fraction * cfg.num_hidden_layers))
        rep = shrink(student, GPConvConfig(num_layers=n, layer_selection="importance", target_modules=["none"]),
                     calibration=Calibration(calib_batches))
        return student, rep, "all"
    if method == "depth-svd":  # half the reduction (in log terms) from depth, half from whitened SVD
        n = max(1, round(math.sqrt(fraction) * cfg.num_hidden_layers))
        rank = fraction * cfg.num_hidden_layers / n
        rep = shrink(student, GPConvConfig(num_layers=n, layer_selection="importance", variant="lowrank", rank=rank,
                                           init="fit", ridge=ridge), calibration=seq)
        return student, rep, "all"
    if method == "scratch":
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        fresh = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), dtype=torch.float32)
        return fresh, shrink(fresh, io_uniform(fraction, h, i, init="random")), "all"
    raise SystemExit(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def load_data(tok, block_size: int, eval_blocks: int, calib_blocks: int,
              alpaca_path: str = str(SHARED / "alpaca_5000_subset.json"),
              wikitext_path: str = str(SHARED / "wikitext2_valid_pytorch_examples.txt")) -> dict:
    """The fixed split every method sees: calibration, training and two held-out sets."""
    alpaca = load_rows(alpaca_path)
    part = lambda a, b: Rows(alpaca.rows[a:b], alpaca.schema, alpaca.name)  # noqa: E731
    kw = dict(format="chat-template", block_size=block_size, val_size=0)
    calib, _ = build_datasets(part(0, 1000), tok, **kw)
    train, _ = build_datasets(part(1000, 4500), tok, **kw)
    held, _ = build_datasets(part(4500, 5000), tok, **kw)
    wiki, _ = build_datasets(wikitext_path, tok, format="plain", block_size=block_size, val_size=0)
    n = eval_blocks
    sets = {"alpaca": gpconv.data.TokenBlocks(held.input_ids[:n], held.labels[:n]),
            "wikitext": gpconv.data.TokenBlocks(wiki.input_ids[:n], wiki.labels[:n])}
    cb = calib.input_ids[:calib_blocks]
    return {"sets": sets, "train": train, "calib_batches": [cb[i:i + 4] for i in range(0, len(cb), 4)]}


def perplexities(model, sets: dict) -> dict:
    return {name: gpconv.evaluate(model, blocks, batch_size=4)["perplexity"] for name, blocks in sets.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--alpaca", default=str(SHARED / "alpaca_5000_subset.json"))
    ap.add_argument("--wikitext", default=str(SHARED / "wikitext2_valid_pytorch_examples.txt"))
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--grouped-lr-scale", type=float, default=1.0,
                    help="lr multiplier for the grouped weights of the blocks (TrainConfig.grouped_lr_scale; 0: frozen)")
    ap.add_argument("--seed", type=int, default=0, help="training seed: the order of the recovery batches")
    ap.add_argument("--train-all", action="store_true",
                    help="every method trains all weights (default: only the new blocks where a method adds some)")
    ap.add_argument("--eval-every", type=int, default=30)
    ap.add_argument("--eval-blocks", type=int, default=16)
    ap.add_argument("--calib-blocks", type=int, default=32)
    ap.add_argument("--ridge", type=float, default=0.1)
    ap.add_argument("--refine-steps", type=int, default=0,
                    help="Adam steps per decoder layer after the closed-form fit (methods fit, hybrid*, svd*)")
    ap.add_argument("--refine-lr", type=float, default=1e-4)
    ap.add_argument("--hidden-weight", type=float, default=0.0,
                    help="add the relative hidden-state error to the recovery loss with this weight (KL keeps weight 1)")
    ap.add_argument("--teacher-top-k", type=int, default=0,
                    help="distil on the teacher's top-k tokens + a rest bucket, cached per block and shared by every "
                         "method of this run (0: the exact KL, the teacher run on every block)")
    ap.add_argument("--teacher-cache", default=None, metavar="DIR",
                    help="with --teacher-top-k: read the cache from DIR if it is there, and write it back after each method")
    ap.add_argument("--tag", default="", help="suffix of the result keys (e.g. '+refine'), to merge variants of a method")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu",
                    help="where the teacher, surgery and evaluation run (cuda: training uses bf16 autocast, gpconv's default there)")
    ap.add_argument("--save-students", default=None, metavar="DIR",
                    help="save each student right after surgery to DIR/<method>@<fraction> (a gpconv checkpoint)")
    ap.add_argument("--students", default=None, metavar="DIR",
                    help="take each student from DIR/<method>@<fraction> (saved by --save-students) instead of "
                         "running the surgery: surgery on one machine, recovery on another. Tensors the checkpoint "
                         "lacks (an embedding left out to move less data) are the teacher's")
    ap.add_argument("--out", default="benchmarks/results/recovery")
    ap.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                    help="only merge the results.json of runs made in parallel (one per fraction) into --out")
    args = ap.parse_args()
    if args.merge:
        merge(args.merge, Path(args.out))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result_file = out / "results.json"
    results = json.loads(result_file.read_text()) if result_file.is_file() else {}

    teacher, tok = gpconv.load_model(args.model)
    teacher.requires_grad_(False).to(args.device)
    data = load_data(tok, args.block_size, args.eval_blocks, args.calib_blocks, args.alpaca, args.wikitext)
    sets, train, calib_batches = data["sets"], data["train"], data["calib_batches"]
    teacher_ppl = perplexities(teacher, sets)
    source = teacher  # what distillation reads the teacher from
    if args.teacher_top_k:
        cache_dir = Path(args.teacher_cache) if args.teacher_cache else None
        if cache_dir is not None and cache_dir.exists():
            source = gpconv.TeacherCache.load(cache_dir, teacher=teacher)
            if source.top_k != args.teacher_top_k:
                sys.exit(f"--teacher-top-k {args.teacher_top_k}, but {cache_dir} keeps the top {source.top_k}")
        else:
            source = gpconv.TeacherCache(teacher, top_k=args.teacher_top_k)
    base = count_parameters(teacher)
    print(f"teacher: {base.non_embedding:,} non-embedding params, ppl {teacher_ppl}", flush=True)
    results["_meta"] = {
        "model": args.model, "teacher_perplexity": teacher_ppl, "teacher_non_embedding": base.non_embedding,
        "command": "python " + " ".join(sys.argv), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads"
        + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""),
        "train_blocks": len(train), "tokens_per_step": args.batch_size * args.block_size,
    }

    for fraction in args.fractions:
        for method in args.methods:
            key = f"{method}{args.tag}@{fraction}"
            t0 = time.time()
            torch.manual_seed(0)  # `random` draws its init here: the same draws whatever ran before
            if args.students:
                student, report, mode, surgery_s = load_student(Path(args.students) / key, teacher, args.device)
            else:
                student, report, mode = build_student(method, teacher, fraction, calib_batches, args.ridge,
                                                      args.refine_steps, args.refine_lr)
                surgery_s = time.time() - t0
                if args.save_students:
                    save_student(Path(args.save_students) / key, student, report, mode, surgery_s, tok)
            mode = "all" if args.train_all else mode
            after = perplexities(student, sets)
            curve = [{"step": 0, "tokens": 0, **after}]
            print(f"{key}: kept {report.kept_fraction:.3f}, after surgery {after} ({surgery_s:.0f}s)", flush=True)

            def record(res=None, done=False):
                """This method's row; written after every evaluation too, so that a run stopped
                early (a time limit) keeps the curve so far, marked ``complete: false``."""
                results[key] = {
                    "method": method, "tag": args.tag, "refine_steps": args.refine_steps,
                    "hidden_weight": args.hidden_weight, "grouped_lr_scale": args.grouped_lr_scale,
                    "teacher_top_k": args.teacher_top_k,
                    "train_s": res and res.train_s, "teacher_s": res and res.teacher_s,
                    "fraction": fraction, "non_embedding": report.after.non_embedding,
                    "kept_fraction": report.kept_fraction, "trained": mode, "surgery_s": surgery_s,
                    "variants": _variant_counts(report), "recovery_s": time.time() - t1, "complete": done,
                    "after_surgery": after, "after_recovery": curve[-1], "curve": curve,
                }
                result_file.write_text(json.dumps(results, indent=1))

            def every(step, row, student=student, curve=curve):
                if step % args.eval_every == 0 or step == args.steps:
                    curve.append({"step": step, "tokens": step * args.batch_size * args.block_size,
                                  **perplexities(student, sets)})
                    print(f"  {key} step {step}: {curve[-1]}", flush=True)
                    record()

            cfg = gpconv.TrainConfig(max_steps=max(args.steps, 1), batch_size=args.batch_size, lr=args.lr, train=mode,
                                     warmup_ratio=0.05, save_every=0, progress=False, seed=args.seed,
                                     hidden_weight=args.hidden_weight, grouped_lr_scale=args.grouped_lr_scale)
            t1 = time.time()
            res = None
            if args.steps > 0:  # --steps 0 measures surgery alone
                res = gpconv.distill(student, source, train, cfg, callbacks=[every])
                if args.teacher_top_k and args.teacher_cache:
                    source.save(args.teacher_cache)
            record(res, done=True)
            del student
    write_outputs(results, out)


def save_student(path: Path, student, report, mode: str, surgery_s: float, tok) -> None:
    """The student as a gpconv checkpoint, plus what its result row needs and the weights do not
    tell (what trains, how long the surgery took)."""
    gpconv.save_pretrained(student, path, tok, overwrite=True)
    (path / "student.json").write_text(json.dumps({"mode": mode, "surgery_s": surgery_s}, indent=1))


def load_student(path: Path, teacher, device: str):
    """A student saved by :func:`save_student` (fp32 on ``device``) and its report (its blocks and
    counts against the teacher's). Tensors its safetensors lack are copied from the teacher, which
    surgery never changes outside the replaced layers."""
    from safetensors import safe_open

    from gpconv.surgery import describe

    from gpconv.hub import weight_files as _weight_files, load_meta, load_state_

    if not (path / "student.json").is_file():
        sys.exit(f"--students: no saved student at {path}")
    info = json.loads((path / "student.json").read_text())
    model = load_meta(path)
    files = _weight_files(path)
    stored = set()
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            stored.update(fh.keys())
    own = teacher.state_dict()
    fill = {k: own[k].detach().to("cpu", torch.float32).clone() for k in model.state_dict() if k not in stored}
    model.load_state_dict(fill, strict=False, assign=True)
    load_state_(model, files, torch.float32)
    now = describe(model, str(path))
    report = gpconv.ShrinkReport(now.model, {}, count_parameters(teacher), now.after, now.modules)
    return model.to(device).train(), report, info["mode"], info["surgery_s"]


def merge(dirs: list[str], out: Path) -> None:
    """One results.json (+ table and plots) from runs of this script with different --out."""
    merged: dict = {}
    commands = []
    for d in dirs:
        part = json.loads((Path(d) / "results.json").read_text())
        commands.append(part["_meta"]["command"])
        merged.update(part)
    merged["_meta"] = dict(merged["_meta"], command=" && ".join(commands))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(merged, indent=1))
    write_outputs(merged, out)


def _variant_counts(report) -> dict:
    """How many replaced layers got each kind of block (e.g. how often the hybrid split chose a mix);
    in a loaded student's report (:func:`load_student`) those layers are "already" converted."""
    counts: dict[str, int] = {}
    for m in report.modules:
        if m.status in ("replaced", "already"):
            counts[m.variant] = counts.get(m.variant, 0) + 1
    return counts


def write_outputs(results: dict, out: Path) -> None:
    """results.md (table) and one PNG of perplexity against recovery tokens per fraction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = results["_meta"]
    rows = [r for k, r in results.items() if not k.startswith("_")]
    lines = [
        f"Teacher {meta['model']}: {meta['teacher_non_embedding']:,} non-embedding parameters, perplexity "
        f"alpaca {meta['teacher_perplexity']['alpaca']:.2f} / wikitext {meta['teacher_perplexity']['wikitext']:.2f}.",
        "",
        "| fraction | method | non-emb params | kept | trained | ppl after surgery (alpaca / wikitext) | "
        "ppl after recovery (alpaca / wikitext) | recovery tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (-r["fraction"], METHODS.index(r["method"]), r.get("tag", ""))):
        a, b = r["after_surgery"], r["after_recovery"]
        lines.append(
            f"| {r['fraction']} | {r['method']}{r.get('tag', '')} | {r['non_embedding']:,} | {100 * r['kept_fraction']:.1f}% | "
            f"{r['trained']} | {_fmt(a['alpaca'])} / {_fmt(a['wikitext'])} | {_fmt(b['alpaca'])} / "
            f"{_fmt(b['wikitext'])} | {b['tokens']:,}{' (stopped early)' if r.get('complete') is False else ''} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    for fraction in sorted({r["fraction"] for r in rows}, reverse=True):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, name in zip(axes, ("alpaca", "wikitext")):
            for r in sorted((r for r in rows if r["fraction"] == fraction),
                            key=lambda r: (METHODS.index(r["method"]), r.get("tag", ""))):
                xs = [c["tokens"] for c in r["curve"]]
                ax.plot(xs, [c[name] for c in r["curve"]], marker="o", ms=3, label=r["method"] + r.get("tag", ""))
            ax.axhline(meta["teacher_perplexity"][name], color="k", ls="--", lw=1, label="teacher")
            ax.set_yscale("log")
            ax.set_xlabel("recovery tokens")
            ax.set_ylabel(f"{name} perplexity")
            ax.set_title(f"{int(round(100 * fraction))}% of non-embedding params")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"compare_{int(round(100 * fraction))}.png", dpi=110)
        plt.close(fig)


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.2f}"


if __name__ == "__main__":
    main()
