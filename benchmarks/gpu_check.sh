#!/usr/bin/env bash
# The GPU checks of issue 4 as one short script (about 5 minutes on one H100/H200), for a session
# that has a GPU machine. Writes logs and JSON under ${OUT:-gpu-check}. Prepared on a CPU-only
# machine: it has not run on a GPU yet.
#
#   bash benchmarks/gpu_check.sh            # then read $OUT/*.log and $OUT/*.json
#
# 1. tests/test_cuda.py: blocks == dense == CPU path on CUDA (fp32), the bf16 grouped_mm path ==
#    the bmm path (forward and grads), save/load from the GPU, bf16 training lowers the loss.
# 2. benchmarks/bench_block.py on CUDA in bf16 and fp32 (Phi-3-mini's four shapes, 1 / 1024 / 8192
#    tokens, with the bare-GEMM floor).
# 3. gpconv bench on CUDA (bf16): the demo model shrunk vs dense, prefill/decode tokens/s and
#    peak memory.
set -u -o pipefail
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
# the GPU machine has torch, transformers, accelerate, typer and setuptools but no network:
# install this tree without dependencies or build isolation
$PY -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
$PY -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/env.log"

timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log"

for dt in bfloat16 float32; do
  timeout 240 $PY benchmarks/bench_block.py --device cuda --dtype $dt --tokens 1 1024 8192 --reps 7 --floor \
    --json "$OUT/bench_block_cuda_$dt.json" 2>&1 | tee "$OUT/bench_block_cuda_$dt.log"
done

rm -rf /tmp/gpconv-tiny-shrunk
timeout 120 $PY -m gpconv_cli shrink tiny-phi3 --out /tmp/gpconv-tiny-shrunk -m 64 > "$OUT/shrink.log" 2>&1
timeout 180 $PY -m gpconv_cli bench /tmp/gpconv-tiny-shrunk --device cuda --dtype bfloat16 --batch 8 \
  --prompt-len 512 --new-tokens 64 --repeats 5 2>&1 | tee "$OUT/bench_tiny_cuda.log"
