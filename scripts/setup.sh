#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install locmoe-train.
#   bash scripts/setup.sh            # .venv with torch (CPU wheel) + locmoe-train[dev]
# Environment knobs:
#   VENV=path          where the environment lives (default: .venv in the repo)
#   TORCH_SPEC=spec    the torch requirement to install first (default: torch==2.13.0,
#                      a CPU wheel on these machines; a bare `torch` would pull a
#                      multi-GB CUDA build). Set TORCH_SPEC=skip to keep an existing torch.
#   EXTRAS=dev,hf      optional extras of locmoe-train to install (default: dev)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-dev}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating virtual environment in $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

stamp="$VENV/.locmoe-setup"
want="$(cat pyproject.toml scripts/setup.sh | cksum) $TORCH_SPEC $EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup: $VENV is up to date"
  exit 0
fi
if [ "$TORCH_SPEC" != "skip" ]; then
  echo "setup: installing $TORCH_SPEC"
  pip_install "$TORCH_SPEC"
fi
echo "setup: installing locmoe-train[$EXTRAS] (editable)"
pip_install -e ".[$EXTRAS]"
"$PY" -W ignore -c "import torch, megatron.core, locmoe_train; print('setup: torch', torch.__version__, '| megatron-core', megatron.core.__version__)"
echo "$want" > "$stamp"
