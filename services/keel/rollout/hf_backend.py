"""The transformers `generate` backend, for where vLLM is absent (and as the reference that the
vLLM backend is tested against)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from keel.config import SamplingConfig
from keel.models.loading import compute_precision, load_causal_lm, response_logprobs
from keel.rollout.base import Generator, Sample


class HFGenerator(Generator):
    backend = "hf"

    def __init__(
        self, model_path: str, tokenizer, dtype: str = "float32", micro_batch_size: int = 16, precision: str = "full"
    ):
        self.tokenizer = tokenizer
        self.model = load_causal_lm(model_path, dtype).eval()
        self.micro_batch_size = micro_batch_size
        self.precision = precision  # model.precision: mixed samples under bfloat16 autocast, as the learner computes

    def weight_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {k: (tuple(v.shape), v.dtype) for k, v in self.model.state_dict().items()}

    @torch.no_grad()
    def load_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        # every name was checked against weight_specs: a partial update (LoRA's merged layers) leaves the rest
        _, unexpected = self.model.load_state_dict(dict(named_tensors), strict=False)
        if unexpected:
            raise KeyError(f"unknown weights {unexpected[:3]}")

    @torch.no_grad()
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingConfig, seed: int) -> list[Sample]:
        tok = self.tokenizer
        pad = tok.pad_token_id
        stop_ids = {i for i in (tok.eos_token_id, *sampling.stop_token_ids) if i is not None}
        P = max(len(p) for p in prompt_token_ids)
        ids = torch.full((len(prompt_token_ids), P), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompt_token_ids):
            ids[i, P - len(p) :] = torch.tensor(p)
            mask[i, P - len(p) :] = 1
        rule = StopRule(tok, stop_ids, sampling.stop, prompt_len=P)
        torch.manual_seed(seed)
        with compute_precision(self.precision, ids.device):
            out = self._generate(ids, mask, sampling, sorted(stop_ids), rule)
        responses = out[:, P:].tolist()  # (B * n, <= max_new_tokens); finished rows continue with pad
        # Cut each row by the rule that stopped it: through its stop token, nothing after.
        ends = [rule.end(row) for row in responses]
        lengths = [len(row) if end is None else end for row, end in zip(responses, ends, strict=True)]
        full_mask = torch.cat([mask.repeat_interleave(sampling.n, 0), _length_mask(lengths, out.shape[1] - P)], 1)
        temperature = 1.0 if sampling.temperature == 0.0 else sampling.temperature
        logprobs = response_logprobs(self.model, out, full_mask, P, temperature, self.micro_batch_size, self.precision)
        return [
            Sample(k // sampling.n, row[:length], logprobs[k, :length].tolist(), "length" if end is None else "stop")
            for k, (row, length, end) in enumerate(zip(responses, lengths, ends, strict=True))
        ]

    def _generate(self, ids: torch.Tensor, mask: torch.Tensor, sampling: SamplingConfig, stop_ids, rule: StopRule):
        """transformers' generate: (B * n, P + <= max_new_tokens) token ids."""
        greedy = sampling.temperature == 0.0
        return self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None if greedy else sampling.top_k,
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=sampling.n,
            eos_token_id=stop_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            # not transformers' `stop_strings`: it also matches across the prompt, and rows it stops are
            # padded with pad_token_id, which the cut below would have to tell apart from real tokens
            stopping_criteria=StoppingCriteriaList([rule]),
        )


class StopRule(StoppingCriteria):
    """Where a response ends, by vLLM's rule: at its first stop token id (EOS or a
    `stop_token_ids` entry), or at the first token after which its decoded text contains a stop
    string. That token is kept; nothing after it is.

    The same rule stops rows during `generate` (as a StoppingCriteria) and cuts them afterwards
    (`end`), so the two cannot disagree. Text is decoded as vLLM's detokenizer does it: response
    tokens only, special tokens skipped, spaces not cleaned up.
    """

    def __init__(self, tokenizer, stop_ids: set[int], stop_strings: Sequence[str], prompt_len: int):
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.stop_strings = list(stop_strings)
        self.prompt_len = prompt_len  # generate's sequences are (B, prompt_len + t)

    def stopped(self, tokens: Sequence[int]) -> bool:
        """Whether the response `tokens` has reached a stop, at its last token or before."""
        return any(t in self.stop_ids for t in tokens) or self._has_stop_string(tokens)

    def end(self, tokens: Sequence[int]) -> int | None:
        """Length of the response through its stop token, or None when it has none (cut by length):
        the shortest prefix that `stopped`."""
        end = next((j + 1 for j, t in enumerate(tokens) if t in self.stop_ids), None)
        if self._has_stop_string(tokens[:end]):  # then a stop string ends it, at this token or before
            end = next(j + 1 for j in range(len(tokens)) if self._has_stop_string(tokens[: j + 1]))
        return end

    def _has_stop_string(self, tokens: Sequence[int]) -> bool:
        if not self.stop_strings:
            return False
        text = self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return any(s in text for s in self.stop_strings)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = [self.stopped(row) for row in input_ids[:, self.prompt_len :].tolist()]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _length_mask(lengths: list[int], width: int) -> torch.Tensor:
    return (torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).long()
