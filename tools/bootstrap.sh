#!/usr/bin/env bash
# Create (or reuse) the repo's virtual environment .venv and install megamoe into it.
# Idempotent: a second run only checks. Never replaces an existing torch (a user's CUDA build
# stays); on a machine without a GPU and without torch it installs a CPU build of torch.
# Prints the venv's python path on its last line.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${MEGAMOE_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}
log() { echo "[bootstrap] $*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtual environment $VENV"
  # System site-packages stay visible so an installed (CUDA) torch is reused, not replaced.
  "$PY" -m venv --system-site-packages "$VENV"
fi
VPY="$VENV/bin/python"

if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    log "installing torch (CUDA machine)"
    "$VPY" -m pip install -q torch
  else
    log "installing a CPU build of torch (no GPU found)"
    "$VPY" -m pip install -q "torch==2.13.0+cpu" 2>/dev/null \
      || "$VPY" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi

STAMP="$VENV/.megamoe-install-stamp"
WANT=$(cat "$ROOT/setup.py" | sha256sum | cut -d' ' -f1)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ] || ! "$VPY" -c "import megamoe, deepspeed, transformers, triton" >/dev/null 2>&1; then
  log "installing megamoe and its dependencies into $VENV"
  # mujoco: the MuJoCo RL tests run instead of skipping; triton: the GPU kernels' tests run
  # (under Triton's interpreter on CPU) instead of skipping.
  "$VPY" -m pip install -q -e "$ROOT[test,mujoco,triton]"
  echo "$WANT" > "$STAMP"
fi
echo "$VPY"
