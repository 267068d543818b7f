"""ppo_small: PPO with a KL penalty (research/train/ppo.py) of sft_small's GPT against
reward_small's reward model, on the prompts of the built-in verifiable task.

  python launch.py --experiment=ppo_small          # trains sft_small and reward_small first
  python launch.py --experiment=ppo_small --config.train.init_from=runs/sft_small \\
      --config.ppo.reward_from=runs/reward_small
  python launch.py --experiment=ppo_small --config.seed=1 --workdir=runs/ppo_small_seed1

train.steps counts rollout iterations of train.batch_size prompts. Writes ppo.png (held-out exact
match, RM reward and KL per iteration) and exact_match.json (before / after).

On the sorting questions (sft.kinds, as reward_small). ppo.reward=checker scores replies by
exact match instead of a reward model (no reward model trained):
  python launch.py --experiment=ppo_small --config.ppo.reward=checker

Measured (2 CPU cores, 2026-12-01; SFT policy 83.5% on 200 held-out sorting questions):
- inside rlhf_small, 80 iterations in 2 min 29 s: seed 0 -> 84.0% (KL 0.17 nats per response),
  seed 1 -> 82.0% (KL 0.13). No gain; KL bounded.
- Why not: the reward model ranks the policy's own right replies above its wrong ones only 69% of
  the time (reward_small). Same settings, rollouts at temperature 1.0, lr 5e-5, 80 iterations:
  with the exact checker as reward (ppo.reward=checker) 83.5% -> 87.0%, rising at every eval (KL
  0.26); with the reward model 83.5% -> 72.0% (60.5% at iteration 40, KL 0.58). At temperature
  0.7 and lr 1e-5 even the checker stays flat (83.0%); at lr 1e-4 with the old random value head
  the KL reached 4 nats by iteration 3, hence the zero head now. DPO with the NLL term: +8.
- lr 1e-4 (before) with the reward model: 83.5% -> 54.5% after 20 iterations, KL 4-5 nats; 1e-5
  (now) keeps the policy near the reference.
"""

from experiments import reward_small
from experiments import sft_small


def get_config():
  c = sft_small.get_config()
  c.stage = 'ppo'
  c.earlier.sft = sft_small.get_config()
  c.earlier.reward = reward_small.get_config()
  c.ppo.update(temperature=1.0, max_new_tokens=16, beta=0.05, epochs=2, minibatch_size=16)
  c.sft.kinds = ('sort',)  # The prompts: the reward model's task (reward_small).
  c.train.update(steps=300, batch_size=64, learning_rate=1e-4, warmup_steps=10,
                 schedule='cosine', weight_decay=0.0, eval_every=25, checkpoint_every=50,
                 log_every=10)
  return c
