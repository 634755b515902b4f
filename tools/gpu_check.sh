#!/usr/bin/env bash
# The GPU check (bench.py --check; bench.py's docstring says what it measures):
#   tools/gpu_check.sh OUT_DIR          on a machine with a GPU
#   tools/gpu_check.sh --cpu OUT_DIR    the same parts on the CPU at a tiny shape
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" bench.py --check "$@"
