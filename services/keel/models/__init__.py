"""Model factory: HF checkpoints, value heads, and the tiny-model maker for demos and tests."""
