"""The DeepSpeed learner: policy and critic engines, the PPO update, weight export, checkpoints."""
