"""`keel sft`: supervised fine-tuning of a causal LM, the loss on response (assistant) tokens only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from keel.config import SFTConfig
from keel.data.rows import Row
from keel.data.sft import TokenExample, build_sft_examples, collate
from keel.learner.offline import OfflineTrainer
from keel.models.loading import load_causal_lm


class SFTTrainer(OfflineTrainer):
    """Next-token cross-entropy on the tokens each example marks as targets (token-mean over the
    global batch). Metrics: sft/loss (nats per target token), sft/accuracy (greedy next token)."""

    kind = "sft"
    cfg: SFTConfig

    def prepare(self, rows: list[Row], split: str) -> list[TokenExample]:
        built = build_sft_examples(rows, self.cfg.data, self.tokenizer)
        self.note(split, built)
        return built.examples

    def build_model(self):
        m = self.cfg.model
        return load_causal_lm(m.path, m.dtype, m.trust_remote_code)

    def units(self, item: TokenExample) -> int:
        return sum(item.loss_mask[1:])  # targets with a token before them to predict from

    def loss_sums(self, items: list[TokenExample]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch = {k: v.to(self.device) for k, v in collate(items, self.tokenizer.pad_token_id).items()}
        ids = batch["input_ids"]
        logits = sft_logits(self.engine, batch)[:, :-1].float()
        targets, mask = ids[:, 1:], batch["loss_mask"][:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        loss = (nll.view_as(targets) * mask).sum()
        with torch.no_grad():
            correct = ((logits.argmax(-1) == targets) & mask).sum()
        return loss, {"sft/loss": loss.detach(), "sft/accuracy": correct}


def sft_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, L, V) logits of a collated batch. No attention mask is passed: right padding is invisible
    to causal attention, and from position ids that restart transformers builds a block-diagonal
    mask, so packed examples do not see each other. That detection needs no KV cache, hence
    use_cache=False."""
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
