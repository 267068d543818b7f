"""Backend-specific implementations of the model's maths, chosen once from the config's platform
(`ModelConfig.platform`: the backend compiled for) and `model.attention`:

- cpu.py: dense layers and norms with hand-written gradients, heads-first einsum attention
  (the fastest on XLA:CPU), used on the CPU only;
- tpu.py: Pallas splash (flash) attention;
- elsewhere, the generic code in research/nn and jax.nn.dot_product_attention ('xla', 'cudnn').
"""

from typing import Callable, Optional

from research.nn.config import ModelConfig
from research.nn.kernels import cpu


def dense_dot_general(cfg: ModelConfig) -> Optional[Callable]:
  """nn.Dense's `dot_general` for 2-D inputs: the CPU's custom-gradient matmul, else XLA's."""
  return cpu.dense_dot_general if cfg.platform == 'cpu' else None


def cpu_norm(cfg: ModelConfig) -> bool:
  """Whether norms use cpu.normalize (else the generic jnp maths)."""
  return cfg.platform == 'cpu'


def attention(cfg: ModelConfig, seq_len: int) -> str:
  """The attention kernel for sequences of `seq_len`: 'einsum', 'xla', 'cudnn', 'splash' or
  'jax' (jax.nn.dot_product_attention's own choice)."""
  if cfg.attention != 'auto':
    return cfg.attention
  if cfg.platform == 'cpu':
    return 'einsum'
  if cfg.platform == 'tpu' and seq_len % 128 == 0 and not cfg.sliding_window:
    return 'splash'
  return 'jax'
