"""Position-wise feed-forward networks: ReLU (Vaswani et al.), GELU (GPT), SwiGLU (Shazeer 2020)."""

import flax.linen as nn
import jax.numpy as jnp

from research.nn.attention import dense
from research.nn.config import ModelConfig
from research.nn.partitioning import constrain


class FeedForward(nn.Module):
  """x [batch, seq, d_model] -> [batch, seq, d_model] through a hidden layer of cfg.ffn_dim.
  `pin`: the hidden units' sharding is pinned to logical axes (nn/partitioning.py; off for the
  experts of a MoE, which are vmapped)."""
  cfg: ModelConfig
  out_scale: float = 1.0
  pin: bool = True

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    cfg = self.cfg
    pin = (lambda h: constrain(h, ('batch', 'length', 'mlp'))) if self.pin else (lambda h: h)
    bias = cfg.ffn_bias
    h = pin(dense(x, cfg.ffn_dim, cfg, 'wi', bias=bias))
    if cfg.ffn == 'swiglu':
      h = nn.silu(pin(dense(x, cfg.ffn_dim, cfg, 'wg', bias=bias))) * h
    elif cfg.ffn == 'relu':
      h = nn.relu(h)
    else:
      h = nn.gelu(h, approximate=cfg.ffn == 'gelu')
    return dense(h, cfg.d_model, cfg, 'wo', self.out_scale, bias=bias)
