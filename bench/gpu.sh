#!/usr/bin/env bash
# The GPU benchmarks alone (docs/benchmarks.md, "GPU"): the bf16 matmul peak, then 88m (its own micro-batch
# and 64) and 1.5b with bf16 autocast and torch.compile, each run in its own process under its own time limit
# (10 minutes in all).
# Installs nothing; writes gpu_<preset>.json and .md into OUT_DIR.
#   usage: bench/gpu.sh [OUT_DIR]        (default results/bench; PYTHON=... picks the interpreter)
set -uo pipefail
out="${1:-results/bench}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out"

# preset, its wall-clock limit in seconds (compile and an out-of-memory retry included), and a micro-batch
# other than the preset's own: 88m again at 64 × 1024 (no accumulation), in the memory the fused loss frees
runs=("88m 150" "88m 150 64" "1.5b 300")

if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "bench/gpu.sh: CUDA is not available; GPU benchmarks skipped, nothing measured" >&2
    "$py" -m qkrank.bench --gpu-only --out "$out"   # records the skip in gpu.json
    "$py" -m qkrank.bench --gpu-only --preset 88m --gpu-micro-batch 64 --out "$out"
    exit 0
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || true

status=0
for run in "${runs[@]}"; do
    read -r preset limit micro <<<"$run"
    timeout --kill-after=10 "$limit" "$py" -m qkrank.bench --gpu-only --preset "$preset" \
        ${micro:+--gpu-micro-batch "$micro"} --out "$out"
    code=$?
    if [ "$code" -ne 0 ]; then
        [ "$code" -eq 124 ] && why="ran past ${limit} s" || why="exit status $code"
        echo "bench/gpu.sh: preset $preset${micro:+ at micro-batch $micro} failed ($why); its JSON is missing from $out" >&2
        status=1
    fi
done
exit "$status"
