"""Evaluation configs: one file per row of the paper's tables (`launch/evaluate.py --config=...`)."""
