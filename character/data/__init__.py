"""Data the stages share: message clean-up and deduplication, the train / held-out / adversarial splits, the
preference pairs' encoding and order, and the prompts."""
