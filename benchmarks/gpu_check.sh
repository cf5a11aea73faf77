#!/usr/bin/env bash
# The GPU check: everything gpconv measures on one GPU, in at most 10 minutes, in at most 8 files
# under ${OUT:-gpu-check}. Prepare its inputs first (benchmarks/gpu_prepare.sh says how they reach
# the GPU machine), then on the GPU machine:
#
#   bash benchmarks/gpu_check.sh
#
# 1. CUDA tests: tests/test_cuda.py (blocks == dense == CPU path on CUDA, the Triton and grouped_mm
#    paths == the bmm path, forward and gradients, save/load, bf16 training) and tests/test_ops.py.
# 2. benchmarks/bench_block.py, bf16, Phi-3-mini's four shapes at 1,024 / 4,096 / 8,192 tokens:
#    time and time/parameter ratios against the dense layer, forward and forward+backward, of the
#    block on the Triton kernels and (--no-triton) on grouped_mm.
# 3. A Phi-3-mini-shaped 4-layer model (random weights, built here), shrunk on the GPU to ~25% of
#    its decoder parameters: gpconv bench prefill / decode against its dense original, with the
#    dynamic cache and with the static cache + CUDA graphs; the surgery's time, and the time of a
#    hybrid fit (--init fit --permute --sequential) of the same model.
# 4. Recovery at a real budget: SmolLM2-135M-Instruct at 25% of its non-embedding parameters,
#    hybrid (split + permutation) against whitened SVD and depth pruning, each distilled for the
#    same 4.1M tokens (500 steps x 64 x 128), evaluated on the held-out sets of docs/results.md.
#
# Files: gpu_check.log, bench_block_bf16.json, bench_phi3mini4l.json, bench_phi3mini4l_static.json,
# surgery_times.json, recovery_hybrid-permute.json, recovery_svd.json, recovery_depth.json.
#
# SMOKE=1 runs every step on the CPU with tiny sizes and a tiny random teacher (what
# tests/test_gpu_check.py runs: the script stays runnable without a GPU); INPUTS=DIR points at the
# prepared inputs (default: .gpu/p2 and /root/gpconv-inputs).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
START=$SECONDS
say() { echo "== [$((SECONDS - START)) s] $*" | tee -a "$LOG"; }
# The whole check must end inside one 10-minute device call: every step's own time limit is also
# cut to what is left of BUDGET seconds (the last steps get less when the first ones run long).
cap() { local left=$((BUDGET - (SECONDS - START))); [ "$left" -lt 5 ] && left=5; echo $(( $1 < left ? $1 : left )); }

if [ "${SMOKE:-0}" = 1 ]; then
  DEVICE=cpu; DTYPE=float32; TOKENS="32"; REPS=1; STEPS=2; BATCH=2; EVAL_EVERY=1; EVAL_BLOCKS=2; CALIB=4
  PHI3='{"hidden_size": 128, "intermediate_size": 384, "num_attention_heads": 4, "num_key_value_heads": 4,
         "vocab_size": 512, "num_hidden_layers": 4}'
  PROMPT=16; NEW=4; MODEL=/tmp/gpu-check-smoke-teacher; MCPG_PHI3=16; LIMIT=300; BUDGET=${BUDGET:-100000}
  ALPACA=${ALPACA:?SMOKE needs ALPACA=file}; WIKI=${WIKI:?SMOKE needs WIKI=file}
  PY=${PY:-python3}
  rm -rf "$MODEL" && $PY - "$MODEL" <<'EOF'
import sys
from transformers import LlamaConfig
from gpconv.hub import byte_tokenizer
LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, pad_token_id=261, eos_token_id=256).save_pretrained(sys.argv[1])
byte_tokenizer().save_pretrained(sys.argv[1])  # a config-only directory: random weights, a tokenizer
EOF
else
  DEVICE=cuda; DTYPE=bfloat16; TOKENS="1024 4096 8192"; REPS=7; STEPS=500; BATCH=64; EVAL_EVERY=50; EVAL_BLOCKS=16
  CALIB=32; PROMPT=1024; NEW=128; MCPG_PHI3=256; LIMIT=330; BUDGET=${BUDGET:-570}
  PHI3='{"hidden_size": 3072, "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 32,
         "vocab_size": 32064, "num_hidden_layers": 4}'
  P2=${INPUTS:-.gpu/p2}; P1=${INPUTS_P1:-/root/gpconv-inputs}
  if ! ls "$P1"/smollm2.gguf.part-00 >/dev/null 2>&1; then
    echo "gpu_check: $P1/smollm2.gguf.part-00 is missing: run the first transfer call of benchmarks/gpu_prepare.sh again" | tee -a "$LOG"
    exit 2
  fi
  cat "$P1"/smollm2.gguf.part-* "$P2"/smollm2.gguf.part-* > /tmp/smollm2.gguf
  if [ "$(sha256sum /tmp/smollm2.gguf | cut -d' ' -f1)" != "$(cat "$P2/smollm2.gguf.sha256")" ]; then
    echo "gpu_check: the joined GGUF's sha256 differs from the prepared one" | tee -a "$LOG"; exit 2
  fi
  MODEL=/tmp/smollm2.gguf; ALPACA=$P2/alpaca_5000_subset.json; WIKI=$P2/wikitext2_valid_pytorch_examples.txt
  mkdir -p .whl && cp "$P2"/whl/*.whl .whl/ 2>/dev/null
  source benchmarks/gpu_setup.sh
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; } >> "$LOG" 2>&1
fi
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
 torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" 2>&1 | tee -a "$LOG"

say "1. tests (CUDA ones skip without a GPU)"
# one tile config per Triton kernel here (a compile each, not one per config); step 2 autotunes
GPCONV_TRITON_AUTOTUNE=0 timeout $(cap 120) $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_ops.py 2>&1 | tail -15 >> "$LOG"

say "2. bench_block $DTYPE, Phi-3-mini shapes, tokens $TOKENS"
timeout $(cap 180) $PY benchmarks/bench_block.py --device $DEVICE --dtype $DTYPE --tokens $TOKENS --reps $REPS --no-triton \
  $([ "${SMOKE:-0}" = 1 ] && echo "--layers o_proj") --json "$OUT/bench_block_bf16.json" >> "$LOG" 2>&1

say "3. a Phi-3-mini-shaped 4-layer model, random weights, shrunk to ~25% on $DEVICE"
rm -rf /tmp/phi3-4l /tmp/phi3-4l-kphi3 /tmp/phi3-4l-hybrid
$PY - "$PHI3" <<'EOF' >> "$LOG" 2>&1
import json, sys
from transformers import Phi3Config
from gpconv.hub import byte_tokenizer
Phi3Config(**json.loads(sys.argv[1]), max_position_embeddings=4096, original_max_position_embeddings=4096,
           pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False).save_pretrained("/tmp/phi3-4l")
byte_tokenizer().save_pretrained("/tmp/phi3-4l")  # calibration text for the hybrid fit (its ids fit any vocabulary)
EOF
t0=$SECONDS
timeout $(cap 120) $PY -m gpconv_cli shrink /tmp/phi3-4l --out /tmp/phi3-4l-kphi3 --target-params 0.25 -m $MCPG_PHI3 --dtype $DTYPE \
  --device $DEVICE --json > /tmp/phi3-4l-report.json 2>> "$LOG"
t_shrink=$((SECONDS - t0))
for mode in dynamic static; do
  f="$OUT/bench_phi3mini4l.json"; extra=""
  [ $mode = static ] && { f="$OUT/bench_phi3mini4l_static.json"; extra="--static-cache"; }
  timeout $(cap 150) $PY -m gpconv_cli bench /tmp/phi3-4l-kphi3 --device $DEVICE --dtype $DTYPE --prompt-len $PROMPT \
    --new-tokens $NEW --repeats 3 --no-memory $extra --json > "$f" 2>> "$LOG"
  [ -s "$f" ] && $PY -c "import json; r = json.load(open('$f'))['ratios']; print('$mode', {k: round(v, 3) for k, v in r.items()})" >> "$LOG" 2>&1
done
t0=$SECONDS
timeout $(cap 150) $PY -m gpconv_cli shrink /tmp/phi3-4l --out /tmp/phi3-4l-hybrid -m $MCPG_PHI3 --variant hybrid --init fit --permute \
  --sequential --calibration-data "$ALPACA" --calibration-blocks 16 --calibration-block-size 128 --dtype float32 \
  --device $DEVICE --json > /dev/null 2>> "$LOG"
rc_hybrid=$?
t_hybrid=$((SECONDS - t0))

say "4. recovery at 25%: hybrid-permute, svd, depth, $STEPS steps x $BATCH x 128 tokens each, side by side"
for m in hybrid-permute svd depth; do
  rm -rf "/tmp/rec-$m"
  timeout "$(cap $LIMIT)" $PY benchmarks/compare.py --model "$MODEL" --alpaca "$ALPACA" --wikitext "$WIKI" --device $DEVICE \
    --fractions 0.25 --methods $m --steps $STEPS --batch-size $BATCH --lr 1e-3 --block-size 128 --eval-blocks $EVAL_BLOCKS \
    --calib-blocks $CALIB --eval-every $EVAL_EVERY --out "/tmp/rec-$m" > "/tmp/rec-$m.log" 2>&1 &
done
wait
for m in hybrid-permute svd depth; do
  echo "-- compare $m" >> "$LOG"; tail -25 "/tmp/rec-$m.log" >> "$LOG"
  cp "/tmp/rec-$m/results.json" "$OUT/recovery_$m.json" 2>> "$LOG"
done
$PY - "$OUT" "$t_shrink" "$t_hybrid" "$rc_hybrid" <<'EOF' >> "$LOG" 2>&1
import json, sys
from pathlib import Path
out, t_shrink, t_hybrid, rc = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
times = {"phi3mini4l_target025_random_s": t_shrink,
         "phi3mini4l_hybrid_fit_permute_sequential_s": t_hybrid if rc == 0 else f"failed or timed out (rc {rc})"}
for f in out.glob("recovery_*.json"):  # compare.py records each student's surgery time
    for key, row in json.loads(f.read_text()).items():
        if not key.startswith("_") and isinstance(row, dict) and "surgery_s" in row:
            times[f"recovery_{key}_surgery_s"] = row["surgery_s"]
(out / "surgery_times.json").write_text(json.dumps(times, indent=1) + "\n")
print("surgery times", times)
EOF
say "done; files:"; ls -la "$OUT" | tee -a "$LOG"
