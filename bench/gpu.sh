#!/usr/bin/env bash
# The GPU goals in one run, one table (bench/bench_gpu.py says what is measured):
# per-family training images/s at 224 px (bf16, channels_last), the store-fed training loop
# against in-memory tensors (target >= 0.9x), the hcpl-shaped ensemble predicting 2048 px
# images end to end (target >= 4 images/s), peak GPU memory. Under 8 minutes on one GPU.
#
#   bench/gpu.sh                          # on a machine with one GPU
#   bench/gpu.sh --device cpu --smoke     # every code path at tiny sizes, on a CPU
#
# Runs from the repository it lives in (its .venv when there is one, else python3) and writes
# only inside a temporary directory, removed at the end. Without a GPU it says so and exits 0.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$repo/.venv/bin/python"
[ -x "$python" ] || python="$(command -v python3)"
work="$(mktemp -d "${TMPDIR:-/tmp}/ensemble-gpu-XXXXXX")"
trap 'rm -rf "$work"' EXIT

# Everything a run writes lands in $work: temp files and Ray's session, caches, bytecode.
export TMPDIR="$work" RAY_TMPDIR="$work" XDG_CACHE_HOME="$work/cache" MPLCONFIGDIR="$work/matplotlib" \
       TORCH_HOME="$work/torch" HF_HOME="$work/hf" PYTHONDONTWRITEBYTECODE=1 \
       PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" RAY_DEDUP_LOGS=1
cd "$work"
"$python" "$repo/bench/bench_gpu.py" --workdir "$work/run" "$@"
