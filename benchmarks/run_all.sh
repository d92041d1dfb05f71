#!/usr/bin/env bash
# Run every GPU benchmark in one go (used on the device machine); each writes its JSON under $OUT or results/.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
for script in bench_topk bench_gemv bench_decode bench_train_step; do
    python3 "benchmarks/$script.py" "$@" || echo "!! $script failed"
done
