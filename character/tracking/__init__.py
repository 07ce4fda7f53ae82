"""Experiment tracking (MLflow, W&B: one run per run directory, one nested run per stage) and progress lines."""
