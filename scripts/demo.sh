#!/usr/bin/env bash
# The main job. Until `keel train` lands (issue "distributed PPO core"), this is the foundation's
# smoke step: the CLI, a tiny Llama built locally, and the demo config validated.
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1
KEEL=.venv/bin/keel

$KEEL --help
$KEEL make-tiny-model runs/demo/policy
$KEEL config validate deploy/configs/demo.yaml
.venv/bin/python - <<'PY'
"""Sample from the tiny policy and score it with the demo's rule reward and a GRPO advantage."""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from keel.algo import AdvantageInputs, compute_advantages
from keel.reward.rules import arithmetic

tok = AutoTokenizer.from_pretrained("runs/demo/policy")
model = AutoModelForCausalLM.from_pretrained("runs/demo/policy")
torch.manual_seed(0)
prompt = "3+4="
ids = tok([prompt] * 4, return_tensors="pt").input_ids
out = model.generate(ids, do_sample=True, max_new_tokens=4, pad_token_id=tok.pad_token_id)
responses = tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
scores = arithmetic([prompt] * 4, responses, [{"answer": "7"}] * 4)
adv, _ = compute_advantages("grpo", AdvantageInputs(torch.tensor(scores), torch.ones(4, 4), group_index=torch.zeros(4)))
for r, s, a in zip(responses, scores, adv[:, 0].tolist()):
    print(f"  {prompt}{r!r:12} reward {s:.1f}  grpo advantage {a:+.2f}")
PY
echo
echo "keel: foundation smoke step done. The PPO demo (keel train on deploy/configs/demo.yaml) arrives with the distributed PPO core."
