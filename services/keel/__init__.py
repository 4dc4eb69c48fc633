"""Keel: distributed RLHF (PPO, GRPO, RLOO, REINFORCE++, SFT, reward models, DPO) on Ray."""

__version__ = "0.1.0"
