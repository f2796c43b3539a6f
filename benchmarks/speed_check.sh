#!/usr/bin/env bash
# Issue 6 on the real model, in one device call:
#  1) a fresh process with Triton's cache emptied (a first run on a machine compiles the kernels):
#     the fast path, then (unless FAST_ONLY=1) the straightforward path;
#  2) a second process (kernels cached on disk): the fast path twice (the second also finds its
#     sweep graphs captured);
#  3) the OPT-6.7B shape with random weights: compression time and peak GPU memory.
# Usage: [EVAL=wikitext2] [FAST_ONLY=1] [SKIP_SCALE=1] bash benchmarks/speed_check.sh MODEL.gguf DATA_DIR OUT_DIR
set -euo pipefail
model=$1 data=$2 out=$3
mkdir -p "$out"
export PYTHONUNBUFFERED=1
eval_on=${EVAL:-wikitext2,ptb,c4}
first=budget4-fused$([ "${FAST_ONLY:-0}" = 1 ] || echo ,budget4-plain)
rm -rf "${TRITON_CACHE_DIR:-$HOME/.triton/cache}"
python3 benchmarks/compress_speed.py "$model" --data-dir "$data" --runs "$first" --eval "$eval_on" \
  --jsonl "$out/speed-cold.jsonl" | cut -c1-600
python3 benchmarks/compress_speed.py "$model" --data-dir "$data" --runs budget4-fused,budget4-fused --eval "$eval_on" \
  --jsonl "$out/speed-cached.jsonl" | cut -c1-600
[ "${SKIP_SCALE:-0}" = 1 ] || python3 benchmarks/scale.py --shapes opt-6.7b --jsonl "$out/scale.jsonl"
