"""Reward: an HF sequence-classification model or a Python function, scored in batches."""
