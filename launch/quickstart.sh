#!/usr/bin/env bash
# The README's first command: set up .venv, then run the main job (`megamoe train`) on the
# embedded default corpus with configs/tiny.yaml: DeepSpeed backend, expert parallelism EP=2,
# 2 CPU processes (gloo) through the deepspeed launcher (launch/deepspeed.sh --local-cpu),
# and print where the plots, metrics and checkpoint are, and how to export to HF format.
# Extra arguments are config overrides, e.g. `bash launch/quickstart.sh train.steps=50`. A rerun
# starts over (--overwrite); continue a run with the same command and `--resume` through
# launch/deepspeed.sh (see the README).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VPY=$(bash "$ROOT/tools/bootstrap.sh" | tail -n 1)
cd "$ROOT"
export PATH="$(dirname "$VPY"):$PATH" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
CFG=configs/tiny.yaml
# Validates the config (and the overrides) before launching, and finds the output directory.
OUT=$("$VPY" - "$CFG" "$@" <<'PY'
import sys
from megamoe.config import ConfigError
from megamoe.train.config import load_config
try:
    print(load_config(sys.argv[1], sys.argv[2:]).train.output_dir)
except ConfigError as exc:
    sys.exit(f"megamoe quickstart: config error: {exc}")
PY
)

MEGAMOE_PYTHON="$VPY" bash launch/deepspeed.sh --local-cpu --nproc 2 --overwrite "$CFG" "$@"

"$VPY" - "$OUT" <<'PY'
import json, os, sys
s = json.load(open(os.path.join(sys.argv[1], "summary.json")))
ev = s.get("final_eval") or {}
print("\n=== megamoe quickstart: done ===")
if ev:
    print(f"held-out loss {ev['loss']:.3f} (ppl {ev['ppl']:.1f}), MaxVio_global {ev['max_vio_global']:.3f}")
print(f"plots:       {', '.join(s['plots'])}")
from megamoe.cli import command_line
tb = command_line("--logdir", s["tensorboard"], script="tensorboard", module="tensorboard.main")
print(f"metrics:     {s['metrics']}   (TensorBoard: {tb})")
print(f"checkpoint:  {s['checkpoint']}   (config inside: megamoe_config.json)")
print(f"export to HF: {command_line('convert', s['checkpoint'], os.path.join(sys.argv[1], 'hf'))}")
PY
