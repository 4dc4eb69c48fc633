"""Datasets: prompts (JSONL or HF datasets), task generators for demos, collation."""
