"""`keel cai`: the supervised phase of Constitutional AI (Bai et al., 2022): generate, critique, revise.

For each prompt x of data.prompts:

    y_0 = policy(x)                                             the original response
    for each of the cai.principles_per_prompt principles k drawn for x (seeded, no repeats):
        c_j = critic(critique_template(principle_k, x, y_{j-1}))          the critique
        y_j = critic(revision_template(principle_k, x, y_{j-1}, c_j))     the revision

and the last revision y_K becomes

    sft.jsonl           {prompt_id, prompt, response: y_K, original: y_0, principles}   (keel sft)
    preferences.jsonl   {prompt_id, prompt, chosen: y_K, rejected: y_0, principles}    (keel dpo, keel rm)
    trace.jsonl         every critique and revision prompt and answer, and why a prompt was skipped

with keel sft's and keel dpo's default data fields. A prompt is skipped (and counted) when a revision
is blank, when the last revision equals the original (surrounding whitespace aside: no preference
to learn), or when a critique or revision prompt is longer than cai.max_context_tokens. `prompt` is
the prompt file's text, before any chat template; critique and revision prompts are wrapped in the
critic's chat template when data.apply_chat_template says so, as prompts are.

Where it runs: in this process, on one `RolloutWorker` per model (the rollout role's own class,
with the hf or vllm backend, the sampling config and stop rules of keel train's rollout), not on
Ray actors. The three generation rounds depend on each other prompt by prompt and may use two
models (policy and critic); for the batch sizes this command writes datasets from, one worker per
model is the whole job, and a pool of actors (keel bon's `Roles`) is a drop-in for `Generate`
when it is not. Rounds go cai.batch_size prompts at a time; round r of batch b samples with seed
sampling_seed + 1_000_003 (b * (1 + 2K) + r), so a run is repeatable.

The three files are written once every prompt is done, each to a temporary file renamed over it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from keel.config import CaiConfig, SamplingConfig, cai_rollout
from keel.constitution import Principle, load_constitution
from keel.data.prompts import Prompt, encode_prompt
from keel.telemetry.console import NO_PROGRESS

ROUND_SEED_STRIDE = 1_000_003  # as keel bon's rounds


def critique_prompt(template: str, principle: Principle, prompt: str, response: str) -> str:
    return template.format(
        principle=principle.name, prompt=prompt, response=response, critique_request=principle.critique
    )


def revision_prompt(template: str, principle: Principle, prompt: str, response: str, critique: str) -> str:
    return template.format(
        principle=principle.name,
        prompt=prompt,
        response=response,
        critique_request=principle.critique,
        critique=critique,
        revision_request=principle.revision,
    )


def draw_principles(principles: list[Principle], k: int, seed: int, count: int) -> list[list[Principle]]:
    """k distinct principles for each of `count` prompts, in prompt order, from a seeded RNG."""
    rng = random.Random(seed)
    return [rng.sample(principles, k) for _ in range(count)]


@dataclass
class Step:
    """One critique and revision of a prompt's current response."""

    principle: str
    critique_prompt: str
    critique: str = ""
    revision_prompt: str = ""
    revision: str = ""


@dataclass
class Item:
    """A prompt going through the rounds: its original response, its steps, why it was skipped."""

    prompt_id: str
    prompt: str  # the prompt file's text
    principles: list[Principle]
    original: str = ""
    steps: list[Step] = field(default_factory=list)
    skipped: str | None = None  # blank | unchanged | overlong

    @property
    def current(self) -> str:
        return self.steps[-1].revision if self.steps and self.steps[-1].revision else self.original

    def trace(self) -> dict:
        return {
            "prompt_id": self.prompt_id,
            "prompt": self.prompt,
            "original": self.original,
            "steps": [asdict(s) for s in self.steps],
            "skipped": self.skipped,
        }


# fn(prompts, seed, critic) -> one response text per prompt, in order
Generate = Callable[[list[Prompt], int, bool], list[str]]


class LocalGenerators:
    """The policy's and the critic's RolloutWorker, in this process (the critic's is the policy's when
    cai.critic is unset)."""

    def __init__(self, cfg: CaiConfig):
        from keel.rollout.worker import RolloutWorker

        self.policy = RolloutWorker(*cai_rollout(cfg), seed=cfg.seed, worker_id="cai-policy")
        same = cfg.cai.critic is None or cfg.cai.critic == cfg.model.policy
        self.critic = (
            self.policy if same else RolloutWorker(*cai_rollout(cfg, True), seed=cfg.seed, worker_id="cai-critic")
        )
        self.critic_sampling: SamplingConfig = cai_rollout(cfg, True)[1].sampling
        self.critic_tokenizer = self.critic.tokenizer  # critique and revision prompts are encoded with it

    def __call__(self, prompts: list[Prompt], seed: int, critic: bool) -> list[str]:
        worker = self.critic if critic else self.policy
        sampling = self.critic_sampling if critic else None  # None: the worker's own (cfg.sampling)
        traj = worker.generate(prompts, seed, sampling)
        by_id = dict(zip(traj.prompt_ids, traj.responses, strict=True))
        return [by_id[p.prompt_id] for p in prompts]


def _critic_round(items: list[Item], texts: list[str], generate: Generate, seed: int, tokenizer, cfg: CaiConfig):
    """The critic's answers to `texts` (one per item), or None for an item whose prompt is too long
    (the item is then marked overlong)."""
    prompts, where = [], []
    for i, (item, text) in enumerate(zip(items, texts, strict=True)):
        _, ids = encode_prompt(tokenizer, text, cfg.data.apply_chat_template)
        if len(ids) > cfg.cai.max_context_tokens:
            item.skipped = "overlong"
            continue
        prompts.append(Prompt(item.prompt_id, text, tuple(ids)))
        where.append(i)
    answers: list[str | None] = [None] * len(items)
    for i, answer in zip(where, generate(prompts, seed, True) if prompts else [], strict=True):
        answers[i] = answer
    return answers


def run_batch(items: list[Item], prompts: list[Prompt], generate: Generate, seed: int, tokenizer, cfg: CaiConfig):
    """Generate, then critique and revise each item's response once per principle drawn for it."""
    cai, k = cfg.cai, cfg.cai.principles_per_prompt
    for item, response in zip(items, generate(prompts, seed, False), strict=True):
        item.original = response
    for j in range(k):
        live = [it for it in items if it.skipped is None]
        steps = [Step(it.principles[j].name, "") for it in live]
        for it, step in zip(live, steps, strict=True):
            step.critique_prompt = critique_prompt(cai.critique_template, it.principles[j], it.prompt, it.current)
        critiques = _critic_round(
            live, [s.critique_prompt for s in steps], generate, seed + (1 + 2 * j) * ROUND_SEED_STRIDE, tokenizer, cfg
        )
        live_steps = [(it, s, c) for it, s, c in zip(live, steps, critiques, strict=True) if c is not None]
        for it, step, critique in live_steps:
            step.critique = critique
            step.revision_prompt = revision_prompt(
                cai.revision_template, it.principles[j], it.prompt, it.current, critique
            )
        revising = [it for it, _, _ in live_steps]
        revisions = _critic_round(
            revising,
            [s.revision_prompt for _, s, _ in live_steps],
            generate,
            seed + (2 + 2 * j) * ROUND_SEED_STRIDE,
            tokenizer,
            cfg,
        )
        for (it, step, _), revision in zip(live_steps, revisions, strict=True):
            it.steps.append(step)
            if revision is None:
                continue
            step.revision = revision
            if not revision.strip():
                it.skipped = "blank"
    for it in items:
        if it.skipped is None and it.current.strip() == it.original.strip():
            it.skipped = "unchanged"


def rows_of(items: list[Item]) -> tuple[list[dict], list[dict]]:
    """(SFT rows, preference pairs) of the items not skipped, in prompt order."""
    sft, pairs = [], []
    for it in items:
        if it.skipped is not None:
            continue
        names = [p.name for p in it.principles]
        sft.append(
            {
                "prompt_id": it.prompt_id,
                "prompt": it.prompt,
                "response": it.current,
                "original": it.original,
                "principles": names,
            }
        )
        pairs.append(
            {
                "prompt_id": it.prompt_id,
                "prompt": it.prompt,
                "chosen": it.current,
                "rejected": it.original,
                "principles": names,
            }
        )
    return sft, pairs


def _write_jsonl(rows: list[dict], path: Path) -> None:
    from keel.controller.checkpoint import write_atomic

    write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def run_cai(cfg: CaiConfig, out_dir: Path, log=print, progress=NO_PROGRESS, generate: Generate | None = None) -> dict:
    """Generate, critique, revise and write sft.jsonl, preferences.jsonl and trace.jsonl under `out_dir`;
    returns the summary (also logged). Raises DataError for a bad prompt file and ConstitutionError for
    a bad constitution before any model loads."""
    from keel.data.prompts import load_prompts, prompt_texts
    from keel.models.loading import load_tokenizer

    cai = cfg.cai
    principles = load_constitution(cai.constitution).select(cai.principles, "cai.principles")
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.policy)
    with progress.task("tokenize prompts"):
        loaded = load_prompts(cfg.data, tokenizer, cfg.model.max_prompt_tokens)
        texts = prompt_texts(cfg.data)
    prompts = loaded.prompts[: cai.max_prompts or None]
    drawn = draw_principles(principles, cai.principles_per_prompt, cfg.seed, len(prompts))
    items = [Item(p.prompt_id, texts[p.prompt_id], ps) for p, ps in zip(prompts, drawn, strict=True)]
    seed = cfg.sampling.seed if cfg.sampling.seed is not None else cfg.seed
    with progress.task("load models"):
        generators = generate or LocalGenerators(cfg)
    critic_tokenizer = getattr(generators, "critic_tokenizer", tokenizer)
    size, stride = cai.batch_size, ROUND_SEED_STRIDE * (1 + 2 * cai.principles_per_prompt)
    batches = range(0, len(items), size)
    with progress.task("generate, critique, revise", len(batches)) as bar:
        for b, start in enumerate(batches):
            run_batch(
                items[start : start + size],
                prompts[start : start + size],
                generators,
                seed + b * stride,
                critic_tokenizer,
                cfg,
            )
            bar.advance()
    sft, pairs = rows_of(items)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(sft, out_dir / "sft.jsonl")
    _write_jsonl(pairs, out_dir / "preferences.jsonl")
    _write_jsonl([it.trace() for it in items], out_dir / "trace.jsonl")
    skipped = {why: sum(it.skipped == why for it in items) for why in ("blank", "unchanged", "overlong")}
    summary = {
        "prompts": len(items),
        "rows": len(sft),
        "dropped_prompts": loaded.dropped,
        **{f"skipped_{k}": v for k, v in skipped.items()},
    }
    log(
        f"{summary['prompts']} prompts, {summary['rows']} revised rows; skipped {skipped['blank']} blank, "
        f"{skipped['unchanged']} unchanged, {skipped['overlong']} overlong revisions"
        + (f"; {loaded.dropped} prompts dropped (longer than model.max_prompt_tokens)" if loaded.dropped else "")
    )
    return summary
