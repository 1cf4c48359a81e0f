"""Training: the `DistillationTrainer` and the helper objects it owns (checkpoints, resume, EMA, meters, ...)."""
