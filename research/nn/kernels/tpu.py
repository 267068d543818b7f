"""TPU kernels: splash attention (Pallas; jax.experimental.pallas.ops.tpu), a flash attention
that never materialises the [T, S] scores and skips the key blocks a causal mask hides."""

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

from research.nn.partitioning import logical_spec


def _block(n: int) -> int:
  """The largest of 512, 256, 128 that divides n (n is a multiple of 128)."""
  return next(b for b in (512, 256, 128) if n % b == 0)


def _kernel(heads: int, t: int, s: int, causal: bool):
  mask = masks.MultiHeadMask([masks.CausalMask((t, s)) if causal else masks.FullMask((t, s))]
                             * heads)
  bq, bk = _block(t), _block(s)
  sizes = splash.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                            block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq,
                            block_kv_dq=bk)
  return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1)


def splash_attention(q_BxTxNxH: jnp.ndarray, k_BxSxKxH: jnp.ndarray, v_BxSxKxH: jnp.ndarray,
                     q_seg_BxT: jnp.ndarray, k_seg_BxS: jnp.ndarray, causal: bool
                     ) -> jnp.ndarray:
  """softmax(q k^T / sqrt(H)) v over keys of the query's own segment (and, with `causal`, at or
  before its index) -> [B, T, N, H]. T and S: multiples of 128. Under a mesh (see
  nn/partitioning.py) each device runs the kernel on its rows and heads (shard_map)."""
  h = q_BxTxNxH.shape[-1]
  q_BxNxTxH = (q_BxTxNxH * h**-0.5).transpose(0, 2, 1, 3)
  k_BxKxSxH, v_BxKxSxH = k_BxSxKxH.transpose(0, 2, 1, 3), v_BxSxKxH.transpose(0, 2, 1, 3)
  q_spec = logical_spec(q_BxNxTxH.shape, ('batch', 'heads', None, None))
  k_spec = logical_spec(k_BxKxSxH.shape, ('batch', 'kv_heads', None, None))

  def local(q, k, v, q_seg, k_seg):
    kernel = _kernel(q.shape[1], q.shape[2], k.shape[2], causal)
    return jax.vmap(lambda *a: kernel(*a[:3], segment_ids=splash.SegmentIds(*a[3:])))(
        q, k, v, q_seg, k_seg)

  if q_spec is None:
    out = local(q_BxNxTxH, k_BxKxSxH, v_BxKxSxH, q_seg_BxT, k_seg_BxS)
  else:
    if q_spec[1] is not None and k_spec[1] != q_spec[1]:  # Fewer kv heads than head shards.
      g = q_BxNxTxH.shape[1] // k_BxKxSxH.shape[1]
      k_BxKxSxH, v_BxKxSxH = (jnp.repeat(x, g, axis=1) for x in (k_BxKxSxH, v_BxKxSxH))
      k_spec = q_spec
    seg_spec = jax.sharding.PartitionSpec(q_spec[0], None)
    out = jax.shard_map(local, in_specs=(q_spec, k_spec, k_spec, seg_spec, seg_spec),
                        out_specs=q_spec, check_vma=False)(
                            q_BxNxTxH, k_BxKxSxH, v_BxKxSxH, q_seg_BxT, k_seg_BxS)
  return out.transpose(0, 2, 1, 3)
