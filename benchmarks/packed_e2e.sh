#!/usr/bin/env bash
# Issue 8 on the real model, in one device call: compress with --save-packed (2:4, dense =
# quantisation only, unstructured 50%; all at 4.0 average bits), check the packed model against the fake-quantised
# one (packed_check.py), and decode 64 greedy tokens with the packed model on the GPU (kernels) and
# on the CPU (dequantised on load): the two texts must match.
# Usage: bash benchmarks/packed_e2e.sh MODEL.gguf DATA_DIR OUT_DIR [CASES]   (CASES: e.g. "2of4 dense")
set -euo pipefail
model=$1 data=$2 out=$3 only=${4:-"2of4 dense unstructured"}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
prompt="The capital of France is"
for case in "2of4:--prunen 2 --prunem 4" "dense:--sparsity 0" "unstructured:--sparsity 0.5"; do
  name=${case%%:*} flags=${case#*:}
  [[ " $only " == *" $name "* ]] || continue
  work=$(mktemp -d)
  # shellcheck disable=SC2086
  python3 -m sparsemix.cli compress "$model" --data-dir "$data" $flags --bit-method budget --target-avg-bits 4.0 \
    --eval wikitext2 --save "$work/r" --save-packed "$work/r/packed" --output "$out/compress-$name.json" --quiet | tail -3
  python3 benchmarks/packed_check.py "$work/r" --data-dir "$data" | tee "$out/packed-check-$name.jsonl"
  for device in cuda cpu; do
    python3 -m sparsemix.cli generate "$work/r" --prompt "$prompt" --max-new-tokens 64 --device $device \
      2>/dev/null | tee "$out/generate-$name-$device.txt"
  done
  if [ "$(head -1 "$out/generate-$name-cuda.txt")" = "$(head -1 "$out/generate-$name-cpu.txt")" ]; then
    echo "$name: same text on cuda and cpu"
  else
    echo "$name: TEXTS DIFFER between cuda and cpu"
  fi
  rm -rf "$work"
done
