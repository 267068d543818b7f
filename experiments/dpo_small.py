"""dpo_small: DPO (Rafailov et al. 2023) of sft_small's GPT on reward_small's preference pairs.

  python launch.py --experiment=dpo_small               # trains sft_small in <workdir>/sft first
  python launch.py --experiment=dpo_small --config.train.init_from=runs/sft_small

Held-out exact match before and after goes to <workdir>/exact_match.json.

Measured (inside rlhf_small, 2 CPU cores, seed 0): 5 min 10 s; held-out pair accuracy of the
implicit reward 0.77 (margin 0.47), but held-out exact match 41.5% -> 40.5%: no gain yet.
"""

from experiments import sft_small


def get_config():
  c = sft_small.get_config()
  c.stage = 'dpo'
  c.dpo.beta = 0.1
  c.train.update(steps=300, batch_size=32, seq_len=64, learning_rate=1e-4, warmup_steps=30,
                 schedule='linear', min_lr_ratio=0.0, weight_decay=0.0, eval_every=100,
                 checkpoint_every=150, log_every=25)
  c.earlier.sft = sft_small.get_config()
  return c
