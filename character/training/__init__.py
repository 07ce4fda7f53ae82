"""Training on the Ray Train workers: losses (pure torch), advantage estimators (a registry), PM scoring, the
pair-training loop of train-pm and train-dpo, DeepSpeed set-up, checkpoints and optimizer steps."""
