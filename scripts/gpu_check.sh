#!/usr/bin/env bash
# The checks that need a GPU, as one short run for a session lent one (the `device` tool):
#   bash scripts/gpu_check.sh            # ~2-3 minutes on an H100/H200
# Runs every CUDA-only test (they skip on CPU machines and in CI): the grouped MoE path,
# CUDA training and generation (tests/test_cuda.py), and offloading with the expert cache
# on the GPU and the rest in pinned CPU memory (tests/offload/test_cuda_offload.py, not yet
# run on a GPU when it was written). It uses the machine's python3 as it is (the device
# image holds torch with CUDA, pytest and hypothesis; nothing can be installed there), with
# moelab from this checkout's src/. `-x`: stop at the first failure, with its traceback.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: $PY has no torch that sees a CUDA device; nothing to check here" >&2
  exit 2
fi
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
PYTHONPATH=src PYTHONUNBUFFERED=1 $PY -m pytest -q -x -p no:cacheprovider -rs tests/test_cuda.py \
  tests/offload/test_cuda_offload.py
