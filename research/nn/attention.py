"""Multi-head attention with grouped key/value heads (MHA, GQA, MQA), masks and a KV cache."""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.nn import kernels
from research.nn.config import ModelConfig
from research.nn.kernels import cpu
from research.nn.partitioning import constrain
from research.nn.norm import Norm
from research.nn.position import apply_rope, rope_frequencies

# A self-attention layer's cache: {'k', 'v'} [batch, max_len, kv_heads, head_dim], or heads first
# {'k_heads' [batch, kv_heads, head_dim, max_len], 'v_heads' [batch, kv_heads, max_len, head_dim]}
# without the batch or kv_heads axis where it is 1 (see `empty_cache`).
KVCache = dict[str, jnp.ndarray]


def attention_mask(q_pos: jnp.ndarray, q_seg: jnp.ndarray, k_pos: jnp.ndarray,
                   k_seg: jnp.ndarray, causal: bool, window: int = 0) -> jnp.ndarray:
  """Which keys each query may see: bool [batch, 1, q_len, k_len].

  Segment ids say which example a token belongs to (0 = padding or an empty cache slot): a query
  sees keys of its own segment only, so packed examples never attend to each other. With `causal`,
  a query at position p sees only keys at positions <= p; with a `window` > 0, only keys at
  positions > p - window (sliding-window attention).
  """
  mask = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] > 0)
  if causal:
    mask &= k_pos[:, None, :] <= q_pos[:, :, None]
  if window:
    mask &= k_pos[:, None, :] > q_pos[:, :, None] - window
  return mask[:, None]


def cache_kernel(cfg: ModelConfig) -> str:
  """The attention kernel of cached (decoding) steps: kernels.attention's, but never splash
  (whose blocks need 128 queries)."""
  kernel = kernels.attention(cfg, 0)
  return 'jax' if kernel == 'splash' else kernel


def empty_cache(cfg: ModelConfig, batch: int, length: int) -> KVCache:
  """A self-attention layer's zero keys/values for `length` slots.

  With the einsum kernel they are kept heads first, the keys transposed, and without a batch or
  kv_heads axis of size 1 ({'k_heads', 'v_heads'}): exactly the operands of XLA:CPU's batched
  matmuls, which drop unit axes, so that a decode step writes its slot in place and copies none
  of the cache (with any other layout XLA copies the cache once or more per layer and step).
  Decoding at context 512 (bench/decode_speed.py), batch 16: GPT-2 small 1.9x, pretrain_small
  2.0x faster than the projections' layout; batch 1 (kept in that layout before, for its unit
  batch axis): pretrain_small 2.3x (1.7-2.1k -> 3.9-4.8k tokens/s), GPT-2 small the same (its
  weight reads dominate); MQA at batch 2: 6 cache-sized copies per layer fewer. JAX's kernels
  keep the projections' layout {'k', 'v'} [batch, length, kv_heads, head_dim].
  """
  kv = jnp.zeros((batch, length, cfg.kv_heads, cfg.head_dim), cfg.dtype)
  cache = {'k': kv, 'v': kv}
  return to_heads_first(cache) if cache_kernel(cfg) == 'einsum' else cache


def _drop_unit_rows(x_BxKx___: jnp.ndarray) -> jnp.ndarray:
  """[batch, kv_heads, ...] without the batch or kv_heads axis where it is 1."""
  b, k = x_BxKx___.shape[:2]
  return x_BxKx___.reshape(*[d for d in (b, k) if d > 1], *x_BxKx___.shape[2:])


def to_heads_first(cache: KVCache) -> KVCache:
  """A layer's {'k', 'v'} cache heads first, keys transposed (other entries kept)."""
  rest = {n: c for n, c in cache.items() if n not in ('k', 'v')}
  return {**rest, 'k_heads': _drop_unit_rows(cache['k'].transpose(0, 2, 3, 1)),
          'v_heads': _drop_unit_rows(cache['v'].transpose(0, 2, 1, 3))}


def take_cache_rows(cache: KVCache, rows: jnp.ndarray, batch: int, kv_heads: int) -> KVCache:
  """A self-attention layer's cache (of `batch` rows, either layout) for the batch rows `rows`
  (int [m], repeats allowed). Other entries are left as they are."""
  def take(name, x):
    if name in ('k', 'v'):
      return x[rows]
    if name in ('k_heads', 'v_heads'):
      return _drop_unit_rows(x.reshape(batch, kv_heads, *x.shape[-2:])[rows])
    return x
  return {name: take(name, x) for name, x in cache.items()}


def dot_product_attention(q_BxTxNxH: jnp.ndarray, k_BxSxKxH: jnp.ndarray, v_BxSxKxH: jnp.ndarray,
                          mask_Bx1xTxS: jnp.ndarray, kernel: str = 'xla', causal: bool = False,
                          segments: Optional[tuple[jnp.ndarray, jnp.ndarray]] = None
                          ) -> jnp.ndarray:
  """softmax(q k^T / sqrt(H), keys where the mask is False excluded) v -> [B, T, N, H].

  Query head n reads key/value head n // (N / K). kernel (see nn/kernels): 'einsum' (softmax in
  float32 with a hand-written backward, fastest on CPU), 'xla' or 'cudnn'
  (jax.nn.dot_product_attention), 'jax' (its own choice), 'splash' (TPU; needs `segments`, the
  query and key segment ids [B, T] and [B, S] that the mask was made from). `causal` promises that
  the mask hides every key after the query's own index (T == S); einsum and splash then skip the
  blocks of keys wholly after a block of queries.
  """
  if kernel == 'einsum':
    return cpu.einsum_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, causal)
  if kernel == 'splash':
    from research.nn.kernels import tpu  # pylint: disable=g-import-not-at-top (Pallas TPU)
    return tpu.splash_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, *segments, causal)
  return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask_Bx1xTxS,
                                      implementation=None if kernel == 'jax' else kernel)


def cached_attention(q_BxTxNxH: jnp.ndarray, k_BxTxKxH: jnp.ndarray, v_BxTxKxH: jnp.ndarray,
                     mask_Bx1xTxS: jnp.ndarray, cache: KVCache, index: jnp.ndarray,
                     kernel: str) -> tuple[jnp.ndarray, KVCache]:
  """Writes this step's keys/values into `cache` (S slots, from `empty_cache`) at slot `index`,
  then attends to the whole cache: (out [B, T, N, H], the new cache)."""
  def write(name, a, axis):
    return jax.lax.dynamic_update_slice_in_dim(cache[name], a.astype(cache[name].dtype), index,
                                               axis=axis)

  dtype = q_BxTxNxH.dtype
  if 'k' in cache:
    cache = {'k': write('k', k_BxTxKxH, 1), 'v': write('v', v_BxTxKxH, 1)}
    return dot_product_attention(q_BxTxNxH, cache['k'].astype(dtype), cache['v'].astype(dtype),
                                 mask_Bx1xTxS, kernel), cache
  b, _, kv_heads, h = k_BxTxKxH.shape
  k_new, v_new = (_drop_unit_rows(k_BxTxKxH.transpose(0, 2, 3, 1)),
                  _drop_unit_rows(v_BxTxKxH.transpose(0, 2, 1, 3)))
  cache = {'k_heads': write('k_heads', k_new, k_new.ndim - 1),
           'v_heads': write('v_heads', v_new, v_new.ndim - 2)}
  s = cache['k_heads'].shape[-1]
  out_BxKxGxTxH = cpu.attend_fwd(cpu.group_heads(q_BxTxNxH, kv_heads),
                              cache['k_heads'].reshape(b, kv_heads, h, s).astype(dtype),
                              cache['v_heads'].reshape(b, kv_heads, s, h).astype(dtype),
                              mask_Bx1xTxS, k_layout='bkhs')[0]
  return cpu.merge_heads(out_BxKxGxTxH), cache


def dense(x: jnp.ndarray, features: int, cfg: ModelConfig, name: str,
          scale: float = 1.0, bias: bool = False) -> jnp.ndarray:
  """A Dense (bias-free unless `bias`) applied to the 2-D view [tokens, d] of `x` [..., d]
  (faster on CPU).

  Call it inside a compact method: the layer becomes a child of that module, named `name`.
  """
  layer = nn.Dense(features, use_bias=bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                   name=name, kernel_init=nn.initializers.normal(0.02 * scale),
                   dot_general=kernels.dense_dot_general(cfg) or jax.lax.dot_general)
  return layer(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], features)


def head_norm(cfg: ModelConfig, name: str) -> Norm:
  """An RMSNorm over the head dimension of [batch, seq, heads, head_dim] (model.qk_norm)."""
  return Norm(center=False, eps=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
              cpu_kernel=kernels.cpu_norm(cfg), name=name)


class Attention(nn.Module):
  """Self-attention, or cross-attention (`cross`) to a source. `out_scale` shrinks the output
  projection's init (GPT-2)."""
  cfg: ModelConfig
  out_scale: float = 1.0
  cross: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray, positions: jnp.ndarray,
               source: Optional[jnp.ndarray] = None, cache: Optional[KVCache] = None,
               cache_index: Optional[jnp.ndarray] = None, causal: bool = False,
               segment_ids: Optional[jnp.ndarray] = None
               ) -> tuple[jnp.ndarray, Optional[KVCache]]:
    """x: [batch, q_len, d_model]; mask: bool [batch, 1, q_len, k_len]; positions: [batch, q_len].

    Self-attention: with a cache, this step's keys/values are written at slot `cache_index` and
    the queries attend over the whole cache (k_len = cache length); returns (out, new cache or
    None). Cross-attention: keys/values (no RoPE) come from `source` [batch, src_len, d_model],
    or, given no source, from `cache` as an earlier call returned it: (out, the source's keys and
    values {'k', 'v'}), which a decoder computes once per source. causal: the mask hides every
    later key (see `dot_product_attention`). segment_ids [batch, q_len]: those the self-attention
    mask was made from (for kernels that take them instead of the mask).
    """
    cfg = self.cfg
    b, t, _ = x.shape
    heads = ('batch', 'length', 'heads', None)
    kv_heads = ('batch', 'length', 'kv_heads', None)
    q_BxTxNxH = constrain(dense(x, cfg.num_heads * cfg.head_dim, cfg, 'query',
                                bias=cfg.qkv_bias).reshape(b, t, cfg.num_heads, cfg.head_dim),
                          heads)
    if self.cross and source is None:
      if cache is None:
        raise ValueError('cross-attention needs a source or the keys/values cached from one.')
      k_BxSxKxH, v_BxSxKxH = cache['k'], cache['v']
    else:
      kv_in = source if self.cross else x
      k_BxSxKxH = constrain(dense(kv_in, cfg.kv_heads * cfg.head_dim, cfg, 'key',
                                  bias=cfg.qkv_bias).reshape(
                                      b, kv_in.shape[1], cfg.kv_heads, cfg.head_dim), kv_heads)
      v_BxSxKxH = constrain(dense(kv_in, cfg.kv_heads * cfg.head_dim, cfg, 'value',
                                  bias=cfg.qkv_bias).reshape(k_BxSxKxH.shape), kv_heads)
      if cfg.qk_norm:
        q_BxTxNxH = head_norm(cfg, 'query_norm')(q_BxTxNxH)
        k_BxSxKxH = head_norm(cfg, 'key_norm')(k_BxSxKxH)
      if self.cross:
        cache = {'k': k_BxSxKxH, 'v': v_BxSxKxH}
      elif cfg.pos_encoding == 'rope':
        freq = rope_frequencies(cfg.head_dim, cfg.rope_base, cfg.rope_scaling, cfg.rope_factor,
                                cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                                cfg.rope_original_max_len)
        q_BxTxNxH = apply_rope(q_BxTxNxH, positions, freq)
        k_BxSxKxH = apply_rope(k_BxSxKxH, positions, freq)
    if self.cross or cache is None:
      kernel = kernels.attention(cfg, t)
      if kernel == 'splash' and (self.cross or segment_ids is None):
        kernel = 'jax'  # Splash takes segment ids, which cross-attention's mask is not made of.
      out_BxTxNxH = dot_product_attention(q_BxTxNxH, k_BxSxKxH.astype(q_BxTxNxH.dtype),
                                          v_BxSxKxH.astype(q_BxTxNxH.dtype), mask, kernel,
                                          causal, (segment_ids, segment_ids))
    else:
      out_BxTxNxH, cache = cached_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask, cache,
                                            cache_index, cache_kernel(cfg))
    out_BxTxNxH = constrain(out_BxTxNxH, heads)
    out = dense(out_BxTxNxH.reshape(b, t, -1), cfg.d_model, cfg, 'out', self.out_scale,
                bias=cfg.out_bias)
    return constrain(out, ('batch', 'length', 'embed')), cache
