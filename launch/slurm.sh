#!/usr/bin/env bash
# Launch megamoe training with the slurm launcher: slurm.sh [options] CONFIG [key=value ...]
# Options (see `megamoe launch --help`): --nnodes, --gpus-per-node, --hostfile, --master-addr,
# --master-port, --node-rank, --sbatch-arg, --local-cpu [--nproc N], --script PATH, --dry-run.
# The command lines come from megamoe/train/launch.py, so --dry-run prints exactly what runs.
# The interpreter is found by launch/python.sh (the repo's .venv, else a python3 importing megamoe).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT/launch/python.sh"
megamoe_find_python "$ROOT"
exec "$PYTHON" -m megamoe.cli launch slurm "$@"
