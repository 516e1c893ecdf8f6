"""Compress GPT-2-style decoder language models: tokenize, truncate, pre-train, distil, fine-tune, evaluate."""

__version__ = "0.1.0"
