#!/usr/bin/env bash
# Set up the environment and run the test suite (CPU only; GPU tests skip).
#   bash scripts/test.sh [pytest args]
# TEST_WORKERS=N: pytest-xdist workers (default 2; 0 runs in this process). The suite is
# bound by process start-up (Python, torch, megatron-core) and keeps one core busy, so two
# workers use both cores of a 2-core machine. Each test file stays on one worker
# (--dist loadfile): module fixtures (a trained checkpoint, a set of runs) are built once.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
bash scripts/setup.sh
VENV=${VENV:-.venv}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
workers=${TEST_WORKERS:-2}
dist=()
if [ "$workers" != 0 ]; then
  dist=(-n "$workers" --dist loadfile)
fi
tests_start=$SECONDS
status=0
"$VENV/bin/python" -m pytest tests ${dist[@]+"${dist[@]}"} --durations=25 "$@" || status=$?
now=$SECONDS
echo "test.sh: tests $(( (now - tests_start) / 60 ))m$(( (now - tests_start) % 60 ))s," \
     "setup included $(( (now - start) / 60 ))m$(( (now - start) % 60 ))s (exit status $status)"
exit "$status"
