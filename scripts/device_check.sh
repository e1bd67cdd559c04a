#!/usr/bin/env bash
# GPU checks for one device session (issue 7): the gpu-marked tests, then the
# training benchmark on the reference and medium shapes. Writes JSON and logs to
# $OUT (or ./device_out). The GPU machine has torch but no megatron-core: carry
# its cp312 wheel in .whl/ (see README, Benchmarks) and this script installs it.
#   bash scripts/device_check.sh            # everything (~6-8 min on an H100/H200)
#   QUICK=1 bash scripts/device_check.sh    # tests + the reference shape only
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}
mkdir -p "$OUT"
if ! python3 -c "import megatron.core" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest -q -m gpu tests/gpu 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
PEAK=${PEAK_TFLOPS:-989}
python3 scripts/bench_train.py --config configs/bench/h100_small.yaml --peak-tflops "$PEAK" \
  --variants ours,megatron --out "$OUT/bench_small.json" 2>&1 | grep -v "^STAGE\|USDT" | tee "$OUT/bench_small.log"
python3 scripts/bench_train.py --config configs/bench/h100_small.yaml --peak-tflops "$PEAK" \
  --model.num_layers=4 --variants top2_dropless,top1_cf1.1,locmoe_plus --profile-steps 0 \
  --out "$OUT/bench_routing.json" 2>&1 | grep -v "^STAGE\|USDT" | tee "$OUT/bench_routing.log"
if [ -z "${QUICK:-}" ]; then
  python3 scripts/bench_train.py --config configs/bench/h100_medium.yaml --peak-tflops "$PEAK" \
    --variants ours --out "$OUT/bench_medium.json" 2>&1 | grep -v "^STAGE\|USDT" | tee "$OUT/bench_medium.log"
fi
