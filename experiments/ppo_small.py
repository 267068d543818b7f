"""ppo_small: PPO with a KL penalty (research/train/ppo.py) of sft_small's GPT against
reward_small's reward model, on the prompts of the built-in verifiable task.

  python launch.py --experiment=ppo_small          # trains sft_small and reward_small first
  python launch.py --experiment=ppo_small --config.train.init_from=runs/sft_small \\
      --config.ppo.reward_from=runs/reward_small
  python launch.py --experiment=ppo_small --config.seed=1 --workdir=runs/ppo_small_seed1

train.steps counts rollout iterations of train.batch_size prompts. Writes ppo.png (held-out exact
match, RM reward and KL per iteration) and exact_match.json (before / after).

Measured (inside rlhf_small, 2 CPU cores, seed 0): 5 min 36 s for 80 iterations; held-out exact
match 41.5% -> 32.0% (sort 62.5% -> 12.5%), KL 2.1 nats per response, the RM reward of samples
nearly flat (-0.17 -> -0.06): with the reward model at chance on three of five kinds (see
reward_small), the updates follow noise. Not a working result yet.
"""

from experiments import reward_small
from experiments import sft_small


def get_config():
  c = sft_small.get_config()
  c.stage = 'ppo'
  c.earlier.sft = sft_small.get_config()
  c.earlier.reward = reward_small.get_config()
  c.ppo.update(temperature=0.7, max_new_tokens=16, beta=0.05, epochs=2, minibatch_size=16)
  c.train.update(steps=80, batch_size=64, learning_rate=1e-4, warmup_steps=10,
                 schedule='constant', weight_decay=0.0, eval_every=20, checkpoint_every=20,
                 log_every=5)
  return c
