"""pretrain_small: a 4-layer GPT on the Python standard library's own sources.

  python launch.py --experiment=pretrain_small

Measured on 2 CPU cores (2026-12-02, jax 0.10.2, float32): ~2 min 30 s end to end, tokenizer and
data included, at ~10,000-12,000 tokens/s (~58-70% MFU; 2 min 50 s - 3 min before the flat optimizer
and 2-D norms, 3 min 45 s before perf.tune_cpu_runtime, 4 min 16 s before that day's attention and
matmul work; 1 min 18 s on a 2-core AMD EPYC with AVX-512, 2026-12-04, at ~22,600 tokens/s).
Final eval loss 1.693 nats/character
(next-character accuracy 54.5%; the unigram entropy of the val split is 3.345), so a run should end
near 1.7.
"""

from research import sweep as sweep_lib
from research.config import default_config

# Shorter runs for the ablation sweeps (this one's and the ablate_* experiments'): ~2.5 minutes
# a point on 2 CPU cores.
SWEEP_FIXED = {'train.steps': 250, 'train.eval_every': 50, 'train.checkpoint_every': 125,
               'train.warmup_steps': 25}


def get_config():
  c = default_config()
  c.tokenizer.kind = 'char'
  c.model.update(num_layers=4, num_heads=6, d_model=192, max_len=128)
  c.train.update(steps=700, batch_size=16, seq_len=128, learning_rate=2e-3, warmup_steps=50,
                 eval_every=100, checkpoint_every=100, log_every=25,
                 flatten_optimizer=True)
  c.sampling.update(prompt='def ', max_new_tokens=120)
  return c


def sweep():
  """Positional encodings (learned, sinusoidal, RoPE) x 2 seeds, 250 steps each:
  python launch.py --experiment=pretrain_small --mode=sweep"""
  return sweep_lib.product({'model.pos_encoding': ['learned', 'sinusoidal', 'rope'],
                            'seed': [0, 1]}, fixed=SWEEP_FIXED)
