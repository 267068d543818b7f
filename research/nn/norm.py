"""LayerNorm and RMSNorm over the last axis."""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.nn.kernels import cpu

def normalize(x_TxD: jnp.ndarray, scale_D: jnp.ndarray, bias_D: Optional[jnp.ndarray],
              center: bool, eps: float) -> jnp.ndarray:
  """(x - mean) / sqrt(var + eps) * scale + bias over rows of x [tokens, d] (LayerNorm); without
  `center`, x / sqrt(mean(x^2) + eps) * scale (RMSNorm, bias None)."""
  mean_sq_T = jnp.mean(x_TxD * x_TxD, axis=-1)
  if center:
    mean_T = jnp.mean(x_TxD, axis=-1)
    var_T = jnp.maximum(mean_sq_T - mean_T * mean_T, 0.0)  # flax's "fast variance".
    x_TxD = x_TxD - mean_T[:, None]
  else:
    var_T = mean_sq_T
  y_TxD = x_TxD * jax.lax.rsqrt(var_T + eps)[:, None] * scale_D
  return y_TxD if bias_D is None else y_TxD + bias_D


class Norm(nn.Module):
  """LayerNorm (Ba et al. 2016) or, without `center`, RMSNorm (Zhang & Sennrich 2019) over the
  last axis of x [..., d]: statistics in float32, output in `dtype`. Parameters 'scale' [d]
  (and 'bias' [d]) as in flax.linen.LayerNorm / RMSNorm, whose values it computes. It runs on
  the 2-D view [tokens, d]; `cpu_kernel` uses kernels/cpu.py's hand-written backward. `eps` is
  added to the variance."""
  center: bool = True
  eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  cpu_kernel: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    d = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (d,), self.param_dtype)
    bias = (self.param('bias', nn.initializers.zeros, (d,), self.param_dtype) if self.center
            else None)
    x_TxD = x.reshape(-1, d).astype(jnp.promote_types(jnp.float32, x.dtype))
    fn = cpu.normalize if self.cpu_kernel else normalize
    return fn(x_TxD, scale, bias, self.center, self.eps).reshape(x.shape).astype(self.dtype)
