"""Multi-head attention with grouped key/value heads (MHA, GQA, MQA), masks and a KV cache."""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.nn.config import ModelConfig
from research.nn.position import apply_rope

KVCache = dict[str, jnp.ndarray]  # {'k', 'v'}: [batch, max_len, kv_heads, head_dim]


def attention_mask(q_pos: jnp.ndarray, q_seg: jnp.ndarray, k_pos: jnp.ndarray,
                   k_seg: jnp.ndarray, causal: bool) -> jnp.ndarray:
  """Which keys each query may see: bool [batch, 1, q_len, k_len].

  Segment ids say which example a token belongs to (0 = padding or an empty cache slot): a query
  sees keys of its own segment only, so packed examples never attend to each other. With `causal`,
  a query at position p sees only keys at positions <= p.
  """
  mask = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] > 0)
  if causal:
    mask &= k_pos[:, None, :] <= q_pos[:, :, None]
  return mask[:, None]


def dense(x: jnp.ndarray, features: int, cfg: ModelConfig, name: str,
          scale: float = 1.0) -> jnp.ndarray:
  """A bias-free Dense applied to the 2-D view [tokens, d] of `x` [..., d] (faster on CPU).

  Call it inside a compact method: the layer becomes a child of that module, named `name`.
  """
  layer = nn.Dense(features, use_bias=False, dtype=cfg.dtype, name=name,
                   kernel_init=nn.initializers.normal(0.02 * scale))
  return layer(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], features)


class Attention(nn.Module):
  """Self- or cross-attention. `out_scale` shrinks the output projection's init (GPT-2)."""
  cfg: ModelConfig
  out_scale: float = 1.0

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray, positions: jnp.ndarray,
               source: Optional[jnp.ndarray] = None, cache: Optional[KVCache] = None,
               cache_index: Optional[jnp.ndarray] = None) -> tuple[jnp.ndarray, Optional[KVCache]]:
    """x: [batch, q_len, d_model]; mask: bool [batch, 1, q_len, k_len]; positions: [batch, q_len].

    source: [batch, src_len, d_model] for cross-attention (keys/values from it, no RoPE).
    cache/cache_index: with a cache, this step's keys/values are written at slot `cache_index`
    and the queries attend over the whole cache (k_len = cache length). Returns (out, new cache).
    """
    cfg = self.cfg
    b, t, _ = x.shape
    kv_in = x if source is None else source
    q_BxTxNxH = dense(x, cfg.num_heads * cfg.head_dim, cfg, 'query').reshape(
        b, t, cfg.num_heads, cfg.head_dim)
    k_BxSxKxH = dense(kv_in, cfg.kv_heads * cfg.head_dim, cfg, 'key').reshape(
        b, kv_in.shape[1], cfg.kv_heads, cfg.head_dim)
    v_BxSxKxH = dense(kv_in, cfg.kv_heads * cfg.head_dim, cfg, 'value').reshape(
        k_BxSxKxH.shape)
    if cfg.pos_encoding == 'rope' and source is None:
      q_BxTxNxH = apply_rope(q_BxTxNxH, positions, cfg.rope_base)
      k_BxSxKxH = apply_rope(k_BxSxKxH, positions, cfg.rope_base)
    if cache is not None:
      k_BxSxKxH = jax.lax.dynamic_update_slice_in_dim(cache['k'], k_BxSxKxH.astype(cache['k'].dtype),
                                                      cache_index, axis=1)
      v_BxSxKxH = jax.lax.dynamic_update_slice_in_dim(cache['v'], v_BxSxKxH.astype(cache['v'].dtype),
                                                      cache_index, axis=1)
      cache = {'k': k_BxSxKxH, 'v': v_BxSxKxH}
    out_BxTxNxH = jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH.astype(q_BxTxNxH.dtype),
                                               v_BxSxKxH.astype(q_BxTxNxH.dtype), mask=mask)
    out = dense(out_BxTxNxH.reshape(b, t, -1), cfg.d_model, cfg, 'out', self.out_scale)
    return out, cache
