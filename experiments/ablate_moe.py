"""Dense vs Mixture-of-Experts on pretrain_moe_small's shape, 200 steps each: a dense FFN of the
same active width, MoE top-1 and top-2 of 8 experts with noisy gating, and top-2 without noise
(its load loss, defined through the noise, is off).

  python launch.py --experiment=ablate_moe --mode=sweep
"""

from experiments import pretrain_moe_small
from research import sweep as sweep_lib


def get_config():
  return pretrain_moe_small.get_config()


def sweep():
  fixed = {'train.steps': 200, 'train.eval_every': 50, 'train.checkpoint_every': 100,
           'train.warmup_steps': 20}
  dense = sweep_lib.product({'model.moe_every': [0]},
                            fixed={**fixed, 'model.ffn_multiplier': 4.0})
  moe = sweep_lib.product({'model.moe_top_k': [1, 2]}, fixed=fixed)
  no_noise = sweep_lib.product({'model.moe_noisy': [False]},
                               fixed={**fixed, 'model.moe_top_k': 2, 'model.moe_load_weight': 0.0})
  return dense + moe + no_noise
