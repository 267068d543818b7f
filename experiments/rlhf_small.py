"""rlhf_small: the whole pipeline in one workdir: pretrain -> SFT -> reward model -> PPO, and DPO
from the same SFT model (research/train/rlhf.py); the stages are sft_small, reward_small,
ppo_small and dpo_small, each in a subfolder, resumed or skipped when done.

  python launch.py --experiment=rlhf_small
  python launch.py --experiment=rlhf_small --config.earlier.ppo.seed=1 --workdir=runs/rlhf_seed1

Ends with results.md / rlhf.png: held-out accuracy and RM reward of each stage's policy, and the
KL of the PPO and DPO policies to the SFT reference.
"""

from experiments import dpo_small
from experiments import ppo_small


def get_config():
  c = ppo_small.get_config()
  c.stage = 'rlhf'
  c.earlier.ppo = ppo_small.get_config()
  c.earlier.dpo = dpo_small.get_config()
  return c
