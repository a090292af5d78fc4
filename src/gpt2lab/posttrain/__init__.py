"""Post-training stages on top of the trainer: SFT, DPO, reward models and RLHF (PPO, GRPO)."""
