import torch

from keel.data.prompts import Prompt
from keel.models.loading import load_causal_lm
from keel.reference.model import ReferenceModel


def test_reference_logprobs_match_unpadded_forward(tiny_model_dir):
    from keel.config import ModelConfig, RolloutConfig, SamplingConfig
    from keel.rollout.worker import RolloutWorker

    worker = RolloutWorker(ModelConfig(policy=str(tiny_model_dir)), RolloutConfig(backend="hf"), 64, seed=0)
    tok = worker.tokenizer
    prompts = [Prompt(str(i), t, tuple(tok(t).input_ids)) for i, t in enumerate(["1+1=", "the cat sat on the"])]
    traj = worker.generate(prompts, seed=3, sampling=SamplingConfig(temperature=1.0, max_new_tokens=5, n=2))
    ref = ReferenceModel(str(tiny_model_dir), micro_batch_size=3)
    lp = ref.logprobs(traj)
    assert (lp[~traj.response_mask] == 0).all()
    model = load_causal_lm(str(tiny_model_dir))
    # each row alone, without any padding, gives the same log-probs
    for b in range(len(traj)):
        p = traj.prompt_tokens[b][traj.prompt_mask[b]]
        r = traj.response_tokens[b][traj.response_mask[b]]
        ids = torch.cat([p, r]).unsqueeze(0)
        with torch.no_grad():
            logits = model(ids).logits[0, len(p) - 1 : -1]
        want = torch.log_softmax(logits, -1).gather(-1, r.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(lp[b, : len(r)], want, atol=1e-4, rtol=0)
    assert all(not p.requires_grad for p in ref.model.parameters())
