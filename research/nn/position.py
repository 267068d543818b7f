"""Positional encodings: sinusoidal tables (Vaswani et al. 2017) and rotary embeddings (RoPE)."""

import jax.numpy as jnp
import numpy as np


def sinusoidal_table(max_len: int, dim: int) -> np.ndarray:
  """Returns the fixed `[max_len, dim]` table: sin on even, cos on odd channels."""
  pos = np.arange(max_len)[:, None]
  freq = np.exp(-np.log(10000.0) * np.arange(0, dim, 2) / dim)
  table = np.zeros((max_len, dim), np.float32)
  table[:, 0::2] = np.sin(pos * freq)
  table[:, 1::2] = np.cos(pos * freq)[:, : dim // 2]
  return table


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, base: float = 10000.0) -> jnp.ndarray:
  """Rotates channel pairs (i, i + d/2) of `x` [batch, seq, heads, d] by angle pos * base^(-2i/d).

  `positions` is [batch, seq]. Scores q.k then depend on positions only through their difference.
  """
  half = x.shape[-1] // 2
  freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions[..., None, None].astype(jnp.float32) * freq  # [batch, seq, 1, half]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
