#!/usr/bin/env bash
# The README's first command: set up .venv, then run the main job (`megamoe train`) on the
# embedded default corpus with configs/tiny.yaml (2 processes) through the deepspeed
# launcher, and print where the plots, metrics and checkpoint are.
#
# With the deepspeed integration installed (megamoe.integrations.deepspeed, megamoe.parallel)
# it runs tiny.yaml as written: DeepSpeed backend, expert parallelism EP=2, via
# launch/deepspeed.sh when present. Without it, it runs the same model with the torch backend
# (2-process data parallel, EP=1) under the same `deepspeed` launcher, and says so.
# Extra arguments are config overrides, e.g. `bash launch/quickstart.sh train.steps=50`. A rerun
# starts over (--overwrite); continue a run with `megamoe train --config ... --resume`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VPY=$(bash "$ROOT/tools/bootstrap.sh" | tail -n 1)
VBIN=$(dirname "$VPY")
cd "$ROOT"
export PATH="$VBIN:$PATH" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
CFG=configs/tiny.yaml
PORT=$("$VPY" -c "from megamoe.testing import free_port; print(free_port())")
EXTRA=()
if ! "$VPY" -c "import megamoe.integrations.deepspeed, megamoe.parallel" >/dev/null 2>&1; then
  echo "[quickstart] megamoe.integrations.deepspeed / megamoe.parallel are not in this checkout:" \
       "running $CFG with parallel.backend=torch (2-process data parallel, EP=1) under the deepspeed launcher" >&2
  EXTRA=(parallel.backend=torch parallel.ep_size=1)
fi
# Validates the config (and the overrides) before launching, and finds the output directory.
OUT=$("$VPY" - "$CFG" ${EXTRA[@]+"${EXTRA[@]}"} "$@" <<'PY'
import sys
from megamoe.config import ConfigError
from megamoe.train.config import load_config
try:
    print(load_config(sys.argv[1], sys.argv[2:]).train.output_dir)
except ConfigError as exc:
    sys.exit(f"megamoe quickstart: config error: {exc}")
PY
)

if [ ${#EXTRA[@]} -eq 0 ] && [ -f launch/deepspeed.sh ]; then
  MEGAMOE_PYTHON="$VPY" bash launch/deepspeed.sh --local-cpu --nproc 2 --master-port "$PORT" --overwrite "$CFG" "$@"
else
  deepspeed --num_gpus 2 --master_port "$PORT" --no_local_rank --module megamoe.cli train \
    --config "$CFG" --overwrite ${EXTRA[@]+"${EXTRA[@]}"} "$@"
fi

"$VPY" - "$OUT" <<'PY'
import json, os, sys
s = json.load(open(os.path.join(sys.argv[1], "summary.json")))
ev = s.get("final_eval") or {}
print("\n=== megamoe quickstart: done ===")
if ev:
    print(f"held-out loss {ev['loss']:.3f} (ppl {ev['ppl']:.1f}), MaxVio_global {ev['max_vio_global']:.3f}")
print(f"plots:       {', '.join(s['plots'])}")
print(f"metrics:     {s['metrics']}   (TensorBoard: tensorboard --logdir {s['tensorboard']})")
print(f"checkpoint:  {s['checkpoint']}   (resume: add --resume; config inside: megamoe_config.json)")
from megamoe.cli import COMMANDS
if "convert" in COMMANDS:
    print(f"export to Hugging Face format: megamoe convert --help   (from {s['checkpoint']})")
PY
