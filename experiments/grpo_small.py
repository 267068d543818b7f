"""grpo_small: GRPO (research/train/grpo.py) of sft_small's GPT on every kind of the built-in
verifiable task, rewarded by the exact checker; rollouts from our own KV-cache decoder.

  python launch.py --experiment=grpo_small     # trains sft_small first (in <workdir>/sft)
  python launch.py --experiment=grpo_small --config.train.init_from=runs/sft_small
  python launch.py --experiment=grpo_small --config.grpo.loss=dr_grpo   # dapo | rloo

Ends with results.md / results.json (held-out exact match per kind before and after, the
rollouts' sampled tokens per second) and grpo.png.
"""

from experiments import sft_small
from research import config as config_lib


def get_config():
  c = sft_small.get_config()
  c.stage = 'grpo'
  c.grpo.update(loss='grpo', group_size=8, epochs=1, minibatch_size=64, temperature=1.0,
                max_new_tokens=16, beta=0.0, bucket_prompts=16)
  c.train.update(steps=200, batch_size=16, learning_rate=1e-4, warmup_steps=10,
                 schedule='cosine', weight_decay=0.0, eval_every=50, checkpoint_every=50,
                 log_every=10)
  c.earlier.sft = config_lib.earlier_overrides(sft_small.get_config(), c)
  return c
