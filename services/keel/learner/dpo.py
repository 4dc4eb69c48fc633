"""`keel dpo`: direct preference optimisation (DPO, IPO, conservative DPO) against a frozen reference.

The reference's log-probs of every pair are computed once, before training (each rank scores a
share and the shares are summed over ranks), and kept; the reference model is then freed. With
model.lora the reference is the policy with its adapter off, i.e. model.path itself: the model
loaded to score the pairs is the one the adapters then wrap, so it is loaded once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from keel.algo import dpo_loss, gather_logprobs, sequence_logprobs
from keel.config import DPOConfig
from keel.data.preference import PreferencePair, build_pairs
from keel.data.rows import Row
from keel.learner.offline import OfflineTrainer
from keel.models.loading import load_causal_lm, response_logits, response_logprobs
from keel.trajectory import pad_prompts_and_responses


@dataclass(frozen=True)
class ScoredPair:
    pair: PreferencePair
    ref_chosen: float  # log pi_ref(chosen | prompt), summed over response tokens
    ref_rejected: float


class DPOTrainer(OfflineTrainer):
    """The DPO-family loss of `keel.algo.dpo_loss` on sequence log-probs. Metrics: dpo/loss,
    dpo/accuracy (implicit reward of chosen > rejected), dpo/margin, dpo/reward_chosen/rejected."""

    kind = "dpo"
    cfg: DPOConfig

    def prepare(self, rows: list[Row], split: str) -> list[ScoredPair]:
        built = build_pairs(rows, self.cfg.data, self.tokenizer)
        self.note(split, built)
        chosen, rejected = self._reference_logps(built.pairs)
        return [ScoredPair(p, c, r) for p, c, r in zip(built.pairs, chosen, rejected, strict=True)]

    def _reference_logps(self, pairs: list[PreferencePair]) -> tuple[list[float], list[float]]:
        """Sequence log-probs of chosen and rejected under the reference, computed once."""
        if not hasattr(self, "_reference"):
            m = self.cfg.model
            reference = load_causal_lm(self.cfg.reference or m.path, m.dtype, m.trust_remote_code)
            self._reference = reference.to(self.device).eval()
        out = torch.zeros(2, len(pairs), dtype=torch.float64)
        mine = list(range(self.rank, len(pairs), self.world))
        micro = self.cfg.trainer.micro_batch_size
        for s in range(0, len(mine), micro):
            index = mine[s : s + micro]
            batch = [pairs[i] for i in index]
            ids, attn, response_mask, P = _pair_batch(batch, self.tokenizer.pad_token_id)
            token_lp = response_logprobs(self._reference, ids, attn, P, 1.0, len(ids))
            seq = sequence_logprobs(token_lp, response_mask).double()
            out[0, index] = seq[: len(batch)]
            out[1, index] = seq[len(batch) :]
        if self.world > 1:
            torch.distributed.all_reduce(out)
        return out[0].tolist(), out[1].tolist()

    def build_model(self):
        reference = self.__dict__.pop("_reference", None)  # every pair is scored: free the reference
        m = self.cfg.model
        if m.lora is not None and reference is not None:  # model.path: the base the adapters wrap
            return reference
        return load_causal_lm(m.path, m.dtype, m.trust_remote_code)

    def units(self, item: ScoredPair) -> int:
        return 1

    def loss_sums(self, items: list[ScoredPair]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = len(items)
        ids, attn, response_mask, P = _pair_batch([it.pair for it in items], self.tokenizer.pad_token_id)
        ids, attn, response_mask = ids.to(self.device), attn.to(self.device), response_mask.to(self.device)
        logits = response_logits(self.engine, ids, attn, P)
        seq = sequence_logprobs(gather_logprobs(logits, ids[:, P:], 1.0), response_mask)
        ref = torch.tensor([[it.ref_chosen for it in items], [it.ref_rejected for it in items]], device=seq.device)
        d = self.cfg.dpo
        loss, metrics = dpo_loss(
            seq[:n], seq[n:], ref[0].to(seq.dtype), ref[1].to(seq.dtype), d.beta, d.loss_type, d.label_smoothing
        )
        return loss * n, {k: torch.tensor(v * n) for k, v in metrics.items()}


def _pair_batch(pairs: list[PreferencePair], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Chosen responses then rejected ones after their prompts: input_ids and attention_mask
    (2n, P + R), response_mask (2n, R), and P."""
    prompts = [p.prompt_ids for p in pairs] * 2
    responses = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    pt, pm, rt, rm = pad_prompts_and_responses(prompts, responses, pad_token_id)
    return torch.cat([pt, rt], 1), torch.cat([pm, rm], 1).long(), rm, pt.shape[1]
