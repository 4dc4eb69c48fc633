"""Rule rewards a person can check, usable as a function source (`reward.source` or an entry of
`reward.sources`) in a run config.

A reward function has the signature

    fn(prompts: list[str], responses: list[str], metadata: list[dict[str, str]], **kwargs) -> list[float]

and returns one finite float per sample.
"""

from __future__ import annotations

import re

_LEADING_INT = re.compile(r"\s*(-?\d+)")


def arithmetic(prompts: list[str], responses: list[str], metadata: list[dict[str, str]], **_: object) -> list[float]:
    """1.0 when the response starts with the expected integer (metadata["answer"]), else 0.

    A response that starts with some other number gets 0.1: the format is right. Anything after
    the number is ignored, so the model is free to stop or continue.
    """
    scores = []
    for i, (response, meta) in enumerate(zip(responses, metadata, strict=True)):
        if "answer" not in meta:
            raise ValueError(f"sample {i}: arithmetic reward needs metadata field 'answer'")
        match = _LEADING_INT.match(response)
        if match is None:
            scores.append(0.0)
        elif int(match.group(1)) == int(meta["answer"]):
            scores.append(1.0)
        else:
            scores.append(0.1)
    return scores


def arithmetic_exact(
    prompts: list[str], responses: list[str], metadata: list[dict[str, str]], **_: object
) -> list[float]:
    """The demo's task metric: 1.0 when the response is exactly the right sum (surrounding
    whitespace aside) and nothing else, else 0.0. Stricter than `arithmetic`: "12ult5" for
    "7+5=" is wrong here."""
    out = []
    for i, (response, meta) in enumerate(zip(responses, metadata, strict=True)):
        if "answer" not in meta:
            raise ValueError(f"sample {i}: arithmetic metric needs metadata field 'answer'")
        out.append(1.0 if response.strip() == meta["answer"].strip() else 0.0)
    return out


def length_penalty(
    prompts: list[str], responses: list[str], metadata: list[dict[str, str]], max_chars: int = 8, **_: object
) -> list[float]:
    """-min(len(response), max_chars) / max_chars: 0 for an empty response, -1 for one of max_chars
    characters or more. A source to weigh against correctness (`reward.sources`), so that a policy
    learns to stop after its answer; it counts characters because a reward function sees text."""
    if max_chars < 1:
        raise ValueError(f"length_penalty: max_chars must be >= 1, got {max_chars}")
    return [-min(len(r), max_chars) / max_chars for r in responses]
