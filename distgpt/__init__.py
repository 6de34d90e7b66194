"""distgpt: train GPT-style language models across many machines, orchestrated by Ray."""

__version__ = "0.1.0"
