import math

import pytest
import torch

from keel.algo.logprobs import entropy_from_logits, gather_logprobs, sequence_logprobs


def test_gather_logprobs_matches_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    tokens = torch.randint(0, 11, (2, 5), generator=g)
    want = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(gather_logprobs(logits, tokens), want)
    want_t = torch.log_softmax(logits / 0.7, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(gather_logprobs(logits, tokens, temperature=0.7), want_t)


def test_entropy_uniform_and_peaked():
    uniform = torch.zeros(1, 1, 8)
    assert entropy_from_logits(uniform).item() == pytest.approx(math.log(8))
    peaked = torch.tensor([[[100.0, 0.0, 0.0]]])
    assert entropy_from_logits(peaked).item() == pytest.approx(0.0, abs=1e-6)


def test_entropy_is_of_the_temperature_scaled_distribution():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=g)
    p = torch.softmax(logits / 0.7, -1)
    want = -(p * torch.log(p)).sum(-1)
    torch.testing.assert_close(entropy_from_logits(logits, temperature=0.7), want)
    assert not torch.allclose(entropy_from_logits(logits), want)


def test_sequence_logprobs_sum_and_mean():
    lp = torch.tensor([[-1.0, -2.0, -9.0]])
    m = torch.tensor([[1, 1, 0]])
    assert sequence_logprobs(lp, m).item() == pytest.approx(-3.0)
    assert sequence_logprobs(lp, m, average=True).item() == pytest.approx(-1.5)
