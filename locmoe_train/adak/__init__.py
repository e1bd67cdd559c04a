"""Ada-K (METHOD.md section 7): per-token expert counts learned with PPO after pre-training."""
