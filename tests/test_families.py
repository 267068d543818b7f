"""The three model families (decoder, encoder, encoder-decoder), MLM masking, the numbers task,
and the mlm / seq2seq stages end to end on tiny shapes."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from research import config as config_lib
from research import decoding
from research import tokenizers
from research.data import mlm as mlm_data
from research.data import numbers
from research.errors import UserError
from research.nn.config import ModelConfig
from research.nn.transformer import DecoderLM, EncoderLM, init_cache, init_decoder
from research.train import mlm, pretrain, seq2seq
from tests.conftest import tiny_config

VOCAB, B, T = 37, 2, 10
SMALL = dict(vocab_size=VOCAB, num_layers=2, num_heads=4, d_model=32, max_len=16)


def tokens(seed=0, shape=(B, T)):
  return jax.random.randint(jax.random.key(seed), shape, 10, VOCAB)


def position_diffs(apply, x, t):
  """Max |change| of the outputs at each position when token t of x changes: [seq]."""
  changed = x.at[:, t].set((x[:, t] + 1 - 10) % (VOCAB - 10) + 10)
  return np.abs(np.asarray(apply(changed) - apply(x))).max(axis=(0, 2))


def test_encoder_is_bidirectional_and_decoder_causal():
  x, t = tokens(), 6
  enc = EncoderLM(ModelConfig(family='encoder', **SMALL))
  enc_params = enc.init(jax.random.key(1), x)['params']
  diff = position_diffs(lambda y: enc.apply({'params': enc_params}, y)[0], x, t)
  assert (diff > 0).all(), 'an encoder position did not see a later (or earlier) token'
  dec = DecoderLM(ModelConfig(**SMALL))
  dec_params = dec.init(jax.random.key(1), x)['params']
  diff = position_diffs(lambda y: dec.apply({'params': dec_params}, y)[0], x, t)
  assert (diff[:t] == 0).all() and (diff[t:] > 0).all()


def test_encoder_decoder_masks():
  """Every target position sees the whole source; the decoder stays causal over the target."""
  model = DecoderLM(ModelConfig(family='encoder_decoder', **SMALL))
  src, tgt, t = tokens(2), tokens(3), 6
  params = init_decoder(model, jax.random.key(1))
  apply = lambda s, y: model.apply({'params': params}, y, source=s)[0]
  assert (position_diffs(lambda s: apply(s, tgt), src, t) > 0).all()
  diff = position_diffs(lambda y: apply(src, y), tgt, t)
  assert (diff[:t] == 0).all() and (diff[t:] > 0).all()
  with pytest.raises(ValueError, match='source'):
    model.apply({'params': params}, tgt)


@pytest.mark.parametrize('pos_encoding', ['learned', 'rope'])
def test_cross_attention_ignores_padded_source(pos_encoding):
  """Padding (segment 0), whatever its tokens and side, changes no decoder output."""
  model = DecoderLM(ModelConfig(family='encoder_decoder', pos_encoding=pos_encoding, **SMALL))
  params = init_decoder(model, jax.random.key(1))
  src, tgt = tokens(2, (B, 5)), tokens(3)
  want = model.apply({'params': params}, tgt, source=src)[0]
  garbage = tokens(4, (B, 4))
  ones, zeros = jnp.ones((B, 5), jnp.int32), jnp.zeros((B, 4), jnp.int32)
  for padded, seg in [(jnp.concatenate([src, garbage], 1), jnp.concatenate([ones, zeros], 1)),
                      (jnp.concatenate([garbage, src], 1), jnp.concatenate([zeros, ones], 1))]:
    got = model.apply({'params': params}, tgt, source=padded, source_segment_ids=seg)[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_mqa_shapes():
  cfg = ModelConfig(num_kv_heads=1, **SMALL)
  params = DecoderLM(cfg).init(jax.random.key(0), tokens())['params']
  attn = params['block_0']['attn']
  assert attn['query']['kernel'].shape == (32, 4 * 8)
  assert attn['key']['kernel'].shape == attn['value']['kernel'].shape == (32, 8)
  # Heads first, keys transposed, without the unit kv-heads (and batch) axes.
  batched = init_cache(cfg, B, 12)['layers']['block_0']
  assert batched['k_heads'].shape == (B, 8, 12) and batched['v_heads'].shape == (B, 12, 8)
  assert init_cache(cfg, 1, 12)['layers']['block_0']['k_heads'].shape == (8, 12)
  xla = dataclasses.replace(cfg, attention='xla')  # JAX's kernels: the projections' layout.
  assert init_cache(xla, B, 12)['layers']['block_0']['k'].shape == (B, 12, 1, 8)


def test_next_sentence_head_shapes():
  model = EncoderLM(ModelConfig(family='encoder', **SMALL), next_sentence=True)
  x = tokens()
  params = model.init(jax.random.key(0), x)['params']
  logits, nsp = model.apply({'params': params}, x)
  assert logits.shape == (B, T, VOCAB) and nsp.shape == (B, 2)


@pytest.fixture(scope='module')
def char_tok() -> tokenizers.Tokenizer:
  return tokenizers.train_tokenizer(tokenizers.default_config(),
                                    ['abcdefghijklmnopqrstuvwxyz0123456789 .,'])


def test_mlm_masking_statistics(char_tok):
  cfg = config_lib.default_config().mlm
  rng = np.random.default_rng(0)
  original = rng.integers(10, char_tok.vocab_size, (400, 512)).astype(np.int32)
  original[:, ::50] = char_tok.eos_id  # Special tokens: never selected.
  batch = mlm_data.mask_tokens(original, rng, cfg, char_tok)
  selected = batch['weights'] > 0
  assert not selected[:, ::50].any()
  assert selected.mean() == pytest.approx(0.15 * 0.98, abs=0.003)
  # Labels only at the selected positions; inputs untouched elsewhere.
  np.testing.assert_array_equal(batch['targets'], np.where(selected, original, char_tok.pad_id))
  np.testing.assert_array_equal(batch['inputs'][~selected], original[~selected])
  inputs, kept = batch['inputs'][selected], original[selected]
  masked = inputs == char_tok.mask_id
  changed = ~masked & (inputs != kept)
  chance_same = 1 / (char_tok.vocab_size - 10)  # A random replacement can draw the same token.
  assert masked.mean() == pytest.approx(0.8, abs=0.01)
  assert changed.mean() == pytest.approx(0.1 * (1 - chance_same), abs=0.01)
  assert (~masked & ~changed).mean() == pytest.approx(0.1 + 0.1 * chance_same, abs=0.01)
  assert ((inputs[changed] >= 10) & (inputs[changed] < char_tok.vocab_size)).all()


def test_sentence_pairs(char_tok):
  stream = np.arange(10, 1010) % char_tok.vocab_size
  stream[stream < 10] += 10
  rng = np.random.default_rng(0)
  starts = rng.integers(0, 900, 2000)
  rows, labels = mlm_data.sentence_pairs(stream, starts, 16, rng, char_tok)
  half = (16 - 3) // 2
  assert rows.shape == (2000, 16) and labels.mean() == pytest.approx(0.5, abs=0.05)
  assert (rows[:, 0] == char_tok.cls_id).all() and (rows[:, 1 + half] == char_tok.sep_id).all()
  assert (rows[:, -1] == char_tok.sep_id).all()
  follows = rows[:, 2 + half] == stream[starts + half]
  assert follows[labels == 1].all() and follows[labels == 0].mean() < 0.05


def test_numbers_task():
  assert numbers.in_words(0) == 'zero'
  assert numbers.in_words(407358) == 'four hundred seven thousand three hundred fifty eight'
  assert numbers.in_words(1019) == 'one thousand nineteen'
  assert numbers.in_words(900000) == 'nine hundred thousand'
  assert numbers.in_digits(407) == '4 0 7'
  train = numbers.draw_numbers('train', 3000, np.random.default_rng(0))
  held = numbers.draw_numbers('held_out', 300, np.random.default_rng(1))
  assert not set(train) & set(held)
  assert all(numbers.is_held_out(n) for n in held)


def test_encode_pairs():
  tok = tokenizers.train_tokenizer(ml_collections.ConfigDict(dict(
      tokenizers.default_config().to_dict(), kind='word')), ['1 2 one two'])
  batch = seq2seq.encode_pairs([('1 2', 'one two'), ('2', 'two')], tok, 5)
  one, two = tok.encode('one two')
  np.testing.assert_array_equal(batch['inputs'][0], [tok.bos_id, one, two, 0, 0])
  np.testing.assert_array_equal(batch['targets'][1], [two, tok.eos_id, 0, 0, 0])
  np.testing.assert_array_equal(batch['source_segment_ids'], [[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(batch['weights'][0], [1, 1, 1, 0, 0])
  with pytest.raises(UserError, match='train.seq_len'):
    seq2seq.encode_pairs([('1 2', 'one two one two')], tok, 3)


def test_seq2seq_decoding_matches_full_forward():
  """Greedy decoding through the cache (encoder output kept in it) = argmax of full passes, and
  beam search with one beam = greedy."""
  cfg = ModelConfig(family='encoder_decoder', **SMALL)
  model = DecoderLM(cfg)
  params = jax.tree.map(lambda p: p * 8 if p.ndim == 2 else p,  # Sharper, fewer near-ties.
                        init_decoder(model, jax.random.key(5)))
  src = tokens(2, (B, 6))
  src_mask = jnp.arange(6)[None] < jnp.array([[6], [4]])
  bos = jnp.full((B, 1), 2, jnp.int32)
  common = dict(max_new_tokens=6, eos_id=3, pad_id=0, source=src, source_mask=src_mask)
  out = decoding.sample(model, params, bos, jnp.ones((B, 1), bool), jax.random.key(0),
                        temperature=0.0, top_k=0, top_p=1.0, **common)
  seq = bos
  for _ in range(6):
    logits = model.apply({'params': params}, seq, source=src,
                         source_segment_ids=src_mask.astype(jnp.int32))[0]
    seq = jnp.concatenate([seq, logits[:, -1:].argmax(-1)], axis=1)
  want = np.asarray(seq[:, 1:])
  for row in want:  # pad after EOS, as decoding returns it
    if 3 in row.tolist():
      row[row.tolist().index(3) + 1:] = 0
  np.testing.assert_array_equal(np.asarray(out), want)
  beams, _ = decoding.beam_search(model, params, bos, jnp.ones((B, 1), bool), num_beams=1,
                                  length_penalty=0.0, **common)
  np.testing.assert_array_equal(np.asarray(beams[:, 0]), want)
  # Two beams: each row as when searched alone (its beams read its source's cached keys).
  beams, scores = decoding.beam_search(model, params, bos, jnp.ones((B, 1), bool), num_beams=2,
                                       length_penalty=1.0, **common)
  for i in range(B):
    alone = dict(common, source=src[i:i + 1], source_mask=src_mask[i:i + 1])
    row_beams, row_scores = decoding.beam_search(model, params, bos[i:i + 1],
                                                 jnp.ones((1, 1), bool), num_beams=2,
                                                 length_penalty=1.0, **alone)
    np.testing.assert_array_equal(np.asarray(beams[i]), np.asarray(row_beams[0]))
    np.testing.assert_allclose(np.asarray(scores[i]), np.asarray(row_scores[0]), rtol=1e-5)


def test_seq2seq_decode_steps_read_the_cross_attention_keys_from_the_cache():
  """After the prefill, a decode step projects no source token: its FLOPs grow with the source
  length by the attention over it (~4 d per source token and layer), not by the 4 d^2 per layer
  of recomputing the source's keys and values."""
  model = DecoderLM(ModelConfig(family='encoder_decoder', **SMALL))
  params = init_decoder(model, jax.random.key(0))
  bos = jnp.full((B, 1), 2, jnp.int32)

  def decode_step_flops(src_len: int) -> float:
    _, cache, positions = decoding.prefill(model, params, bos, jnp.ones((B, 1), bool), 4,
                                           tokens(2, (B, src_len)), jnp.ones((B, src_len), bool))
    assert cache['layers']['block_0']['cross']['k'].shape == (B, src_len, 4, 8)
    step = jax.jit(lambda c: decoding.decode_step(model, params, bos[:, 0], positions, c))
    return step.lower(cache).compile().cost_analysis()['flops']

  d, layers = SMALL['d_model'], SMALL['num_layers']
  per_source_token = (decode_step_flops(16) - decode_step_flops(8)) / (8 * B * layers)
  assert 0 < per_source_token < d * d, per_source_token


@pytest.mark.parametrize('kw, words', [
    (dict(stage='mlm'), 'model.family'),
    (dict(stage='seq2seq', family='encoder'), 'encoder_decoder'),
    (dict(stage='pretrain', family='encoder'), 'decoder'),
    (dict(stage='mlm', family='encoder', mask_prob=0.95), 'mlm.mask_prob'),
])
def test_stage_and_family_errors(kw, words):
  c = config_lib.default_config()
  c.stage = kw['stage']
  c.model.family = kw.get('family', 'decoder')
  c.mlm.mask_prob = kw.get('mask_prob', 0.8)
  with pytest.raises(UserError, match=words):
    config_lib.validate(c)


def test_family_choices():
  with pytest.raises(UserError, match='model.family'):
    ModelConfig(vocab_size=VOCAB, family='decoder_encoder')


@pytest.mark.parametrize('kw', [
    dict(pos_encoding='learned', norm='layernorm', norm_position='pre', ffn='relu'),
    dict(pos_encoding='sinusoidal', norm='rmsnorm', norm_position='post', ffn='gelu'),
    dict(pos_encoding='rope', norm='rmsnorm', norm_position='pre', ffn='swiglu'),
])
def test_pretrain_runs_with_each_block_choice(kw, tiny_corpus, tmp_path):
  """Every pos_encoding, norm, norm_position and ffn choice trains (the loss falls)."""
  config = tiny_config(tiny_corpus, steps=12, learning_rate=1e-2, eval_every=12,
                       checkpoint_every=12, log_every=4)
  config.model.update(**kw)
  config.sampling.max_new_tokens = 2
  result = pretrain.train(config, str(tmp_path))
  rows = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  losses = [r['train/loss'] for r in rows if 'train/loss' in r]
  assert losses[-1] < 0.9 * losses[0] and np.isfinite(result.metrics['eval/loss'])


def test_mlm_stage(tiny_corpus, tmp_path):
  config = tiny_config(tiny_corpus, steps=16, learning_rate=1e-2, eval_every=16,
                       checkpoint_every=16, log_every=8)
  config.stage, config.model.family, config.mlm.next_sentence = 'mlm', 'encoder', True
  config_lib.validate(config)
  result = mlm.train(config, str(tmp_path))
  with open(tmp_path / 'data' / 'stats.json') as f:
    stats = json.load(f)
  for key in ('eval/accuracy', 'eval/nsp_accuracy', 'eval/nsp_loss', 'train/nsp_loss'):
    assert np.isfinite(result.metrics[key]), key
  assert 0 < stats['val_unigram_accuracy'] < 1
  assert result.metrics['eval/mlm_loss'] < np.log(stats['vocab_size'])  # Better than uniform.


def test_seq2seq_stage(tmp_path, monkeypatch):
  from experiments import seq2seq_small  # pylint: disable=g-import-not-at-top
  config = seq2seq_small.get_config()
  config.model.update(num_layers=1, d_model=32, num_heads=2)
  config.train.update(steps=6, batch_size=16, grad_accum_steps=2, log_every=3, eval_every=6,
                      eval_batches=1, checkpoint_every=6)  # Micro-batches weighted by tokens.
  config.sampling.num_beams = 2
  config_lib.validate(config)
  result = seq2seq.train(config, str(tmp_path))
  assert 0 <= result.metrics['eval/exact_match'] <= 1
  with open(tmp_path / 'results.json') as f:
    results = json.load(f)
  assert results['held_out_pairs'] == 8 and 'beam_exact_match' in results
  assert os.path.exists(tmp_path / 'samples.txt')
