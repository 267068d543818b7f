"""Positional encodings: sinusoidal tables (Vaswani et al. 2017) and rotary embeddings (RoPE)."""

import math
from typing import Optional

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


def rope_frequencies(dim: int, base: float = 10000.0, scaling: str = 'none', factor: float = 1.0,
                     low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                     original_max_len: int = 8192) -> np.ndarray:
  """RoPE's angular frequencies [dim / 2]: base^(-2i/dim), computed in float64.

  scaling 'linear' divides them all by `factor` (position interpolation, Chen et al. 2023);
  'llama3' (Llama 3.1) divides only those whose wavelength 2 pi / f exceeds
  original_max_len / low_freq_factor, keeps those shorter than original_max_len /
  high_freq_factor, and blends the two in between, linearly in original_max_len / wavelength.
  """
  freq = base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
  if scaling == 'linear':
    return freq / factor
  if scaling == 'llama3':
    periods = original_max_len * freq / (2 * math.pi)  # Wavelengths per original context.
    blend = np.clip((periods - low_freq_factor) / (high_freq_factor - low_freq_factor), 0.0, 1.0)
    return freq * (blend + (1.0 - blend) / factor)
  return freq


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray,
               freq: Optional[np.ndarray] = None) -> jnp.ndarray:
  """Rotates channel pairs (i, i + d/2) of `x` [batch, seq, heads, d] by angle pos * freq[i].

  `positions` is [batch, seq]; `freq` [d / 2] defaults to `rope_frequencies(d)`. Scores q.k then
  depend on positions only through their difference.
  """
  half = x.shape[-1] // 2
  freq = rope_frequencies(2 * half) if freq is None else freq
  angle = positions[..., None, None].astype(jnp.float32) * jnp.asarray(freq, jnp.float32)
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
