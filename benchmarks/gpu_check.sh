#!/usr/bin/env bash
# GPU check on the real model: dense perplexities (must match shared/data/README.md within 0.1%),
# then the README's main job (50% + budget 4.0) and the uniform 4-bit baseline.
# Usage: bash benchmarks/gpu_check.sh MODEL.gguf DATA_DIR OUT_DIR
set -euo pipefail
model=$1 data=$2 out=$3
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m sparsemix.cli eval "$model" --data-dir "$data" --device cuda --output "$out/dense.json" --overwrite --quiet
python3 -m sparsemix.cli compress "$model" --data-dir "$data" --device cuda --sparsity 0.5 \
  --bit-method budget --target-avg-bits 4.0 --output "$out/budget4.json" --overwrite --quiet | tail -n 12
python3 -m sparsemix.cli compress "$model" --data-dir "$data" --device cuda --sparsity 0.5 \
  --bit-method uniform --wbits 4 --output "$out/uniform4.json" --overwrite --quiet | tail -n 12
python3 - "$out" <<'PY'
import json, sys, pathlib
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    r = json.loads(f.read_text())
    print(f.stem, {k: round(v, 3) for k, v in r["perplexity"].items()},
          "bits", round(r.get("summary", {}).get("channel_average_bits", 16), 3),
          "compress_s", round(r["timings"].get("compress_seconds", 0), 1), r["environment"].get("gpu"))
PY
