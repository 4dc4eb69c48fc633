"""Where a sample ends on both backends (stop strings, stop token ids, EOS, the length limit), and
behaviour log-probs that the learner's recomputation reproduces at a temperature other than 1.

The demo policy (a warmed-up tiny Llama) answers "a+b=" with a number and EOS, and continues
counting prompts until the length limit unless a stop cuts it: each batch below mixes samples
that stop early with samples that run to the limit, so finished rows sit beside running ones.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from keel.config import ModelConfig, RolloutConfig, SamplingConfig
from keel.data.prompts import Prompt
from keel.models.loading import load_causal_lm, response_logprobs
from keel.rollout.worker import RolloutWorker

PROMPTS = ["12 13", "40 41 42", "3+4="]
STOP_STRINGS = [" 2", "9"]  # " 2" spans two tokens ("Ġ", "2"); both end on a digit, which is a token of its own


@pytest.fixture(scope="module")
def policy(demo_inputs):
    return str(demo_inputs[0])


@pytest.fixture(scope="module", params=["hf", "vllm"])
def worker(request, policy):
    """One worker per backend for the whole module (tests run grouped by backend)."""
    worker = RolloutWorker(ModelConfig(policy=policy), RolloutConfig(backend=request.param), 64, seed=0)
    yield worker
    if request.param == "vllm":
        worker.generator.close()  # frees its memory for the next module's engine


@pytest.fixture(scope="module")
def learner(policy):
    """The policy as the learner loads it, for recomputing log-probs."""
    return load_causal_lm(policy)


def _sampling(tok, kind: str, **overrides) -> SamplingConfig:
    """The sampling every test here uses, with the stops of `kind`."""
    stops = {
        "none": {},
        "strings": {"stop": STOP_STRINGS},
        "token_ids": {"stop_token_ids": [tok.convert_tokens_to_ids("4")]},
    }[kind]
    return SamplingConfig(**{"temperature": 0.7, "max_new_tokens": 8, "n": 4, **stops, **overrides})


def _how_it_ended(sample, tok, sampling: SamplingConfig) -> str:
    """Check that `sample` holds nothing after the token that ended it, and say what ended it."""
    tokens = sample.token_ids
    assert len(sample.logprobs) == len(tokens) >= 1
    assert tok.pad_token_id not in tokens
    stop_ids = {tok.eos_token_id, *sampling.stop_token_ids}
    assert not stop_ids & set(tokens[:-1]), f"a stop id before the end of {tokens}"
    texts = [tok.decode(tokens[:j], skip_special_tokens=True) for j in range(1, len(tokens) + 1)]
    early = [text for text in texts[:-1] if any(s in text for s in sampling.stop)]
    assert not early, f"{texts[-1]!r} holds a stop string before its last token"
    if tokens[-1] in stop_ids:
        assert sample.finish_reason == "stop"
        return "eos" if tokens[-1] == tok.eos_token_id else "stop id"
    if hits := [s for s in sampling.stop if s in texts[-1]]:
        [s] = hits
        assert texts[-1].endswith(s) and texts[-1].count(s) == 1, texts[-1]
        assert sample.finish_reason == "stop"
        return "stop string"
    assert sample.finish_reason == "length" and len(tokens) == sampling.max_new_tokens
    return "length"


@pytest.mark.parametrize("stop", ["strings", "token_ids"])
def test_samples_end_at_their_stop(worker, stop):
    tok = worker.tokenizer
    sampling = _sampling(tok, stop)
    samples = worker.generator.generate([tok(p).input_ids for p in PROMPTS], sampling, seed=0)
    assert [s.prompt_index for s in samples] == [i for i in range(len(PROMPTS)) for _ in range(sampling.n)]
    ended = Counter(_how_it_ended(s, tok, sampling) for s in samples)
    # not vacuous: some samples stop early on the stop under test, some run to the limit
    assert ended["stop string" if stop == "strings" else "stop id"] >= 1 and ended["length"] >= 1, ended


@pytest.mark.parametrize("stop", ["none", "strings"])
def test_behaviour_logprobs_match_the_learner_at_temperature(worker, stop, learner):
    """The learner and the reference recompute log-probs with `response_logprobs` on the padded
    batch; at T = 0.7 they must equal what the sampler reported, also after samples that stopped early."""
    tok = worker.tokenizer
    prompts = [Prompt(str(i), t, tuple(tok(t).input_ids), {}) for i, t in enumerate(PROMPTS)]
    sampling = _sampling(tok, stop, top_p=1.0)
    traj = worker.generate(prompts, seed=1, sampling=sampling)
    mask = traj.response_mask
    lengths = mask.sum(-1)
    assert (lengths < lengths.max()).any(), "no sample ended before another: nothing is padded"
    assert not (traj.response_tokens[mask] == tok.pad_token_id).any(), "padding inside the response mask"
    if sampling.stop:
        assert any(r.endswith(tuple(sampling.stop)) for r in traj.responses), "no sample ended on a stop string"
    lp = response_logprobs(learner, traj.input_ids, traj.attention_mask, traj.prompt_tokens.shape[1], 0.7)
    atol = 1e-4 if worker.generator.backend == "vllm" else 1e-5
    torch.testing.assert_close(lp[mask], traj.behaviour_logprobs[mask], atol=atol, rtol=0)


def _first_stop(tok, tokens: list[int], sampling: SamplingConfig) -> int | None:
    """vLLM's rule, slowly: the length through the first token that is a stop id or after which the
    decoded text holds a stop string; None when there is none."""
    stop_ids = {tok.eos_token_id, *sampling.stop_token_ids}
    for j in range(len(tokens)):
        text = tok.decode(tokens[: j + 1], skip_special_tokens=True)
        if tokens[j] in stop_ids or any(s in text for s in sampling.stop):
            return j + 1
    return None


def test_stops_only_cut_samples(worker):
    """With the same seed, the samples drawn with stops are the samples drawn without them, cut by
    vLLM's rule (on vLLM: the rule is vLLM's; on HF: the backend follows it). "an" completes inside
    word tokens (" thank", " assistant"): that token is kept."""
    tok = worker.tokenizer
    ids = [tok(p).input_ids for p in [*PROMPTS, "the cat"]]
    free = worker.generator.generate(ids, _sampling(tok, "none"), seed=2)
    sampling = _sampling(tok, "none", stop=[*STOP_STRINGS, "an"], stop_token_ids=[tok.convert_tokens_to_ids("4")])
    stopped = worker.generator.generate(ids, sampling, seed=2)
    ends = [_first_stop(tok, s.token_ids, sampling) for s in free]
    assert [s.token_ids for s in stopped] == [s.token_ids[:end] for s, end in zip(free, ends, strict=True)]
    assert [s.finish_reason for s in stopped] == ["length" if end is None else "stop" for end in ends]
    for s, f in zip(stopped, free, strict=True):
        torch.testing.assert_close(s.logprobs, f.logprobs[: len(s.logprobs)], atol=1e-5, rtol=0)
    # not vacuous: stop strings cut samples that ran on without them, "an" inside a token at least once
    texts = [tok.decode(s.token_ids) for s in stopped]
    assert any(t.endswith(tuple(STOP_STRINGS)) for t in texts)
    assert any("an" in t and not t.endswith("an") for t in texts)
