#!/usr/bin/env bash
# The GPU recovery run of issue 6 (and the SmolLM2 GPU bench of issue 4) as one script, for a
# session with a GPU machine: gpconv's hybrid split against whitened SVD at 25% of SmolLM2-135M-
# Instruct's non-embedding parameters, distilled on the GPU (bf16 autocast) for far more tokens
# than the CPU runs (benchmarks/compare.py, two processes side by side, one per method).
#
#   GGUF=path/to/SmolLM2-135M-Instruct.Q4_1.gguf DATA=../shared/data bash benchmarks/gpu_recovery.sh
#
# Writes under ${OUT:-gpu-recovery}: recovery.log, bench_smollm2_cuda.json, results_<method>.json.
# STEPS, BATCH, LR and LIMIT (seconds per compare process) can be set from the environment.
#
# Run on an H200 on 2026-11-30 (docs/results.md, "On a GPU"): the svd process finished (surgery
# 12 s, 1,000 steps in 193 s); the hybrid-permute surgery had not finished after 330 s (its
# split makes many small SVD / Cholesky calls, slow on a GPU), so that student was built on the
# CPU instead (`compare.py --save-students`, packed by benchmarks/pack_student.py) and recovered
# on the GPU with `compare.py --students` and the same settings.
set -u -o pipefail
OUT=${OUT:-gpu-recovery}
mkdir -p "$OUT"
LOG="$OUT/recovery.log"
GGUF=${GGUF:?set GGUF to the SmolLM2-135M-Instruct .gguf file}
DATA=${DATA:-../shared/data}
STEPS=${STEPS:-1000}; BATCH=${BATCH:-64}; LR=${LR:-1e-3}; LIMIT=${LIMIT:-420}
source benchmarks/gpu_setup.sh

# the same split and held-out sets as the CPU runs (block 128, 16 eval blocks), bigger batches
COMMON="--model $GGUF --alpaca $DATA/alpaca_5000_subset.json --wikitext $DATA/wikitext2_valid_pytorch_examples.txt
 --device cuda --fractions 0.25 --steps $STEPS --batch-size $BATCH --lr $LR --block-size 128 --eval-blocks 16
 --eval-every $((STEPS / 10))"
for m in svd hybrid-permute; do
  rm -rf "/tmp/rec-$m"
  timeout "$LIMIT" $PY benchmarks/compare.py $COMMON --methods $m --out "/tmp/rec-$m" > "/tmp/rec-$m.log" 2>&1 &
done

# meanwhile the end-to-end speed of SmolLM2 shrunk vs dense on the GPU (bf16); the two recovery
# processes share the GPU, so this bench is also run alone at the end when time allows
echo "== SmolLM2 shrink (kphi3 defaults, --init project)" | tee -a "$LOG"
rm -rf /tmp/smol-kphi3
timeout 120 $PY -m gpconv_cli shrink "$GGUF" --out /tmp/smol-kphi3 --init project >> "$LOG" 2>&1
wait
for m in svd hybrid-permute; do
  echo "== compare $m" >> "$LOG"; cat "/tmp/rec-$m.log" >> "$LOG"
  cp "/tmp/rec-$m/results.json" "$OUT/results_$m.json" 2>/dev/null
done
echo "== gpconv bench SmolLM2 kphi3 vs dense, cuda bf16 (alone on the GPU)" | tee -a "$LOG"
timeout 120 $PY -m gpconv_cli bench /tmp/smol-kphi3 --baseline "$GGUF" --device cuda --dtype bfloat16 --batch 8 \
  --prompt-len 512 --new-tokens 64 --repeats 5 --json > "$OUT/bench_smollm2_cuda.json" 2>> "$LOG"
cat "$OUT/bench_smollm2_cuda.json" >> "$LOG"
tail -40 "$LOG"
