"""Training: the per-rank loop (``trainer.py``, no Ray), objectives (what a batch holds and its loss), the
learning-rate schedule, metrics and the checkpoint cadence. Importing this package loads nothing heavy."""
