"""The transformers `generate` backend, for where vLLM is absent (and as the reference that the
vLLM backend is tested against)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from keel.config import SamplingConfig
from keel.models.loading import load_causal_lm, response_logprobs
from keel.rollout.base import Generator, Sample


class HFGenerator(Generator):
    backend = "hf"

    def __init__(self, model_path: str, tokenizer, dtype: str = "float32", micro_batch_size: int = 16):
        self.tokenizer = tokenizer
        self.model = load_causal_lm(model_path, dtype).eval()
        self.micro_batch_size = micro_batch_size

    def weight_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {k: (tuple(v.shape), v.dtype) for k, v in self.model.state_dict().items()}

    @torch.no_grad()
    def load_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        self.model.load_state_dict(dict(named_tensors), strict=True)

    @torch.no_grad()
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingConfig, seed: int) -> list[Sample]:
        tok = self.tokenizer
        pad = tok.pad_token_id
        stop_ids = {tok.eos_token_id, *sampling.stop_token_ids}
        P = max(len(p) for p in prompt_token_ids)
        ids = torch.full((len(prompt_token_ids), P), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompt_token_ids):
            ids[i, P - len(p) :] = torch.tensor(p)
            mask[i, P - len(p) :] = 1
        greedy = sampling.temperature == 0.0
        torch.manual_seed(seed)
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None if greedy else sampling.top_k,
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=sampling.n,
            eos_token_id=sorted(i for i in stop_ids if i is not None),
            pad_token_id=pad,
            stop_strings=sampling.stop or None,
            tokenizer=tok if sampling.stop else None,
        )
        responses = out[:, P:]
        # Cut each response after its first stop token; the rest is padding.
        lengths = []
        for row in responses.tolist():
            end = next((j + 1 for j, t in enumerate(row) if t in stop_ids), len(row))
            lengths.append(end)
        full_mask = torch.cat([mask.repeat_interleave(sampling.n, 0), _length_mask(lengths, responses.shape[1])], 1)
        temperature = 1.0 if greedy else sampling.temperature
        logprobs = response_logprobs(self.model, out, full_mask, P, temperature, self.micro_batch_size)
        samples = []
        for k, length in enumerate(lengths):
            tokens = responses[k, :length].tolist()
            stopped = length > 0 and (tokens[-1] in stop_ids or _ends_with_stop(tok, tokens, sampling.stop))
            samples.append(
                Sample(k // sampling.n, tokens, logprobs[k, :length].tolist(), "stop" if stopped else "length")
            )
        return samples


def _length_mask(lengths: list[int], width: int) -> torch.Tensor:
    return (torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).long()


def _ends_with_stop(tok, tokens: list[int], stop: list[str]) -> bool:
    return bool(stop) and any(tok.decode(tokens).endswith(s) for s in stop)
