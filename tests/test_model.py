"""DecoderLM: shapes, causality, and the architecture switches."""

import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from research.errors import UserError
from research.nn import attention
from research.nn.kernels import cpu
from research.nn.config import ModelConfig
from research.nn.position import apply_rope
from research.nn.transformer import DecoderLM, embedding
from research.train import lm

VOCAB, B, T = 37, 2, 12


def build(**kw):
  cfg = ModelConfig(vocab_size=VOCAB, num_layers=2, num_heads=4, d_model=32, max_len=16, **kw)
  model = DecoderLM(cfg)
  tokens = jax.random.randint(jax.random.key(0), (B, T), 0, VOCAB)
  params = model.init(jax.random.key(1), tokens)['params']
  return model, params, tokens


@pytest.mark.parametrize('tie', [True, False])
def test_bfloat16_models_give_float32_logits_of_the_hidden_states(tie):
  """Tied or not, the unembedding runs in float32 on the bfloat16 final hidden states."""
  model, params, tokens = build(dtype='bfloat16', tie_embeddings=tie)
  logits = model.apply({'params': params}, tokens)[0]
  hidden = model.apply({'params': params}, tokens, features=True)[0]
  w = params['embed']['embedding'].T if tie else params['unembed']['kernel']
  want = np.asarray(hidden, np.float32) @ np.asarray(w, np.float32)
  np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-5, atol=1e-6)


# Every choice of every switch appears at least once.
VARIANTS = [dict(pos_encoding=p, norm=n, norm_position=np_, ffn=f) for p, n, np_, f in [
    ('learned', 'layernorm', 'pre', 'relu'), ('sinusoidal', 'rmsnorm', 'post', 'gelu'),
    ('rope', 'layernorm', 'post', 'swiglu'), ('rope', 'rmsnorm', 'pre', 'gelu')]]


@pytest.mark.parametrize('kw', VARIANTS + [dict(num_kv_heads=1), dict(tie_embeddings=False)])
def test_shapes_and_causality(kw):
  model, params, tokens = build(**kw)
  logits, cache = model.apply({'params': params}, tokens)
  assert logits.shape == (B, T, VOCAB) and logits.dtype == jnp.float32 and cache is None
  assert np.isfinite(np.asarray(logits)).all()
  t = 7
  changed = tokens.at[:, t].set((tokens[:, t] + 1) % VOCAB)
  new_logits, _ = model.apply({'params': params}, changed)
  diff = np.abs(np.asarray(new_logits - logits)).max(axis=(0, 2))
  assert (diff[:t] == 0).all(), 'a change at position t leaked into earlier logits'
  assert (diff[t:] > 0).all()


def test_causality_through_gradients():
  """d logits[t] / d embedding rows: zero for rows used only after t, non-zero up to t."""
  model, params, _ = build(tie_embeddings=False)
  tokens = jnp.arange(T)[None]  # Distinct tokens: embedding row i is used at position i only.
  t = 5

  def logit_sum(embedding):
    p = {**params, 'embed': {'embedding': embedding}}
    return model.apply({'params': p}, tokens)[0][0, t].sum()

  grad = np.abs(np.asarray(jax.grad(logit_sum)(params['embed']['embedding']))).max(axis=1)
  assert (grad[:t + 1] > 0).all() and (grad[t + 1:T] == 0).all()


def test_gqa_with_all_heads_equals_mha():
  model, params, tokens = build()
  model_gqa, _, _ = build(num_kv_heads=4)
  a, _ = model.apply({'params': params}, tokens)
  b, _ = model_gqa.apply({'params': params}, tokens)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_rope_scores_depend_on_relative_position():
  q = jax.random.normal(jax.random.key(2), (1, 1, 1, 8))
  k = jax.random.normal(jax.random.key(3), (1, 1, 1, 8))
  def score(pq, pk):
    return float((apply_rope(q, jnp.array([[pq]])) * apply_rope(k, jnp.array([[pk]]))).sum())
  assert score(3, 1) == pytest.approx(score(10, 8), abs=1e-5)
  assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-3)


def test_sinusoidal_positions_are_added_to_embeddings_scaled_by_sqrt_width():
  """Vaswani et al. 2017, section 3.5: PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(..),
  added to the token embeddings multiplied by sqrt(d)."""
  cfg = ModelConfig(vocab_size=VOCAB, num_layers=1, num_heads=4, d_model=32, max_len=16,
                    pos_encoding='sinusoidal')

  class Embeddings(nn.Module):
    @nn.compact
    def __call__(self, tokens, positions):
      return embedding(cfg)[1](tokens, positions)

  tokens = jax.random.randint(jax.random.key(0), (B, T), 0, VOCAB)
  positions = jnp.stack([jnp.arange(T), jnp.arange(T) + 3])
  params = Embeddings().init(jax.random.key(1), tokens, positions)['params']
  got = Embeddings().apply({'params': params}, tokens, positions)
  pe = np.zeros((cfg.max_len, cfg.d_model))
  for p in range(cfg.max_len):
    for i in range(cfg.d_model // 2):
      pe[p, 2 * i] = np.sin(p / 10000 ** (2 * i / cfg.d_model))
      pe[p, 2 * i + 1] = np.cos(p / 10000 ** (2 * i / cfg.d_model))
  want = np.asarray(params['embed']['embedding'])[tokens] * np.sqrt(cfg.d_model) + pe[positions]
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize('kw, words', [
    (dict(d_model=30, num_heads=4), 'not divisible'),
    (dict(num_kv_heads=3), 'num_kv_heads'),
    (dict(pos_encoding='alibi'), 'pos_encoding'),
    (dict(ffn='tanh'), 'model.ffn'),
    (dict(attention='cudnn'), 'bfloat16'),
    (dict(attention='cudnn', dtype='bfloat16'), 'needs a GPU'),
])
def test_impossible_configs(kw, words):
  base = dict(vocab_size=VOCAB, num_layers=1, num_heads=4, d_model=32)
  with pytest.raises(UserError, match=words):
    ModelConfig(**{**base, **kw})


def attention_and_grads(fn, q, k, v, cotangent):
  out, vjp = jax.vjp(fn, q, k, v)
  return (out, *vjp(cotangent))


@pytest.mark.parametrize('kv_heads, causal', [(4, False), (2, False), (1, False), (2, True)])
def test_einsum_attention_and_its_gradients_equal_jax(kv_heads, causal, monkeypatch):
  """Ours (hand-written backward; with `causal`, key blocks after a query block skipped) against
  jax.nn.dot_product_attention's XLA implementation, on packed rows (two segments + padding)."""
  monkeypatch.setattr(cpu, 'CAUSAL_BLOCK', 4)  # T = 10: blocks of 4, 4 and 2 queries.
  b, t, n, h = 2, 10, 4, 8
  q, k, v, cot = (jax.random.normal(jax.random.key(i), shape) for i, shape in enumerate(
      [(b, t, n, h), (b, t, kv_heads, h), (b, t, kv_heads, h), (b, t, n, h)]))
  seg = jnp.array([[1] * 6 + [2] * 4, [1] * 7 + [0] * 3])
  pos = jnp.array([list(range(6)) + list(range(4)), list(range(10))])
  mask = attention.attention_mask(pos, seg, pos, seg, causal)
  if not causal:  # Every row sees some key in causal blocks; here padding rows see none.
    assert not mask[1, 0, 9].any()
  rows = (seg > 0)[:, :, None, None]
  if causal:  # A padding row (it sees no key) averages the values of its own block only; its
    cot = cot * rows  # output is ignored, as the model's losses ignore it.
  ours = attention_and_grads(
      lambda q, k, v: attention.dot_product_attention(q, k, v, mask, 'einsum', causal),
      q, k, v, cot)
  ref = attention_and_grads(
      lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, implementation='xla'),
      q, k, v, cot)
  for name, a, r in zip(['out', 'dq', 'dk', 'dv'], ours, ref):
    if causal and name == 'out':
      a, r = a * rows, r * rows
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=2e-5, err_msg=name)


def test_attention_implementations_give_the_same_model():
  model, params, tokens = build(attention='einsum')
  model_xla, _, _ = build(attention='xla')
  def loss(m, p):
    return m.apply({'params': p}, tokens)[0].std()
  for a, b in zip(jax.value_and_grad(lambda p: loss(model, p))(params),
                  jax.value_and_grad(lambda p: loss(model_xla, p))(params)):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), a, b)


@pytest.mark.parametrize('center, dtype, cpu_kernel', [
    (True, jnp.float32, True), (False, jnp.float32, True), (True, jnp.bfloat16, True),
    (True, jnp.float32, False), (False, jnp.float32, False)])
def test_norm_and_its_gradients_equal_flax(center, dtype, cpu_kernel):
  """Ours (the CPU kernel: hand-written backward, row means as matrix-vector products; else the
  generic maths) against flax.linen's LayerNorm / RMSNorm: outputs and the gradients of x, scale
  and bias."""
  import flax.linen as nn
  from research.nn.norm import Norm
  x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (2, 5, 16))
  cot = jax.random.normal(jax.random.key(1), x.shape)
  ref_module = (nn.LayerNorm if center else nn.RMSNorm)(dtype=dtype)
  params = ref_module.init(jax.random.key(2), x)
  params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(3), p.shape), params)
  results = []
  for module in (Norm(center=center, dtype=dtype, cpu_kernel=cpu_kernel), ref_module):
    out, vjp = jax.vjp(lambda p, x: module.apply(p, x.astype(dtype)), params, x)
    assert out.dtype == dtype
    results.append((out.astype(jnp.float32), *vjp(cot.astype(dtype))))
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  for name, a, r in zip(['out', 'dparams', 'dx'], *results):
    jax.tree.map(lambda a, r: np.testing.assert_allclose(a, r, atol=tol, rtol=tol, err_msg=name),
                 a, r)


@pytest.mark.parametrize('kw', [dict(), dict(family='encoder_decoder'),
                                dict(moe_every=1, num_experts=2, moe_top_k=1)])
def test_scanned_layers_equal_unrolled_ones_and_convert_both_ways(kw):
  """model.scan_layers: the same logits and gradients as the unrolled blocks with the same
  weights (to_layout stacks them), and to_layout's round trip gives the weights back."""
  from research.nn.transformer import init_decoder, to_layout
  cfg = ModelConfig(vocab_size=VOCAB, num_layers=3, num_heads=4, d_model=32, max_len=16, **kw)
  model, scanned = DecoderLM(cfg), DecoderLM(ModelConfig(**{**cfg.__dict__, 'scan_layers': True}))
  params = init_decoder(model, jax.random.key(1), T)
  stacked = to_layout(params, scan_layers=True)
  assert 'blocks' in stacked and 'block_0' not in stacked
  assert jax.tree.structure(stacked) == jax.tree.structure(init_decoder(scanned, jax.random.key(1),
                                                                        T))
  tokens = jax.random.randint(jax.random.key(0), (B, T), 0, VOCAB)
  source = tokens if cfg.family == 'encoder_decoder' else None

  def loss(m, p):
    return m.apply({'params': p}, tokens, source=source)[0].std()

  want, want_grads = jax.value_and_grad(lambda p: loss(model, p))(params)
  got, got_grads = jax.value_and_grad(lambda p: loss(scanned, p))(stacked)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               to_layout(got_grads, scan_layers=False), want_grads)
  jax.tree.map(np.testing.assert_array_equal, to_layout(stacked, scan_layers=False), params)


def test_scanned_layers_decode_with_a_cache_as_unrolled_ones():
  """Greedy decoding (prefill + cached steps) of a scanned model gives the unrolled one's tokens."""
  from research import decoding
  from research.nn.transformer import to_layout
  model, params, tokens = build()
  scanned = DecoderLM(ModelConfig(**{**model.cfg.__dict__, 'scan_layers': True}))
  prompts, mask = decoding.left_pad([[3, 4, 5], [6, 7]], 0)
  kw = dict(max_new_tokens=6, temperature=0.0, top_k=0, top_p=1.0, eos_id=1, pad_id=0)
  want = decoding.sample(model, params, prompts, mask, jax.random.key(0), **kw)
  got = decoding.sample(scanned, to_layout(params, True), prompts, mask, jax.random.key(0), **kw)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('remat', ['full', 'dots'])
def test_remat_keeps_the_loss_and_gradients(remat):
  model, params, tokens = build()
  rematted = DecoderLM(ModelConfig(**{**model.cfg.__dict__, 'remat': remat}))

  def loss(m, p):
    return m.apply({'params': p}, tokens)[0].std()

  want = jax.value_and_grad(lambda p: loss(model, p))(params)
  got = jax.value_and_grad(lambda p: loss(rematted, p))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got, want)


@pytest.mark.parametrize('tie', [True, False])
def test_chunked_loss_equals_the_whole_batch_loss(tie):
  """train.loss_chunk: the loss, accuracy and gradients of lm_loss over the full logits."""
  model, params, tokens = build(tie_embeddings=tie)
  targets = jnp.roll(tokens, -1, axis=1)
  weights = (jnp.arange(T) < T - 2).astype(jnp.float32)[None].repeat(B, 0)
  batch = {'inputs': tokens, 'targets': targets, 'weights': weights}
  full_loss, _ = lm.lm_fns(model)
  chunk_loss, _ = lm.lm_fns(model, loss_chunk=4)
  key = jax.random.key(0)
  want, want_grads = jax.value_and_grad(full_loss, has_aux=True)(params, batch, key)
  got, got_grads = jax.value_and_grad(chunk_loss, has_aux=True)(params, batch, key)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  np.testing.assert_allclose(got[1]['accuracy'], want[1]['accuracy'])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got_grads, want_grads)


def test_param_dtype_sets_every_parameter():
  _, params, _ = build(param_dtype='bfloat16', dtype='bfloat16')
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype('bfloat16')}


def test_scan_layers_refuses_mixed_blocks():
  with pytest.raises(UserError, match='moe_every'):
    ModelConfig(vocab_size=VOCAB, num_layers=4, moe_every=2, scan_layers=True)
