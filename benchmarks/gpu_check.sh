#!/usr/bin/env bash
# GPU check for one H200 (under 8 minutes): a 7B-shaped random bf16 checkpoint written on the
# machine, `dowser probe` on CUDA (layers streamed through pinned buffers; generated probes streamed
# and resident) vs the in-memory reference algorithm. Prints JSON lines: wall, generation and
# statistics time, bytes read from disk, passes over the weights, peak GPU memory, tokens/s, and
# the ratios to the reference.
# Needs torch with CUDA, transformers >= 5, safetensors, huggingface_hub, click, tqdm (no install step:
# runs from the source tree).
#   bash benchmarks/gpu_check.sh [--layers 32] [--probes 16] [--skip-reference]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 470 python3 -m benchmarks.gpu_check "$@"
