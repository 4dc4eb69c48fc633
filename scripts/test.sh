#!/usr/bin/env bash
# The test suite: lint, then pytest. Assumes scripts/setup.sh ran (make test does both).
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
.venv/bin/ruff check services tests scripts benchmarks
.venv/bin/python scripts/gen_protos.py --check
.venv/bin/python -m pytest tests "$@"
