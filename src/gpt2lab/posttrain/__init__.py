"""Post-training on the Trainer: supervised fine-tuning (SFT) and preference tuning (DPO).

Modules: batching (examples, padding, packing with block-diagonal attention, shuffled epochs
resumable exactly), common (the starting model grown for its chat template, splits, hashes),
records (reading the record files), sft (`SFTTask`: the masked loss), dpo (`DPOTask`: DPO / IPO /
hinge with a cached frozen reference), shakespeare (the demo's chat set from the plays), run
(`sft()` / `dpo()`: what the commands call). Each task plugs into `gpt2lab.train` through its
`Task` seam (gpt2lab.train.task): checkpoints, exact resume, DDP/FSDP, metrics and events are the
Trainer's. See docs/post_training.md.
"""
