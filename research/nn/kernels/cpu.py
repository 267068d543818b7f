"""CPU kernels: custom gradients and layouts that make XLA:CPU fast. The maths is that of the
generic code in research/nn; `research.nn.kernels.choose` picks these on the CPU only.

Figures are bench/train_throughput.py's workloads (a)-(d) on 2 CPU cores (AVX-512).
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp

# Queries per block of the causal einsum attention: blocks of keys wholly after a block of
# queries are skipped. 64 rather than 128: step (b) (seq 256) 1.47-1.51 s -> 1.41-1.42 s, (d)
# 1.87 -> 1.81 s, pretrain_small (seq 128) the same.
CAUSAL_BLOCK = 64


# ----------------------------------------------------------------------------------------------
# Dense layers: x @ w with the weight gradient in the faster orientation.

@jax.custom_vjp
def matmul(x_TxI: jnp.ndarray, w_IxO: jnp.ndarray) -> jnp.ndarray:
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


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """nn.Dense's product of [tokens, in] inputs with its [in, out] kernel, through `matmul`."""
  del dimension_numbers, precision, preferred_element_type  # 2-D inputs: (((1,), (0,)), ((), ())).
  return matmul(lhs, rhs)


# ----------------------------------------------------------------------------------------------
# Norms: row statistics as matrix-vector products, a hand-written backward.

def _row_mean(x_TxD: jnp.ndarray) -> jnp.ndarray:
  """Mean over the last axis: [tokens, d] -> [tokens], as the product x (1/d): XLA:CPU reduces
  rows in windows of 32 (~27 us for [768, 128]) and runs this matrix-vector product several times
  faster ((a) -3.5%)."""
  return x_TxD @ jnp.full((x_TxD.shape[-1],), 1.0 / x_TxD.shape[-1], x_TxD.dtype)


def _column_sum(x_TxD: jnp.ndarray) -> jnp.ndarray:
  """Sum over the tokens: [tokens, d] -> [d], as the product 1^T x: XLA:CPU reduced the
  [16 * 256, 384] scale/bias gradients of (b) as strided windows in ~1.3 ms each, the product
  takes ~0.07 ms (step (b) -1.5 to -1.8%)."""
  return jnp.ones((x_TxD.shape[0],), x_TxD.dtype) @ x_TxD


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def normalize(x_TxD: jnp.ndarray, scale_D: jnp.ndarray, bias_D: Optional[jnp.ndarray],
              center: bool, eps: float) -> jnp.ndarray:
  """(x - mean) / sqrt(var + eps) * scale + bias over rows of x [tokens, d] (LayerNorm); without
  `center`, x / sqrt(mean(x^2) + eps) * scale (RMSNorm, bias None)."""
  return _normalize_fwd(x_TxD, scale_D, bias_D, center, eps)[0]


def _normalize_fwd(x_TxD, scale_D, bias_D, center, eps):
  mean_sq_T = _row_mean(x_TxD * x_TxD)
  if center:
    mean_T = _row_mean(x_TxD)
    var_T = jnp.maximum(mean_sq_T - mean_T * mean_T, 0.0)  # flax's "fast variance".
    x_TxD = x_TxD - mean_T[:, None]
  else:
    var_T = mean_sq_T
  rstd_T = jax.lax.rsqrt(var_T + eps)
  xhat_TxD = x_TxD * rstd_T[:, None]
  y_TxD = xhat_TxD * scale_D
  return (y_TxD if bias_D is None else y_TxD + bias_D), (xhat_TxD, rstd_T, scale_D, bias_D)


def _normalize_bwd(center, eps, res, dy_TxD):
  """dx = rstd (g - xhat mean(g xhat) - mean(g)) with g = dy * scale (RMSNorm: without the last
  term): the gradient through the row statistics, whose row means are again `_row_mean`."""
  del eps
  xhat_TxD, rstd_T, scale_D, bias_D = res
  dxhat_TxD = dy_TxD * scale_D
  g_TxD = dxhat_TxD - xhat_TxD * _row_mean(dxhat_TxD * xhat_TxD)[:, None]
  if center:
    g_TxD = g_TxD - _row_mean(dxhat_TxD)[:, None]
  dbias = None if bias_D is None else _column_sum(dy_TxD)
  return rstd_T[:, None] * g_TxD, _column_sum(dy_TxD * xhat_TxD).astype(scale_D.dtype), (
      None if dbias is None else dbias.astype(bias_D.dtype))


normalize.defvjp(_normalize_fwd, _normalize_bwd)


# ----------------------------------------------------------------------------------------------
# Attention: heads-first einsums (batched matmuls need no transposes), a FlashAttention-style
# backward, causal key blocks skipped.

def scores(q_BxKxGxTxH, k, mask_Bx1xTxS, k_layout='bksh'):
  """Softmax numerators and denominators of the masked, scaled scores: (e [B, K, G, T, S],
  l [B, K, G, T]), float32. e = exp(s - max s) (1 at masked keys of fully masked rows). k: [B, K,
  S, H], or [B, K, H, S] with k_layout 'bkhs'."""
  s = jnp.einsum(f'bkgth,{k_layout}->bkgts', q_BxKxGxTxH, k, preferred_element_type=jnp.float32)
  s = s * q_BxKxGxTxH.shape[-1] ** -0.5 + jnp.where(mask_Bx1xTxS, 0.0, -1e30)[:, :, None]
  e = jnp.exp(s - s.max(-1, keepdims=True))
  return e, e.sum(-1)


@jax.custom_vjp
def _attend(q, k, v, mask):
  """softmax(q k^T / sqrt(H) + mask) v, heads first: q [B, K, G, T, H], k/v [B, K, S, H],
  mask [B, 1, T, S] -> [B, K, G, T, H]."""
  return attend_fwd(q, k, v, mask)[0]


def attend_fwd(q, k, v, mask, k_layout='bksh'):
  """`_attend`'s output and residuals; k [B, K, H, S] with k_layout 'bkhs' (the decode cache)."""
  e, l = scores(q, k, mask, k_layout)
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
  # step (b)'s attention products, each timed alone: 172 -> 116 ms; steps (b)-(d) ~2% faster).
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


_attend.defvjp(attend_fwd, _attend_bwd)


def group_heads(q_BxTxNxH: jnp.ndarray, kv_heads: int) -> jnp.ndarray:
  """[B, T, N, H] -> [B, K, G, T, H]: query head n = k * G + g reads key/value head k."""
  b, t, n, h = q_BxTxNxH.shape
  return q_BxTxNxH.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)


def merge_heads(o_BxKxGxTxH: jnp.ndarray) -> jnp.ndarray:
  """The inverse of `group_heads`: [B, K, G, T, H] -> [B, T, N, H]."""
  b, k, g, t, h = o_BxKxGxTxH.shape
  return o_BxKxGxTxH.transpose(0, 3, 1, 2, 4).reshape(b, t, k * g, h)


def einsum_attention(q_BxTxNxH: jnp.ndarray, k_BxSxKxH: jnp.ndarray, v_BxSxKxH: jnp.ndarray,
                     mask_Bx1xTxS: jnp.ndarray, causal: bool = False) -> jnp.ndarray:
  """softmax(q k^T / sqrt(H), masked) v -> [B, T, N, H] (see attention.dot_product_attention).
  `causal`: the blocks of keys wholly after a block of CAUSAL_BLOCK queries are skipped."""
  t = q_BxTxNxH.shape[1]
  q_BxKxGxTxH = group_heads(q_BxTxNxH, k_BxSxKxH.shape[2])
  k_BxKxSxH, v_BxKxSxH = k_BxSxKxH.transpose(0, 2, 1, 3), v_BxSxKxH.transpose(0, 2, 1, 3)
  step = CAUSAL_BLOCK if causal else t
  outs = []
  for i in range(0, t, step):  # Queries i..j-1 see keys 0..j-1 at most (all when not causal).
    j = min(t, i + step)
    s = j if causal else k_BxSxKxH.shape[1]
    outs.append(_attend(q_BxKxGxTxH[:, :, :, i:j], k_BxKxSxH[:, :, :s], v_BxKxSxH[:, :, :s],
                        mask_Bx1xTxS[:, :, i:j, :s]))
  return merge_heads(jnp.concatenate(outs, axis=3))
