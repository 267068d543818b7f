"""Transformer blocks and the decoder-only language model (GPT)."""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from research.nn.attention import Attention, attention_mask
from research.nn.config import ModelConfig
from research.nn.ffn import FeedForward
from research.nn.moe import MoE
from research.nn.position import sinusoidal_table

Cache = dict[str, Any]  # {'index': [], 'pos'/'seg': [batch, len], 'layers': {block_i: {'k', 'v'}}}


def make_norm(cfg: ModelConfig, name: str) -> nn.Module:
  cls = nn.LayerNorm if cfg.norm == 'layernorm' else nn.RMSNorm
  return cls(dtype=cfg.dtype, name=name)


class Block(nn.Module):
  """Self-attention then feed-forward (a mixture of experts if `moe`), each wrapped in a residual;
  norms pre or post."""
  cfg: ModelConfig
  moe: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray, positions: jnp.ndarray,
               cache: Optional[dict] = None, cache_index: Optional[jnp.ndarray] = None,
               deterministic: bool = True, token_mask: Optional[jnp.ndarray] = None
               ) -> tuple[jnp.ndarray, Optional[dict]]:
    """x: [batch, seq, d_model]; mask: [batch, 1, seq, keys]; token_mask: [batch, seq], 0 for
    padding (the MoE routes only the others; default all 1). Returns (x, this layer's new cache)."""
    cfg = self.cfg
    out_scale = 1.0 / np.sqrt(2 * cfg.num_layers)  # GPT-2: residual branches start small.
    drop = nn.Dropout(cfg.dropout, deterministic=deterministic)
    pre = cfg.norm_position == 'pre'
    h = make_norm(cfg, 'ln_attn')(x) if pre else x
    h, cache = Attention(cfg, out_scale, name='attn')(h, mask, positions, cache=cache,
                                                      cache_index=cache_index)
    x = x + drop(h)
    if not pre:
      x = make_norm(cfg, 'ln_attn')(x)
    h = make_norm(cfg, 'ln_ffn')(x) if pre else x
    if self.moe:
      token_mask = jnp.ones(x.shape[:2], bool) if token_mask is None else token_mask
      h = MoE(cfg, out_scale, name='moe')(h, token_mask, deterministic)
    else:
      h = FeedForward(cfg, out_scale, name='ffn')(h)
    x = x + drop(h)
    if not pre:
      x = make_norm(cfg, 'ln_ffn')(x)
    return x, cache


def init_cache(cfg: ModelConfig, batch: int, length: int) -> Cache:
  """An empty KV cache of `length` slots (all segment 0 = empty)."""
  kv = jnp.zeros((batch, length, cfg.kv_heads, cfg.head_dim), cfg.dtype)
  return {'index': jnp.zeros((), jnp.int32),
          'pos': jnp.zeros((batch, length), jnp.int32),
          'seg': jnp.zeros((batch, length), jnp.int32),
          'layers': {f'block_{i}': {'k': kv, 'v': kv} for i in range(cfg.num_layers)}}


class DecoderLM(nn.Module):
  """GPT: token (+ position) embedding, causal blocks, final norm, (tied) unembedding."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, positions: Optional[jnp.ndarray] = None,
               segment_ids: Optional[jnp.ndarray] = None, cache: Optional[Cache] = None,
               deterministic: bool = True) -> tuple[jnp.ndarray, Optional[Cache]]:
    """tokens: int [batch, seq] -> float32 logits [batch, seq, vocab].

    positions: [batch, seq] (default 0..seq-1); segment_ids: [batch, seq], 0 marks padding and
    packed examples carry distinct ids (default all 1). With a cache (see `init_cache`) the tokens
    are appended at slot cache['index'] and the new cache is returned; else the cache is None.
    """
    cfg = self.cfg
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    if cache is None:
      k_pos, k_seg, index = positions, segment_ids, None
    else:
      index = cache['index']
      k_pos = jax.lax.dynamic_update_slice_in_dim(cache['pos'], positions, index, axis=1)
      k_seg = jax.lax.dynamic_update_slice_in_dim(cache['seg'], segment_ids, index, axis=1)
    mask = attention_mask(positions, segment_ids, k_pos, k_seg, causal=True)

    embed = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=nn.initializers.normal(0.02),
                     name='embed')
    x = embed(tokens).astype(cfg.dtype)
    clipped = jnp.clip(positions, 0, cfg.max_len - 1)
    if cfg.pos_encoding == 'learned':
      x += nn.Embed(cfg.max_len, cfg.d_model, embedding_init=nn.initializers.normal(0.01),
                    name='pos_embed')(clipped).astype(cfg.dtype)
    elif cfg.pos_encoding == 'sinusoidal':
      x += jnp.asarray(sinusoidal_table(cfg.max_len, cfg.d_model))[clipped].astype(cfg.dtype)
    x = nn.Dropout(cfg.dropout, deterministic=deterministic)(x)

    new_layers = {}
    for i in range(cfg.num_layers):
      name = f'block_{i}'
      layer_cache = None if cache is None else cache['layers'][name]
      x, new_layers[name] = Block(cfg, cfg.is_moe_layer(i), name=name)(
          x, mask, positions, layer_cache, index, deterministic, segment_ids > 0)
    if cfg.norm_position == 'pre':
      x = make_norm(cfg, 'ln_final')(x)
    x2d = x.reshape(b * t, cfg.d_model)
    if cfg.tie_embeddings:
      logits = embed.attend(x2d)
    else:
      logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.dtype, name='unembed',
                        kernel_init=nn.initializers.normal(0.02))(x2d)
    logits = logits.reshape(b, t, cfg.vocab_size).astype(jnp.float32)
    if cache is not None:
      cache = {'index': index + t, 'pos': k_pos, 'seg': k_seg, 'layers': new_layers}
    return logits, cache
