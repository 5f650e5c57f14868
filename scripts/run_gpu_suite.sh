#!/usr/bin/env bash
# Run the GPU suite (tests marked `gpu`) in one command and print the measured distances.
#
#   scripts/run_gpu_suite.sh [extra pytest arguments]
#
# Needs a CUDA GPU (the tests skip without one, and this script then fails loudly instead). On one GPU it
# checks: no host sync per micro-batch and one per step, real fp16 with its GradScaler, the exactness cases,
# two DDP ranks over gloo, FSDP1/FSDP2 on one rank; with two GPUs also FSDP1/FSDP2 on two ranks (NCCL).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
"$PYTHON" - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("run_gpu_suite: no CUDA GPU visible (torch.cuda.is_available() is False)")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
PY
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# -rs: say why a test skipped (e.g. two-GPU FSDP on one GPU); the measured distances print at the end.
exec "$PYTHON" -m pytest tests/test_gpu.py -m gpu -rs -v -p no:randomly --timeout=1200 "$@"
