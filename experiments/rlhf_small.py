"""rlhf_small: the whole pipeline in one workdir: pretrain -> SFT -> reward model -> PPO, and DPO
from the same SFT model (research/train/rlhf.py); the stages are sft_small, reward_small,
ppo_small and dpo_small, each in a subfolder, resumed or skipped when done.

  python launch.py --experiment=rlhf_small
  python launch.py --experiment=rlhf_small --config.earlier.ppo.seed=1 --workdir=runs/rlhf_seed1

Ends with results.md / rlhf.png: held-out accuracy and RM reward of each stage's policy, and the
KL of the PPO and DPO policies to the SFT reference.

The reward model, PPO and DPO work on the sorting questions (see reward_small for why), so the
table compares the policies on 200 held-out sorting questions.

Measured (2 CPU cores, 2026-12-01): 20 min 19 s end to end (sft with its pretraining 6:44,
reward 7:40, ppo 2:18 for 80 iterations - 2:29 rerun with the zero value head -, dpo 3:16).
Reward model: 91.7% held-out pair accuracy, 0.69 on the SFT policy's own samples. SFT and
reward model seed 0; PPO and DPO seeds:
  | policy   | seed 0: accuracy | KL to SFT | seed 1: accuracy | KL to SFT |
  | pretrain |  0.0%            | 211.8     |  0.0%            | 214.1     |
  | sft      | 83.5%            | 0         | 83.5%            | 0         |
  | ppo      | 84.0%            | 0.17      | 82.0%            | 0.13      |
  | dpo      | 91.5%            | 0.32      | 94.5%            | 0.29      |
(seed 1: --config.earlier.ppo.seed=1 --config.earlier.dpo.seed=1, with sft/ and reward/ copied
from the seed-0 workdir; its held-out questions differ.) DPO (with the NLL term) gains 8-11
points; PPO does not move the accuracy (see ppo_small for why). The reward model also scores the
pretrained model's gibberish above the SFT replies (+0.96 to +0.98): it never saw such text.
"""

from experiments import dpo_small
from experiments import ppo_small


def get_config():
  c = ppo_small.get_config()
  c.stage = 'rlhf'
  c.earlier.ppo = ppo_small.get_config()
  c.earlier.dpo = dpo_small.get_config()
  return c
