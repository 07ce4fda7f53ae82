"""PPO on the Ray Train workers: rollouts and their log-probs, the scoring and updates of one iteration, and the
loop that syncs the policy into the rollout engines."""
