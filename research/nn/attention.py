"""Multi-head attention with grouped key/value heads (MHA, GQA, MQA), masks and a KV cache."""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.nn.config import ModelConfig
from research.nn.position import apply_rope

# A self-attention layer's cache: {'k', 'v'} [batch, max_len, kv_heads, head_dim], or heads first
# {'k_heads' [batch, kv_heads, head_dim, max_len], 'v_heads' [batch, kv_heads, max_len, head_dim]}
# without the batch or kv_heads axis where it is 1 (see `empty_cache`).
KVCache = dict[str, jnp.ndarray]


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


# Queries per block of the causal attention on CPU: blocks of keys wholly after a block of
# queries are skipped. 64 rather than 128: bench/train_throughput.py's step (b) (seq 256)
# 1.47-1.51 s -> 1.41-1.42 s, (d) 1.87 -> 1.81 s, pretrain_small (seq 128) the same (AVX-512 CPU).
CAUSAL_BLOCK = 64


def _scores(q_BxKxGxTxH, k, mask_Bx1xTxS, k_layout='bksh'):
  """Softmax numerators and denominators of the masked, scaled scores: (e [B, K, G, T, S],
  l [B, K, G, T]), float32. e = exp(s - max s) (1 at masked keys of fully masked rows). k: [B, K,
  S, H], or [B, K, H, S] with k_layout 'bkhs'."""
  s = jnp.einsum(f'bkgth,{k_layout}->bkgts', q_BxKxGxTxH, k, preferred_element_type=jnp.float32)
  s = s * q_BxKxGxTxH.shape[-1] ** -0.5 + jnp.where(mask_Bx1xTxS, 0.0, -1e30)[:, :, None]
  e = jnp.exp(s - s.max(-1, keepdims=True))
  return e, e.sum(-1)


@jax.custom_vjp
def _attend(q, k, v, mask):
  """softmax(q k^T / sqrt(H) + mask) v, heads first (batched matmuls need no transposes):
  q [B, K, G, T, H], k/v [B, K, S, H], mask [B, 1, T, S] -> [B, K, G, T, H]."""
  return _attend_fwd(q, k, v, mask)[0]


def _attend_fwd(q, k, v, mask, k_layout='bksh'):
  e, l = _scores(q, k, mask, k_layout)
  o = jnp.einsum('bkgts,bksh->bkgth', e.astype(v.dtype), v, preferred_element_type=jnp.float32)
  o = (o / l[..., None]).astype(q.dtype)
  return o, (q, k, v, mask, e, l, o)


def _attend_bwd(res, do):
  """The softmax gradient as in FlashAttention (Dao et al. 2022): dS = P * (dP - rowsum(dO * O)),
  whose row sums run over H instead of S, and P = e / l is never materialised."""
  q, k, v, mask, e, l, o = res
  do = do.astype(jnp.float32)
  inv_l = 1.0 / l[..., None]
  # dv and dk contract over the queries; taking them as [H, S] products of the operands as stored
  # ([.., T, H] and [.., T, S]) and transposing the small result spares XLA:CPU a transposed copy
  # of e and of ds (step (b) -1%). The barriers keep XLA from folding that transpose back into
  # the product, which it otherwise runs as [S, H] = e^T do at half the speed (summed over
  # step (b)'s attention products, each timed alone: 172 -> 116 ms; steps (b)-(d) ~2% faster,
  # (a) the same; AMD EPYC, AVX-512).
  barrier = jax.lax.optimization_barrier
  dv = barrier(jnp.einsum('bkgth,bkgts->bkhs', do * inv_l, e)).swapaxes(-1, -2)
  dp = jnp.einsum('bkgth,bksh->bkgts', do, v, preferred_element_type=jnp.float32)
  delta = jnp.einsum('bkgth,bkgth->bkgt', do, o, preferred_element_type=jnp.float32)
  ds = e * (dp - delta[..., None]) * (inv_l * q.shape[-1] ** -0.5)
  ds = jnp.where(mask[:, :, None], ds, 0.0)  # Masked scores are constants (fully masked rows).
  dq = jnp.einsum('bkgts,bksh->bkgth', ds, k, preferred_element_type=jnp.float32)
  dk = barrier(jnp.einsum('bkgth,bkgts->bkhs', q, ds, preferred_element_type=jnp.float32)
               ).swapaxes(-1, -2)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attend.defvjp(_attend_fwd, _attend_bwd)


def einsum_kernel(implementation: str) -> bool:
  """Whether `dot_product_attention` runs this file's einsum kernel ('auto' does on CPU)."""
  return implementation == 'einsum' or (implementation == 'auto'
                                        and jax.default_backend() == 'cpu')


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
  return to_heads_first(cache) if einsum_kernel(cfg.attention) else cache


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


def _group_heads(q_BxTxNxH: jnp.ndarray, kv_heads: int) -> jnp.ndarray:
  """[B, T, N, H] -> [B, K, G, T, H]: query head n = k * G + g reads key/value head k."""
  b, t, n, h = q_BxTxNxH.shape
  return q_BxTxNxH.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)


def _merge_heads(o_BxKxGxTxH: jnp.ndarray) -> jnp.ndarray:
  """The inverse of `_group_heads`: [B, K, G, T, H] -> [B, T, N, H]."""
  b, k, g, t, h = o_BxKxGxTxH.shape
  return o_BxKxGxTxH.transpose(0, 3, 1, 2, 4).reshape(b, t, k * g, h)


def dot_product_attention(q_BxTxNxH: jnp.ndarray, k_BxSxKxH: jnp.ndarray, v_BxSxKxH: jnp.ndarray,
                          mask_Bx1xTxS: jnp.ndarray, implementation: str = 'auto',
                          causal: bool = False) -> jnp.ndarray:
  """softmax(q k^T / sqrt(H), keys where the mask is False excluded) v -> [B, T, N, H].

  Query head n reads key/value head n // (N / K). implementation: 'einsum' (this file: softmax
  in float32 with a hand-written backward, fastest on CPU), 'xla' or 'cudnn'
  (jax.nn.dot_product_attention), 'auto' = 'einsum' on CPU, else JAX's choice. `causal` promises
  that the mask hides every key after the query's own index (T == S); 'einsum' then skips the
  blocks of keys wholly after a block of CAUSAL_BLOCK queries.
  """
  if not einsum_kernel(implementation):
    return jax.nn.dot_product_attention(
        q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask_Bx1xTxS,
        implementation=None if implementation == 'auto' else implementation)
  t = q_BxTxNxH.shape[1]
  q_BxKxGxTxH = _group_heads(q_BxTxNxH, k_BxSxKxH.shape[2])
  k_BxKxSxH, v_BxKxSxH = k_BxSxKxH.transpose(0, 2, 1, 3), v_BxSxKxH.transpose(0, 2, 1, 3)
  step = CAUSAL_BLOCK if causal else t
  blocks = [(i, min(t, i + step)) for i in range(0, t, step)]
  outs = []
  for i, j in blocks:  # Queries i..j-1 see keys 0..j-1 at most (all keys when not causal).
    s = j if causal else k_BxSxKxH.shape[1]
    outs.append(_attend(q_BxKxGxTxH[:, :, :, i:j], k_BxKxSxH[:, :, :s], v_BxKxSxH[:, :, :s],
                        mask_Bx1xTxS[:, :, i:j, :s]))
  return _merge_heads(jnp.concatenate(outs, axis=3))


def cached_attention(q_BxTxNxH: jnp.ndarray, k_BxTxKxH: jnp.ndarray, v_BxTxKxH: jnp.ndarray,
                     mask_Bx1xTxS: jnp.ndarray, cache: KVCache, index: jnp.ndarray,
                     implementation: str) -> tuple[jnp.ndarray, KVCache]:
  """Writes this step's keys/values into `cache` (S slots, from `empty_cache`) at slot `index`,
  then attends to the whole cache: (out [B, T, N, H], the new cache)."""
  def write(name, a, axis):
    return jax.lax.dynamic_update_slice_in_dim(cache[name], a.astype(cache[name].dtype), index,
                                               axis=axis)

  dtype = q_BxTxNxH.dtype
  if 'k' in cache:
    cache = {'k': write('k', k_BxTxKxH, 1), 'v': write('v', v_BxTxKxH, 1)}
    return dot_product_attention(q_BxTxNxH, cache['k'].astype(dtype), cache['v'].astype(dtype),
                                 mask_Bx1xTxS, implementation), cache
  b, _, kv_heads, h = k_BxTxKxH.shape
  k_new, v_new = (_drop_unit_rows(k_BxTxKxH.transpose(0, 2, 3, 1)),
                  _drop_unit_rows(v_BxTxKxH.transpose(0, 2, 1, 3)))
  cache = {'k_heads': write('k_heads', k_new, k_new.ndim - 1),
           'v_heads': write('v_heads', v_new, v_new.ndim - 2)}
  s = cache['k_heads'].shape[-1]
  out_BxKxGxTxH = _attend_fwd(_group_heads(q_BxTxNxH, kv_heads),
                              cache['k_heads'].reshape(b, kv_heads, h, s).astype(dtype),
                              cache['v_heads'].reshape(b, kv_heads, s, h).astype(dtype),
                              mask_Bx1xTxS, k_layout='bkhs')[0]
  return _merge_heads(out_BxKxGxTxH), cache


@jax.custom_vjp
def _matmul(x_TxI: jnp.ndarray, w_IxO: jnp.ndarray) -> jnp.ndarray:
  """x @ w with the weight gradient taken in the faster orientation on CPU (see below)."""
  return x_TxI @ w_IxO


def _matmul_fwd(x, w):
  return x @ w, (x, w)


def _matmul_bwd(res, dy_TxO):
  x_TxI, w_IxO = res
  if w_IxO.shape[0] > w_IxO.shape[1]:
    # XLA:CPU runs x^T dy 1.3-2x slower when the output's rows outnumber its columns (measured:
    # a [4096, 1536]^T [4096, 384] product); dy^T x is the fast orientation, and the barrier stops
    # XLA from folding the small transpose back into the product.
    dw_IxO = jax.lax.optimization_barrier(dy_TxO.T @ x_TxI).T
  else:
    dw_IxO = x_TxI.T @ dy_TxO
  return dy_TxO @ w_IxO.T, dw_IxO


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _dense_dot_general(lhs, rhs, dimension_numbers, precision=None):
  """nn.Dense's product of [tokens, in] inputs with its [in, out] kernel, through `_matmul`."""
  del dimension_numbers, precision  # Always (((1,), (0,)), ((), ())) for 2-D inputs.
  return _matmul(lhs, rhs)


def dense(x: jnp.ndarray, features: int, cfg: ModelConfig, name: str,
          scale: float = 1.0) -> jnp.ndarray:
  """A bias-free Dense applied to the 2-D view [tokens, d] of `x` [..., d] (faster on CPU).

  Call it inside a compact method: the layer becomes a child of that module, named `name`.
  """
  layer = nn.Dense(features, use_bias=False, dtype=cfg.dtype, name=name,
                   kernel_init=nn.initializers.normal(0.02 * scale),
                   dot_general=_dense_dot_general)
  return layer(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], features)


class Attention(nn.Module):
  """Self-attention, or cross-attention (`cross`) to a source. `out_scale` shrinks the output
  projection's init (GPT-2)."""
  cfg: ModelConfig
  out_scale: float = 1.0
  cross: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray, positions: jnp.ndarray,
               source: Optional[jnp.ndarray] = None, cache: Optional[KVCache] = None,
               cache_index: Optional[jnp.ndarray] = None, causal: bool = False
               ) -> tuple[jnp.ndarray, Optional[KVCache]]:
    """x: [batch, q_len, d_model]; mask: bool [batch, 1, q_len, k_len]; positions: [batch, q_len].

    Self-attention: with a cache, this step's keys/values are written at slot `cache_index` and
    the queries attend over the whole cache (k_len = cache length); returns (out, new cache or
    None). Cross-attention: keys/values (no RoPE) come from `source` [batch, src_len, d_model],
    or, given no source, from `cache` as an earlier call returned it: (out, the source's keys and
    values {'k', 'v'}), which a decoder computes once per source. causal: the mask hides every
    later key (see `dot_product_attention`).
    """
    cfg = self.cfg
    b, t, _ = x.shape
    q_BxTxNxH = dense(x, cfg.num_heads * cfg.head_dim, cfg, 'query').reshape(
        b, t, cfg.num_heads, cfg.head_dim)
    if self.cross and source is None:
      if cache is None:
        raise ValueError('cross-attention needs a source or the keys/values cached from one.')
      k_BxSxKxH, v_BxSxKxH = cache['k'], cache['v']
    else:
      kv_in = source if self.cross else x
      k_BxSxKxH = dense(kv_in, cfg.kv_heads * cfg.head_dim, cfg, 'key').reshape(
          b, kv_in.shape[1], cfg.kv_heads, cfg.head_dim)
      v_BxSxKxH = dense(kv_in, cfg.kv_heads * cfg.head_dim, cfg, 'value').reshape(
          k_BxSxKxH.shape)
      if self.cross:
        cache = {'k': k_BxSxKxH, 'v': v_BxSxKxH}
      elif cfg.pos_encoding == 'rope':
        q_BxTxNxH = apply_rope(q_BxTxNxH, positions, cfg.rope_base)
        k_BxSxKxH = apply_rope(k_BxSxKxH, positions, cfg.rope_base)
    if self.cross or cache is None:
      out_BxTxNxH = dot_product_attention(q_BxTxNxH, k_BxSxKxH.astype(q_BxTxNxH.dtype),
                                          v_BxSxKxH.astype(q_BxTxNxH.dtype), mask,
                                          cfg.attention, causal)
    else:
      out_BxTxNxH, cache = cached_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask, cache,
                                            cache_index, cfg.attention)
    out = dense(out_BxTxNxH.reshape(b, t, -1), cfg.d_model, cfg, 'out', self.out_scale)
    return out, cache
