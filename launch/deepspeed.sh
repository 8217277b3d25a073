#!/usr/bin/env bash
# Launch megamoe training with the deepspeed launcher: deepspeed.sh [options] CONFIG [key=value ...]
# Options (see `megamoe launch --help`): --nnodes, --gpus-per-node, --hostfile, --master-addr,
# --master-port, --node-rank, --sbatch-arg, --local-cpu [--nproc N], --script PATH, --dry-run.
# The command lines come from megamoe/train/launch.py, so --dry-run prints exactly what runs.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${MEGAMOE_PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m megamoe.cli launch deepspeed "$@"
