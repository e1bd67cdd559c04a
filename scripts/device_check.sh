#!/usr/bin/env bash
# Everything one GPU session measures, in one call (issue 15): installs the
# carried megatron-core wheel, runs the gpu tests, then the training benchmark
# on the reference shape (ours vs megatron-core), the three routing variants,
# and the medium shape (ours vs megatron-core). Every log and JSON goes to
# $OUT (default ./device_out) as it is written, so a run cut off by its time
# limit still returns what it finished. About 5-6 minutes on an H200; the
# limits of its steps add up to under 9 minutes (run it with timeout_s=580).
#
#   bash scripts/device_check.sh               # on the GPU machine
#   REHEARSAL=1 bash scripts/device_check.sh   # on CPU: the same steps on tiny shapes
#   QUICK=1 bash scripts/device_check.sh       # tests + the reference shape only
#
# The GPU machine has torch but no megatron-core: download its cp312 wheel into
# .whl/ first (docs/benchmarks.md) and carry .whl. Files in $OUT (at most 8 come
# back from the device tool): device_check.log (everything), gpu_tests.log,
# gpu_training.json (bf16 training with the real routers), bench_small.json,
# bench_routing.json, bench_medium.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/device_check.log") 2>&1
export PYTHONUNBUFFERED=1 LOCMOE_GPU_REPORT=$OUT
status=0
step() {  # step NAME SECONDS LOG CMD...: time-limited; its output also goes to LOG (or -)
  local name=$1 limit=$2 log=$3; shift 3
  [ "$log" = - ] && log=/dev/null
  [ -n "${REHEARSAL:-}" ] && limit=$((limit * 4))  # 2 CPU cores, not a GPU
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | { grep --line-buffered -v '^STAGE\|^USDT' || true; } \
    | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "=== $name FAILED (exit $rc)"; status=1; }
}

# A rehearsal uses the project's environment (bash scripts/setup.sh) when there is one.
[ -n "${REHEARSAL:-}" ] && [ -x .venv/bin/python3 ] && export PATH=$PWD/.venv/bin:$PATH
if ! python3 -c "import megatron.core" 2>/dev/null; then
  ls .whl/megatron_core-*.whl >/dev/null 2>&1 || { echo "no megatron-core wheel in .whl/"; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
python3 -W ignore - <<'EOF'
import platform, torch, megatron.core
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"python {platform.python_version()} | torch {torch.__version__} (CUDA {torch.version.cuda}) "
      f"| megatron-core {megatron.core.__version__} | GPU {gpu}")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

PEAK=${PEAK_TFLOPS:-989}  # H100/H200 bf16 dense peak
BENCH=(python3 scripts/bench_train.py --peak-tflops "$PEAK")
TESTS=(tests/gpu tests/unit/test_padded_experts.py)
if [ -n "${REHEARSAL:-}" ]; then
  # CPU: the gpu tests are only collected (their CPU twins run); tiny shapes.
  step "gpu tests (collect only) + CPU twins" 300 "$OUT/gpu_tests.log" bash -c \
    "python3 -m pytest -q -p no:cacheprovider --collect-only -m gpu ${TESTS[*]} &&
     python3 -m pytest -q -p no:cacheprovider -m 'not gpu' ${TESTS[*]}"
  BENCH+=(--model.num_layers=2 --model.hidden_size=128 --model.num_attention_heads=4
          --model.ffn_hidden_size=256 --moe.ffn_hidden_size=256 --data.seq_len=64
          --train.global_batch_size=2 --train.micro_batch_size=2 --model.vocab_size=512
          --warmup 1 --steps 2)
else
  step "gpu tests" 150 "$OUT/gpu_tests.log" \
    python3 -m pytest -v -p no:cacheprovider -m gpu "${TESTS[@]}"
fi
# Each variant: 5 warm-up steps, then 20 timed (bench_train.py's defaults), then 2 profiled.
step "reference shape: ours vs megatron-core" 100 - "${BENCH[@]}" \
  --config configs/bench/h100_small.yaml --variants ours,megatron --out "$OUT/bench_small.json"
step "routing variants (4 layers, real router)" 80 - "${BENCH[@]}" \
  --config configs/bench/h100_small.yaml --model.num_layers=4 \
  --variants top2_dropless,top1_cf1.1,locmoe_plus --profile-steps 0 \
  --out "$OUT/bench_routing.json"
if [ -z "${QUICK:-}" ]; then
  step "medium shape: ours vs megatron-core" 200 - "${BENCH[@]}" \
    --config configs/bench/h100_medium.yaml --variants ours,megatron \
    --out "$OUT/bench_medium.json"
fi
echo "=== done ($(date -u +%H:%M:%S)), status $status"
exit $status
