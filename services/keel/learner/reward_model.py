"""`keel rm`: a reward model (one-logit sequence classifier) trained on preference pairs.

The model reads prompt + response text exactly as the reward server scores it
(`reward_model_inputs`), so what `keel rm` writes is what `reward.source.path` and `keel serve
reward` load.
"""

from __future__ import annotations

import torch

from keel.algo import bradley_terry_loss
from keel.config import RewardModelConfig
from keel.data.preference import PreferencePair, build_pairs
from keel.data.rows import Row
from keel.learner.offline import OfflineTrainer
from keel.models.loading import DTYPES
from keel.reward.model import reward_model_inputs


class RewardModelTrainer(OfflineTrainer):
    """Bradley-Terry loss -log sigma(r_chosen - r_rejected [- margin]) per pair. Metrics: rm/loss,
    rm/accuracy (share of pairs ranked right; on held-out pairs, eval/rm/accuracy), rm/margin."""

    kind = "rm"
    cfg: RewardModelConfig

    def prepare(self, rows: list[Row], split: str) -> list[PreferencePair]:
        built = build_pairs(rows, self.cfg.data, self.tokenizer)
        self.note(split, built)
        return built.pairs

    def build_model(self):
        from transformers import AutoModelForSequenceClassification

        m = self.cfg.model
        model = AutoModelForSequenceClassification.from_pretrained(
            m.path, num_labels=1, dtype=DTYPES[m.dtype], trust_remote_code=m.trust_remote_code
        )
        model.config.pad_token_id = self.tokenizer.pad_token_id  # the pooled token is the last non-pad one
        return model

    def units(self, item: PreferencePair) -> int:
        return 1

    def rewards(self, pairs: list[PreferencePair]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) scalar rewards, each (n,)."""
        n = len(pairs)
        prompts = [p.prompt for p in pairs] * 2
        responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        batch = reward_model_inputs(self.tokenizer, prompts, responses, self.cfg.data.max_tokens)
        scores = self.engine(**{k: v.to(self.device) for k, v in batch.items()}).logits[:, 0].float()
        return scores[:n], scores[n:]

    def loss_sums(self, items: list[PreferencePair]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen, rejected = self.rewards(items)
        margin = None
        if self.cfg.use_margin:
            margin = torch.tensor([p.margin for p in items], dtype=torch.float32, device=chosen.device)
        loss, _ = bradley_terry_loss(chosen, rejected, margin)
        n = len(items)
        gap = (chosen - rejected).detach()
        return loss * n, {"rm/loss": loss.detach() * n, "rm/accuracy": (gap > 0).sum(), "rm/margin": gap.sum()}
