#!/usr/bin/env bash
# The GPU figures of the README in one short run (a few minutes on one H100/H200; no network).
# Usage: benchmarks/gpu/run.sh [OUT_DIR]   (default: ./gpu-figures); prints the table, writes OUT_DIR/gpu.json
set -euo pipefail
out="${1:-gpu-figures}"
mkdir -p "$out"
cd "$(dirname "$0")/../.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/nvidia-smi.txt" || true
HF_HUB_OFFLINE=1 python benchmarks/gpu/gpu_figures.py --out "$out/gpu.json" 2>&1 | tee "$out/gpu.txt"
