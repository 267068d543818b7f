"""reward_small: a reward model (sft_small's GPT + a scalar head) on preference pairs of the
built-in verifiable task: the right answer against a nearly right or another problem's answer.

  python launch.py --experiment=reward_small            # trains sft_small in <workdir>/sft first
  python launch.py --experiment=reward_small --config.train.init_from=runs/sft_small
  python launch.py --experiment=reward_small --config.reward.path=pairs.jsonl

Held-out pairwise accuracy goes to <workdir>/reward.json, the reward normalisation (SFT samples
-> mean 0, std 1) to <workdir>/reward_norm.json.
"""

from experiments import sft_small


def get_config():
  c = sft_small.get_config()
  c.stage = 'reward'
  c.earlier.sft = sft_small.get_config()
  c.train.update(steps=400, batch_size=32, seq_len=64, learning_rate=1e-3, warmup_steps=40,
                 weight_decay=0.0, eval_every=100, eval_batches=8, checkpoint_every=200,
                 log_every=25)
  return c
