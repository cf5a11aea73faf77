#!/usr/bin/env bash
# The GPU checks of issue 4 as one short script (91 s on an H200, 2026-11-30), for a session
# that has a GPU machine. Writes gpu_check.log and three JSON files under ${OUT:-gpu-check}.
#
#   bash benchmarks/gpu_check.sh
#
# 1. tests/test_cuda.py: blocks == dense == CPU path on CUDA (fp32), the bf16 grouped_mm path ==
#    the bmm path (forward and grads), save/load from the GPU, bf16 training lowers the loss, the
#    calibrated hybrid surgery on the GPU picks the same blocks as on the CPU.
# 2. benchmarks/bench_block.py on CUDA in bf16 and fp32 (Phi-3-mini's four shapes, with the
#    bare-GEMM floor).
# 3. gpconv bench on CUDA (bf16): the demo model shrunk vs dense, prefill/decode tokens/s and
#    peak memory.
set -u -o pipefail
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
source benchmarks/gpu_setup.sh
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
  nproc; } 2>&1 | tee "$LOG"

echo "== tests/test_cuda.py" | tee -a "$LOG"
timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -25 | tee -a "$LOG"

for spec in "bfloat16 1 1024 8192" "float32 1 1024 8192"; do
  set -- $spec
  dt=$1; shift
  echo "== bench_block cuda $dt" | tee -a "$LOG"
  timeout 150 $PY benchmarks/bench_block.py --device cuda --dtype $dt --tokens "$@" --reps 7 --floor \
    --json "$OUT/bench_block_cuda_$dt.json" 2>&1 | tee -a "$LOG"
done

echo "== gpconv bench tiny-phi3 -m 64, cuda bf16" | tee -a "$LOG"
rm -rf /tmp/gpconv-tiny-shrunk
timeout 120 $PY -m gpconv_cli shrink tiny-phi3 --out /tmp/gpconv-tiny-shrunk -m 64 >> "$LOG" 2>&1
timeout 180 $PY -m gpconv_cli bench /tmp/gpconv-tiny-shrunk --device cuda --dtype bfloat16 --batch 8 \
  --prompt-len 512 --new-tokens 64 --repeats 5 --json > "$OUT/bench_tiny_cuda.json" 2>> "$LOG"
cat "$OUT/bench_tiny_cuda.json" | tee -a "$LOG"
