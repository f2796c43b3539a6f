#!/usr/bin/env bash
# What a first compression in a fresh process pays for that a second does not: random SmolLM2-shaped
# weights, 30 layers, each line a fresh process with only the named parts of the CUDA stack warmed.
# Usage: bash benchmarks/warmup_probe.sh   (on a GPU machine, repository root)
set -euo pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
probe="python3 benchmarks/profile_layer.py random-smollm2 --layers 30 --runs cold"
$probe --prewarm cublas,cusolver,alloc 2>&1 | grep '^{' | sed 's/^/kernels-compiled-here: /'
for parts in none cublas cusolver cublas,cusolver alloc cublas,cusolver,alloc; do
  $probe --prewarm "$parts" 2>&1 | grep '^{'
done
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True $probe --prewarm none 2>&1 | grep '^{' | sed 's/^/expandable-segments: /'
