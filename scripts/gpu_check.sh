#!/usr/bin/env bash
# The checks that need a GPU, as one short run for a session lent one (the `device` tool):
#   bash scripts/gpu_check.sh            # ~2-3 minutes on an H100/H200, after pip installs
# Runs every CUDA-only test (they skip on CPU machines and in CI): the grouped MoE path,
# CUDA training and generation (tests/test_cuda.py), and offloading with the expert cache
# on the GPU and the rest in pinned CPU memory (tests/offload/test_cuda_offload.py, not yet
# run on a GPU when it was written). Uses the machine's python if it has torch with CUDA,
# else installs the project into a fresh venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  $PY -m venv /tmp/moelab-gpu-venv
  PY=/tmp/moelab-gpu-venv/bin/python
  $PY -m pip install -q -e ".[dev]"
fi
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
PYTHONPATH=src $PY -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/offload/test_cuda_offload.py
