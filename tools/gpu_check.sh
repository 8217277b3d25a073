#!/usr/bin/env bash
# One check of megamoe's CUDA path on a single GPU, in about 5 minutes, without network:
#   1. env    versions of torch / triton / transformers / deepspeed and the GPU
#   2. bench  tools/bench/bench_layer.py --device cuda --dtype bf16: the five shapes, every peer,
#             TFLOP/s and share of a dense GEMM measured in the same run, megamoe's targets
#   3. tests  on CUDA: every Triton kernel against its reference, the layer pipeline against
#             the references, no host sync (set_sync_debug_mode), CUDA-graph capture/replay
#             of forward+backward, torch.compile (tests/unit/test_kernels*.py), layer tests
#   4. train  a short `megamoe train` on CUDA (torch backend, bf16 autocast)
# then prints one summary table (also written to $OUT/summary.md). A failing step does not
# stop the later ones; the exit status is 1 when any step failed.
#
#   bash tools/gpu_check.sh                # on the GPU machine
#   bash tools/gpu_check.sh --cpu-dry-run  # anywhere: the same steps, tiny and on CPU
#
# Environment: PYTHON (default: .venv/bin/python when it imports torch, else python3),
# GPU_CHECK_OUT (default runs/gpu_check). megamoe is imported from this checkout (PYTHONPATH),
# so nothing needs installing; steps whose python packages are missing say so and are skipped.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MODE=gpu
case "${1:-}" in
  --cpu-dry-run) MODE=cpu ;;
  "") ;;
  *) echo "usage: bash tools/gpu_check.sh [--cpu-dry-run]" >&2; exit 2 ;;
esac
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x "$ROOT/.venv/bin/python" ] && "$ROOT/.venv/bin/python" -c "import torch" >/dev/null 2>&1; then
  PY=$ROOT/.venv/bin/python
else
  PY=python3
fi
OUT=${GPU_CHECK_OUT:-$ROOT/runs/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
cd "$ROOT"

STEPS=()
step() {  # step NAME TIMEOUT_S CMD...: run, log to $OUT/NAME.log, record status and seconds
  local name=$1 limit=$2; shift 2
  local start=$SECONDS rc
  echo "=== $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  local status=ok
  [ "$rc" -ne 0 ] && status="FAIL (exit $rc)"
  [ "$rc" -eq 124 ] && status="FAIL (timeout ${limit}s)"
  STEPS+=("$name|$status|$((SECONDS - start))")
}
skip() { STEPS+=("$1|skipped: $2|0"); echo "=== $1: skipped: $2"; }
has() { "$PY" -c "import $1" >/dev/null 2>&1; }

if [ "$MODE" = gpu ]; then
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "no CUDA device visible to $PY; use --cpu-dry-run on a machine without a GPU" >&2
    exit 2
  fi
  DEVICE=cuda
  TEST_ARGS=(tests/unit/test_kernels.py tests/unit/test_kernels_layer.py tests/unit/test_kernels_cuda.py
             tests/unit/test_layer.py tests/unit/test_topk.py)
  BENCH_ARGS=(--device cuda --dtype bf16)
  TRAIN_ARGS=(train.device=cuda train.precision=bf16 train.steps=30)
else
  DEVICE=cpu
  export TRITON_INTERPRET=1  # the kernels run under Triton's interpreter without a GPU
  TEST_ARGS=(tests/unit/test_kernels_cuda.py tests/unit/test_kernels.py -k "map_slots or column_chunks or cuda")
  BENCH_ARGS=(--device cpu --shapes coarse --tokens 128 --impls megamoe,sort_gmm --warmup 1 --repeats 5
              --threads 1)
  TRAIN_ARGS=(train.device=cpu train.steps=3 data.embedded_docs=300 train.micro_batch_size=4)
fi

step env 120 "$PY" - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, sm_{p.major}{p.minor}")
for name in ("triton", "transformers", "deepspeed", "pytest", "sentencepiece"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:
        print(name, "missing:", type(exc).__name__)
from megamoe import kernels
print("megamoe Triton kernels available:", kernels.available())
EOF

# The benchmark first: its table (the targets) is what a short GPU session must bring back,
# even if the tests' JIT compiles run long.
step bench 300 "$PY" tools/bench/bench_layer.py "${BENCH_ARGS[@]}" --json "$OUT/bench_layer_$DEVICE.json"

if has pytest; then
  step tests 240 "$PY" -m pytest -q -p no:cacheprovider -rs "${TEST_ARGS[@]}"
else
  skip tests "pytest is not importable by $PY"
fi

if has yaml && has sentencepiece; then
  step train 120 "$PY" -m megamoe.cli train --config configs/tiny_single.yaml --overwrite \
    parallel.backend=torch train.output_dir="$OUT/train" train.eval_interval=0 train.save_interval=0 \
    train.tensorboard=false train.plots=false train.progress=false "${TRAIN_ARGS[@]}"
else
  skip train "pyyaml or sentencepiece is not importable by $PY"
fi

# One table: the steps, the benchmark (from its JSON), the targets and the training losses.
"$PY" tools/bench/gpu_check_summary.py "$OUT" "$DEVICE" "${STEPS[@]}" | tee "$OUT/summary.md"
for s in "${STEPS[@]}"; do
  case "$s" in *"|FAIL"*) exit 1 ;; esac
done
exit 0
