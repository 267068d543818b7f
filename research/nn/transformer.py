"""Transformer blocks and the three model families: decoder-only (GPT, `DecoderLM`), encoder-only
(BERT, `EncoderLM`) and encoder-decoder (Vaswani et al. 2017: `DecoderLM` with family
'encoder_decoder', whose blocks cross-attend to an `Encoder` over the source)."""

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from research.nn import attention
from research.nn import kernels
from research.nn.attention import Attention, attention_mask, dense, empty_cache
from research.nn.config import ModelConfig
from research.nn.ffn import FeedForward
from research.nn.moe import MoE
from research.nn.norm import Norm
from research.nn.partitioning import constrain
from research.nn.position import sinusoidal_table

# {'index': [], 'pos'/'seg': [batch, len], 'layers': {block_i: the self-attention's keys/values
# (attention.KVCache)}}; encoder-decoder models
# add the source's segment ids 'memory_seg' [batch, src_len] and, in every block, its
# cross-attention keys/values 'cross': {'k', 'v'} [batch, src_len, kv_heads, head_dim].
Cache = dict[str, Any]


def make_norm(cfg: ModelConfig, name: str) -> Norm:
  """LayerNorm or RMSNorm (cfg.norm), as a child `name` of the calling compact module."""
  return Norm(center=cfg.norm == 'layernorm', eps=cfg.norm_eps, dtype=cfg.dtype,
              param_dtype=cfg.param_dtype,
              cpu_kernel=kernels.cpu_norm(cfg), name=name)


RESIDUAL = ('batch', 'length', 'embed')  # Logical axes of the residual stream.


class Block(nn.Module):
  """Self-attention, cross-attention (when given a source), then feed-forward (a mixture of experts
  if `moe`), each wrapped in a residual; norms pre or post. `causal`: the self-attention mask
  hides every later key (see attention.dot_product_attention). `deterministic`: no dropout or
  router noise."""
  cfg: ModelConfig
  moe: bool = False
  causal: bool = False
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray, positions: jnp.ndarray,
               segment_ids: jnp.ndarray, cache: Optional[dict] = None,
               cache_index: Optional[jnp.ndarray] = None, source: Optional[jnp.ndarray] = None,
               source_mask: Optional[jnp.ndarray] = None) -> tuple[jnp.ndarray, Optional[dict]]:
    """x: [batch, seq, d_model]; mask: [batch, 1, seq, keys]; positions, segment_ids: [batch, seq]
    (segment 0 is padding, which the MoE does not route). source_mask [batch, 1, seq, src_len]
    adds cross-attention to source [batch, src_len, d_model] (an encoder's output); with a cache,
    the source's keys/values are kept in it (cache['cross']), so later calls pass no source.
    Returns (x, this layer's new cache)."""
    cfg = self.cfg
    out_scale = 1.0 / np.sqrt(2 * cfg.num_layers)  # GPT-2: residual branches start small.
    drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
    pre = cfg.norm_position == 'pre'
    x = constrain(x, RESIDUAL)
    h = make_norm(cfg, 'ln_attn')(x) if pre else x
    h, new_cache = Attention(cfg, out_scale, name='attn')(
        h, mask, positions, cache=cache, cache_index=cache_index, causal=self.causal,
        segment_ids=segment_ids)
    x = x + drop(h)
    if not pre:
      x = make_norm(cfg, 'ln_attn')(x)
    if source_mask is not None:
      h = make_norm(cfg, 'ln_cross')(x) if pre else x
      cross_cache = None if source is not None or cache is None else cache['cross']
      h, cross_kv = Attention(cfg, out_scale, cross=True, name='cross_attn')(
          h, source_mask, positions, source=source, cache=cross_cache)
      if cache is not None:
        new_cache = dict(new_cache, cross=cross_kv)
      x = x + drop(h)
      if not pre:
        x = make_norm(cfg, 'ln_cross')(x)
    h = make_norm(cfg, 'ln_ffn')(x) if pre else x
    if self.moe:
      h = MoE(cfg, out_scale, name='moe')(h, segment_ids > 0, self.deterministic)
    else:
      h = FeedForward(cfg, out_scale, name='ffn')(h)
    x = x + drop(h)
    if not pre:
      x = make_norm(cfg, 'ln_ffn')(x)
    return constrain(x, RESIDUAL), new_cache


REMAT_POLICIES = {'full': None, 'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
SCANNED = 'blocks'  # The name of the scanned blocks (parameters [num_layers, ...]).


def blocks(cfg: ModelConfig, x: jnp.ndarray, mask: jnp.ndarray, positions: jnp.ndarray,
           segment_ids: jnp.ndarray, caches: Optional[dict] = None,
           cache_index: Optional[jnp.ndarray] = None, source: Optional[jnp.ndarray] = None,
           source_mask: Optional[jnp.ndarray] = None, causal: bool = False,
           deterministic: bool = True) -> tuple[jnp.ndarray, Optional[dict]]:
  """cfg.num_layers `Block`s over x [batch, seq, d_model], created in the calling compact module:
  'block_0', 'block_1', ... or, with cfg.scan_layers, one scanned 'blocks'; each in
  jax.checkpoint under cfg.remat. caches: the layers' caches ({'block_i': ...}, or stacked on a
  leading layer axis when scanned). Returns (x, the new caches or None)."""
  cls = Block
  if cfg.remat != 'none':
    cls = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
  args = (mask, positions, segment_ids, caches, cache_index, source, source_mask)
  if cfg.scan_layers:
    stack = nn.scan(cls, variable_axes={'params': 0, 'intermediates': 0},
                    split_rngs={'params': True, 'dropout': True}, length=cfg.num_layers,
                    in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast,
                             nn.broadcast, nn.broadcast))
    return stack(cfg, cfg.moe_every == 1, causal, deterministic, name=SCANNED)(x, *args)
  new_caches = {}
  for i in range(cfg.num_layers):
    name = f'block_{i}'
    x, new_caches[name] = cls(cfg, cfg.is_moe_layer(i), causal, deterministic, name=name)(
        x, mask, positions, segment_ids, None if caches is None else caches[name],
        *args[4:])
  return x, None if caches is None else new_caches


def to_layout(params: Any, scan_layers: bool) -> Any:
  """`params` (of any model here, nested anywhere) with their blocks in the given layout:
  stacked under 'blocks' (scan_layers) or one 'block_i' per layer."""
  if not isinstance(params, dict):
    return params
  params = {k: to_layout(v, scan_layers) for k, v in params.items()}
  layers = sorted((k for k in params if k.startswith('block_')), key=lambda k: int(k[6:]))
  if scan_layers and layers:
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(params.pop(k) for k in layers))
    params[SCANNED] = stacked
  elif not scan_layers and SCANNED in params:
    stacked = params.pop(SCANNED)
    n = jax.tree.leaves(stacked)[0].shape[0]
    params.update({f'block_{i}': jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)})
  return params


def init_cache(cfg: ModelConfig, batch: int, length: int) -> Cache:
  """An empty KV cache of `length` slots (all segment 0 = empty); with cfg.scan_layers the
  layers' caches are stacked on a leading layer axis."""
  layer = empty_cache(cfg, batch, length)
  if cfg.scan_layers:
    layers = jax.tree.map(lambda x: jnp.broadcast_to(x, (cfg.num_layers, *x.shape)), layer)
  else:
    layers = {f'block_{i}': layer for i in range(cfg.num_layers)}
  return {'index': jnp.zeros((), jnp.int32),
          'pos': jnp.zeros((batch, length), jnp.int32),
          'seg': jnp.zeros((batch, length), jnp.int32),
          'layers': layers}


def take_cache_rows(cfg: ModelConfig, cache: Cache, rows: jnp.ndarray,
                    source: bool = True) -> Cache:
  """The cache of the batch rows `rows` (int [m], repeats allowed) of `cache`, in the layout
  `init_cache` gives batch m (see attention.empty_cache). source=False leaves the source's
  entries (encoder-decoder: 'memory_seg' and the blocks' 'cross' keys/values) as they are, for a
  reordering within groups of rows that share a source (beam search)."""
  batch = cache['pos'].shape[0]
  take = lambda x: x[rows]

  def layer(c):
    out = attention.take_cache_rows(c, rows, batch, cfg.kv_heads)
    if 'cross' in c and source:
      out['cross'] = jax.tree.map(take, c['cross'])
    return out

  out = {'index': cache['index'], 'pos': take(cache['pos']), 'seg': take(cache['seg']),
         'layers': {name: layer(c) for name, c in cache['layers'].items()}}
  if 'memory_seg' in cache:
    out['memory_seg'] = take(cache['memory_seg']) if source else cache['memory_seg']
  return out


def default_layout(tokens: jnp.ndarray, positions: Optional[jnp.ndarray],
                   segment_ids: Optional[jnp.ndarray]) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(positions, segment_ids) of tokens [batch, seq]: the given ones, else 0..seq-1 and all 1."""
  b, t = tokens.shape
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  if segment_ids is None:
    segment_ids = jnp.ones((b, t), jnp.int32)
  return positions, segment_ids


def embedding(cfg: ModelConfig) -> tuple[nn.Embed, Callable[..., jnp.ndarray]]:
  """Creates, in the calling compact module, the token embedding 'embed' (and 'pos_embed' for
  learned positions). Returns (embed, fn): fn(tokens, positions), both int [batch, seq], gives
  token + position embeddings [batch, seq, d_model]."""
  embed = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=nn.initializers.normal(0.02),
                   dtype=jnp.float32, param_dtype=cfg.param_dtype, name='embed')
  pos_embed = (nn.Embed(cfg.max_len, cfg.d_model, embedding_init=nn.initializers.normal(0.01),
                        param_dtype=cfg.param_dtype, name='pos_embed')
               if cfg.pos_encoding == 'learned' else None)

  def embed_fn(tokens: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
    x = embed(tokens).astype(cfg.dtype)
    clipped = jnp.clip(positions, 0, cfg.max_len - 1)
    if pos_embed is not None:
      x += pos_embed(clipped).astype(cfg.dtype)
    elif cfg.pos_encoding == 'sinusoidal':
      # The fixed table's entries are O(1) while token embeddings start at std 0.02: unscaled,
      # position swamps identity (pretrain_small stayed at the unigram loss). Vaswani et al. scale
      # the embeddings by sqrt(d_model).
      x = x * cfg.d_model**0.5 + jnp.asarray(
          sinusoidal_table(cfg.max_len, cfg.d_model))[clipped].astype(cfg.dtype)
    return constrain(x, RESIDUAL)

  return embed, embed_fn


def unembed(cfg: ModelConfig, embed: nn.Embed, x: jnp.ndarray) -> jnp.ndarray:
  """Hidden states [batch, seq, d_model] -> float32 logits [batch, seq, vocab], through the tied
  embedding or (created in the calling compact module) a separate matrix 'unembed'; computed in
  float32 either way (in bfloat16, logits of magnitude 8-16 would be rounded to steps of 1/16)."""
  b, t, _ = x.shape
  x2d = x.reshape(b * t, cfg.d_model)
  if cfg.tie_embeddings:
    logits = embed.attend(x2d)
  else:
    logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=jnp.float32, name='unembed',
                      param_dtype=cfg.param_dtype, kernel_init=nn.initializers.normal(0.02))(x2d)
  return constrain(logits.reshape(b, t, cfg.vocab_size).astype(jnp.float32),
                   ('batch', 'length', 'vocab'))


def unembedding(cfg: ModelConfig, params: Any) -> jnp.ndarray:
  """The [d_model, vocab] matrix of `unembed` in a decoder's `params`: the tied embedding's
  transpose or the separate 'unembed' kernel."""
  if cfg.tie_embeddings:
    return params['embed']['embedding'].T
  return params['unembed']['kernel']


class Encoder(nn.Module):
  """Bidirectional blocks, then the final norm (pre-norm): BERT's body and the encoder of the
  encoder-decoder."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jnp.ndarray, positions: jnp.ndarray, segment_ids: jnp.ndarray,
               deterministic: bool = True) -> jnp.ndarray:
    """x: embedded tokens [batch, seq, d_model] -> [batch, seq, d_model]. positions and
    segment_ids: [batch, seq]; a token sees every token of its own segment (0 = padding)."""
    cfg = self.cfg
    mask = attention_mask(positions, segment_ids, positions, segment_ids, causal=False)
    x, _ = blocks(cfg, x, mask, positions, segment_ids, deterministic=deterministic)
    if cfg.norm_position == 'pre':
      x = make_norm(cfg, 'ln_final')(x)
    return x


class EncoderLM(nn.Module):
  """BERT (Devlin et al. 2019): token (+ position) embedding, bidirectional blocks, (tied)
  unembedding for masked-token prediction. With `next_sentence`, also a pooler (tanh of a dense
  layer over the first token, `<cls>`) and a 2-way is-next-sentence classifier.

  The masked-LM head is the unembedding alone: BERT's dense + GELU + LayerNorm transform and
  output bias before it learned slower in bert_mlm_small (masked-token accuracy 0.404 instead of
  0.527 at step 500, 2026-12-03)."""
  cfg: ModelConfig
  next_sentence: bool = False

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, positions: Optional[jnp.ndarray] = None,
               segment_ids: Optional[jnp.ndarray] = None, deterministic: bool = True
               ) -> tuple[jnp.ndarray, Optional[jnp.ndarray]]:
    """tokens: int [batch, seq] -> (float32 logits [batch, seq, vocab], next-sentence logits
    [batch, 2] or None). positions, segment_ids: as for DecoderLM."""
    cfg = self.cfg
    positions, segment_ids = default_layout(tokens, positions, segment_ids)
    embed, embed_fn = embedding(cfg)
    x = nn.Dropout(cfg.dropout, deterministic=deterministic)(embed_fn(tokens, positions))
    x = Encoder(cfg, name='encoder')(x, positions, segment_ids, deterministic)
    logits = unembed(cfg, embed, x)
    if not self.next_sentence:
      return logits, None
    pooled = jnp.tanh(dense(x[:, 0], cfg.d_model, cfg, 'pooler'))
    return logits, dense(pooled, 2, cfg, 'next_sentence').astype(jnp.float32)


class DecoderLM(nn.Module):
  """GPT: token (+ position) embedding, causal blocks, final norm, (tied) unembedding.

  With model.family 'encoder_decoder' (Vaswani et al. 2017), an `Encoder` reads a source through
  the same embedding and every block cross-attends to its output.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, positions: Optional[jnp.ndarray] = None,
               segment_ids: Optional[jnp.ndarray] = None, cache: Optional[Cache] = None,
               deterministic: bool = True, source: Optional[jnp.ndarray] = None,
               source_segment_ids: Optional[jnp.ndarray] = None, features: bool = False
               ) -> tuple[jnp.ndarray, Optional[Cache]]:
    """tokens: int [batch, seq] -> float32 logits [batch, seq, vocab] (with `features`: the final
    hidden states [batch, seq, d_model] instead, for a head of another kind, see `ScalarLM`).

    positions: [batch, seq] (default 0..seq-1); segment_ids: [batch, seq], 0 marks padding and
    packed examples carry distinct ids (default all 1). With a cache (see `init_cache`) the tokens
    are appended at slot cache['index'] and the new cache is returned; else the cache is None.
    source: int [batch, src_len] (encoder-decoder only): one example per row, padded on either side
    (source_segment_ids 0; default all 1), at positions 0, 1, ... over its other tokens. A token
    attends to the source tokens of its own segment id. With a cache, every block keeps the
    source's cross-attention keys/values in it (and the cache its segment ids), so later calls
    pass no source and the source is encoded and projected once.
    """
    cfg = self.cfg
    t = tokens.shape[1]
    positions, segment_ids = default_layout(tokens, positions, segment_ids)
    if cache is None:
      k_pos, k_seg, index = positions, segment_ids, None
    else:
      index = cache['index']
      k_pos = jax.lax.dynamic_update_slice_in_dim(cache['pos'], positions, index, axis=1)
      k_seg = jax.lax.dynamic_update_slice_in_dim(cache['seg'], segment_ids, index, axis=1)
    mask = attention_mask(positions, segment_ids, k_pos, k_seg, causal=True,
                          window=cfg.sliding_window)

    embed, embed_fn = embedding(cfg)
    x = nn.Dropout(cfg.dropout, deterministic=deterministic)(embed_fn(tokens, positions))
    memory = memory_seg = cross_mask = None
    if source is not None:
      _, memory_seg = default_layout(source, None, source_segment_ids)
      source_positions = jnp.maximum(jnp.cumsum(memory_seg > 0, axis=1) - 1, 0)
      src = nn.Dropout(cfg.dropout, deterministic=deterministic)(embed_fn(source, source_positions))
      memory = Encoder(cfg, name='encoder')(src, source_positions, memory_seg, deterministic)
    elif cache is not None and 'memory_seg' in cache:
      memory_seg = cache['memory_seg']  # The blocks' caches hold the keys/values.
    if (memory_seg is not None) != (cfg.family == 'encoder_decoder'):
      raise ValueError(f'model.family={cfg.family!r}: a source (or a cache holding its encoding) '
                       'is required for encoder_decoder and refused otherwise.')
    if memory_seg is not None:
      cross_mask = attention_mask(positions, segment_ids, None, memory_seg, causal=False)

    x, new_layers = blocks(cfg, x, mask, positions, segment_ids,
                           None if cache is None else cache['layers'], index, memory, cross_mask,
                           causal=cache is None, deterministic=deterministic)
    if cfg.norm_position == 'pre':
      x = make_norm(cfg, 'ln_final')(x)
    logits = x if features else unembed(cfg, embed, x)
    if cache is not None:
      cache = {'index': index + t, 'pos': k_pos, 'seg': k_seg, 'layers': new_layers}
      if memory_seg is not None:
        cache['memory_seg'] = memory_seg
    return logits, cache


class ScalarLM(nn.Module):
  """A decoder (submodule 'lm', the parameters of a `DecoderLM`) with a scalar head 'head' on its
  final hidden states: the reward model and the PPO value function."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, positions: Optional[jnp.ndarray] = None,
               segment_ids: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """tokens: int [batch, seq] -> float32 scalars [batch, seq] (one per prefix); positions and
    segment_ids as for DecoderLM."""
    x, _ = DecoderLM(self.cfg, name='lm')(tokens, positions, segment_ids, features=True)
    return scalar_head(self.cfg, name='head')(x.astype(jnp.float32))[..., 0]


def scalar_head(cfg: ModelConfig, name: Optional[str] = None) -> nn.Dense:
  """d_model -> 1, initialised as in Stiennon et al. 2020 (std 1 / sqrt(d_model + 1))."""
  return nn.Dense(1, kernel_init=nn.initializers.normal(1 / np.sqrt(cfg.d_model + 1)), name=name)


def init_scalar_head(cfg: ModelConfig, key: jax.Array, lm_params: Any) -> Any:
  """`ScalarLM` parameters: a decoder's (e.g. an SFT policy's; an untied unembedding is dropped)
  and a fresh head."""
  return {'lm': {k: v for k, v in lm_params.items() if k != 'unembed'},
          'head': scalar_head(cfg).init(key, jnp.zeros((1, cfg.d_model), jnp.float32))['params']}


def init_decoder(model: DecoderLM, key: jax.Array, seq_len: int = 1) -> Any:
  """Fresh parameters of `model` (with the encoder for model.family 'encoder_decoder')."""
  dummy = jnp.zeros((1, seq_len), jnp.int32)
  source = dummy if model.cfg.family == 'encoder_decoder' else None
  return model.init(key, dummy, source=source)['params']
