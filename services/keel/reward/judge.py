"""The judge reward source (`{type: judge, ...}`): AI feedback from a causal LM and a constitution.

For each sample (prompt x, response y) and each principle k of the constitution (or the subset
`principles`), the judge reads

    q_k(x, y) = template.format(principle=name_k, question=question_k, prompt=x, response=y)

and the score of the sample is the mean over the P principles of the judge's log-odds of the
positive answer against the negative one at the next token:

    score(x, y) = 1/P sum_k [ log p(positive | q_k) - log p(negative | q_k) ]

Each log p is the log-softmax over the whole vocabulary of the logits after the last token of
q_k, so the difference is the logit of P(positive | positive or negative): 0 when the judge is
undecided, unbounded either way (normalize: clip or whiten bounds it in reward.sources). Each
answer must be exactly one token (" Yes" and " No" are, for most real tokenizers); a longer one is
refused when the source loads, naming the field, rather than silently scored by its first token.

The (B x P) judge prompts go through the model `batch_size` at a time, right-padded: a prompt's
next-token logits are read at its own last real token, and a causal model's attention never sees
the padding after it, so a batch scores exactly as one prompt at a time (tested). A prompt longer
than `max_tokens` is cut from the left, keeping the question and the answer position.
"""

from __future__ import annotations

import torch

from keel.config import RewardJudgeSource
from keel.constitution import ConstitutionError, Principle, load_constitution


def judge_prompts(principles: list[Principle], template: str, prompts: list[str], responses: list[str]) -> list[str]:
    """(B x P) judge prompts, sample-major: sample b asked about principle k is item b * P + k."""
    return [
        template.format(principle=p.name, question=p.question, prompt=x, response=y)
        for x, y in zip(prompts, responses, strict=True)
        for p in principles
    ]


def answer_token(tokenizer, text: str, field: str) -> int:
    """The one token id of an answer; ValueError naming `field` unless `text` is exactly one token."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(
            f"{field}: {text!r} is {len(ids)} tokens for the judge's tokenizer ({pieces}), it must be exactly one "
            "(the judge scores the next token): pick an answer the tokenizer has as one token"
        )
    return ids[0]


@torch.no_grad()
def next_token_logprobs(model, tokenizer, texts: list[str], token_ids: list[int], batch_size: int, max_tokens: int):
    """(N, len(token_ids)) float32: log p(token | text) of each token right after each text, `batch_size`
    texts per forward pass (right-padded, read at each text's last real token)."""
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "left"
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_tokens
        )
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (b, L, V)
        last = batch.attention_mask.sum(-1) - 1  # (b,) index of each text's last real token
        final = logits[torch.arange(len(last)), last].float()  # (b, V) next-token logits
        out.append(torch.log_softmax(final, dim=-1)[:, token_ids])
    return torch.cat(out)


class JudgeScorer:
    """A RewardJudgeSource as a scorer: fn(prompts, responses, metadata, ids) -> (B,) scores."""

    def __init__(self, source: RewardJudgeSource, path: str = "reward.source"):
        from transformers import AutoModelForCausalLM

        from keel.models.loading import load_tokenizer
        from keel.reward.model import RewardError

        self.source = source
        try:
            self.principles = judge_principles(source, path)
        except ConstitutionError as err:
            raise RewardError(str(err)) from None
        self.tokenizer = load_tokenizer(source.model)
        try:
            self.answers = [
                answer_token(self.tokenizer, source.positive, f"{path}.positive"),
                answer_token(self.tokenizer, source.negative, f"{path}.negative"),
            ]
        except ValueError as err:
            raise RewardError(str(err)) from None
        self.model = AutoModelForCausalLM.from_pretrained(source.model).eval()

    def __call__(self, prompts: list[str], responses: list[str], metadata=None, ids=None) -> torch.Tensor:
        texts = judge_prompts(self.principles, self.source.template, prompts, responses)
        lp = next_token_logprobs(
            self.model, self.tokenizer, texts, self.answers, self.source.batch_size, self.source.max_tokens
        )  # (B * P, 2)
        margin = (lp[:, 0] - lp[:, 1]).view(len(prompts), len(self.principles))  # (B, P) log-odds
        return margin.mean(-1)


def judge_principles(source: RewardJudgeSource, path: str) -> list[Principle]:
    """The principles a judge source asks about; ConstitutionError naming the field."""
    constitution = load_constitution(source.constitution)
    return constitution.select(source.principles, f"{path}.principles")


def judge_problems(source: RewardJudgeSource, path: str) -> list[str]:
    """What would stop a judge source from loading, found before anything starts: the model or the
    constitution not there or not valid, a principle it does not have, an answer that is not one token."""
    from pathlib import Path

    problems = []
    if not Path(source.model).exists():
        problems.append(f"{path}.model: {source.model} does not exist")
    try:
        judge_principles(source, path)
    except ConstitutionError as err:
        problems.append(f"{path}.constitution: {err}" if str(err).startswith(source.constitution) else str(err))
    if not problems:
        from keel.models.loading import load_tokenizer

        tokenizer = load_tokenizer(source.model)
        for field in ("positive", "negative"):
            try:
                answer_token(tokenizer, getattr(source, field), f"{path}.{field}")
            except ValueError as err:
                problems.append(str(err))
    return problems
