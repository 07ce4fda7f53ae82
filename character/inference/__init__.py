"""vLLM engines: the generation actors of the Ray Data stages (one shared engine per actor), the rollout engine of
train-ppo with weights synced in place, and the test-only batch gates."""
