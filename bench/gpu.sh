#!/usr/bin/env bash
# The GPU benchmarks alone (docs/benchmarks.md, "GPU"): the bf16 matmul peak, then 88m and 1.5b with bf16
# autocast and torch.compile, each preset in its own process under its own time limit (7.5 minutes in all).
# Installs nothing; writes gpu_<preset>.json and .md into OUT_DIR.
#   usage: bench/gpu.sh [OUT_DIR]        (default results/bench; PYTHON=... picks the interpreter)
set -uo pipefail
out="${1:-results/bench}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out"

if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "bench/gpu.sh: CUDA is not available; GPU benchmarks skipped, nothing measured" >&2
    "$py" -m qkrank.bench --gpu-only --out "$out"   # records the skip in gpu.json
    exit 0
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || true

status=0
# preset and its wall-clock limit in seconds (compile and an out-of-memory retry included)
for run in "88m 150" "1.5b 300"; do
    read -r preset limit <<<"$run"
    timeout --kill-after=10 "$limit" "$py" -m qkrank.bench --gpu-only --preset "$preset" --out "$out"
    code=$?
    if [ "$code" -ne 0 ]; then
        [ "$code" -eq 124 ] && why="ran past ${limit} s" || why="exit status $code"
        echo "bench/gpu.sh: preset $preset failed ($why); its JSON is missing from $out" >&2
        status=1
    fi
done
exit "$status"
