"""Post-training on the Trainer: supervised fine-tuning (SFT), preference tuning (DPO), reward
models and RLHF (PPO, GRPO).

Modules: batching (examples, padding, packing with block-diagonal attention, shuffled epochs
resumable exactly), common (the starting model grown for its chat template, splits, hashes),
records (reading the record files), sft (`SFTTask`: the masked loss), dpo (`DPOTask`: DPO / IPO /
hinge with a cached frozen reference), shakespeare (the demo's chat set from the plays), run
(`sft()` / `dpo()`: what the commands call). Each task plugs into `gpt2lab.train` through its
`Task` seam (gpt2lab.train.task): checkpoints, exact resume, DDP/FSDP, metrics and events are the
Trainer's. See docs/post_training.md.

RLHF (docs/rlhf.md): reward (a GPT with a scalar head, Bradley-Terry) and reward_task (`RewardTask`
on the Trainer), kl (estimators, Ziegler et al.'s KL controller), ppo (GAE, clipped losses, GRPO's
advantages), rollout (replies from the batched sampler, scored token by token), rlhf (`RLTrainer`
and `rlhf()`: PPO / GRPO with the trainer's checkpoints, metrics and events).
"""
