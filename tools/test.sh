#!/usr/bin/env bash
# Set up .venv (tools/bootstrap.sh) and run the whole test suite: unit, distributed (real
# gloo processes on CPU; NCCL when GPUs are present) and integration tests.
# Extra arguments go to pytest, e.g. `bash tools/test.sh tests/unit -k topk`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VPY=$(bash "$ROOT/tools/bootstrap.sh" | tail -n 1)
cd "$ROOT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ $# -eq 0 ]; then set -- tests; fi
exec "$VPY" -m pytest -q -p no:cacheprovider --durations=15 "$@"
