"""FFN activation ablation on pretrain_small: ReLU, GELU, SwiGLU x 2 seeds, 250 steps each.
SwiGLU's hidden width is 8/3 d_model (not 4) so that its parameters match the others'
(Shazeer 2020).

  python launch.py --experiment=ablate_ffn --mode=sweep
"""

from experiments import pretrain_small
from research import sweep as sweep_lib


def get_config():
  return pretrain_small.get_config()


def sweep():
  points = []
  for ffn, multiplier in (('relu', 4.0), ('gelu', 4.0), ('swiglu', 8 / 3)):
    points += sweep_lib.product({'model.ffn': [ffn], 'seed': [0, 1]},
                                fixed={**pretrain_small.SWEEP_FIXED,
                                       'model.ffn_multiplier': multiplier})
  return points
