"""Norm ablation on pretrain_small: LayerNorm vs RMSNorm, before (pre) or after (post) each
residual branch, 250 steps each.

  python launch.py --experiment=ablate_norm --mode=sweep
"""

from experiments import pretrain_small
from research import sweep as sweep_lib


def get_config():
  return pretrain_small.get_config()


def sweep():
  return sweep_lib.product({'model.norm_position': ['pre', 'post'],
                            'model.norm': ['layernorm', 'rmsnorm']},
                           fixed=pretrain_small.SWEEP_FIXED)
