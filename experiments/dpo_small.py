"""dpo_small: DPO (Rafailov et al. 2023) of sft_small's GPT on reward_small's preference pairs.

  python launch.py --experiment=dpo_small               # trains sft_small in <workdir>/sft first
  python launch.py --experiment=dpo_small --config.train.init_from=runs/sft_small

Held-out exact match before and after goes to <workdir>/exact_match.json.

On reward_small's pairs (the sorting questions), with the chosen answers' per-token NLL added
to the loss (dpo.nll_coef=1, RPO; 0 = plain DPO).

Measured (inside rlhf_small, 2 CPU cores, 2026-12-02, SFT policy 83.5% on 200 held-out sorting
questions), 300 steps in 3 min 27-41 s: held-out exact match 83.5% -> 92.5% (seed 0, KL to the
SFT policy 0.35 nats), 83.5% -> 96.0% (seed 1, KL 0.36); implicit-reward pair accuracy 0.99 /
0.97.
Plain DPO (nll_coef=0; 2026-12-01, the earlier near misses): 83.5% -> 81.5% with pair accuracy
0.98 - the margin grew by pushing the rejected answers down while the chosen ones did not rise.
"""

from experiments import sft_small
from research import config as config_lib


def get_config():
  c = sft_small.get_config()
  c.stage = 'dpo'
  c.sft.kinds = ('sort',)  # reward_small's pairs.
  c.dpo.update(beta=0.1, nll_coef=1.0)
  c.train.update(steps=300, batch_size=32, seq_len=64, learning_rate=1e-4, warmup_steps=30,
                 schedule='linear', min_lr_ratio=0.0, weight_decay=0.0, eval_every=100,
                 checkpoint_every=150, log_every=25)
  c.earlier.sft = config_lib.earlier_overrides(sft_small.get_config(), c)
  return c
