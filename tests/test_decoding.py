"""Tests for research/decoding.py and research/generate.py: the KV cache against full forward
passes, greedy / sampling / beam search, batching, chat, and input errors."""

import functools
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import config as config_lib
from research import decoding
from research import generate
from research import tokenizers
from research.errors import UserError
from research.nn.config import ModelConfig
from research.nn.transformer import DecoderLM, init_cache
from research import runs

TEXT = 'the quick brown fox jumps over the lazy dog; THE QUICK BROWN FOX 0123456789.'
ARCHS = {  # Few, as each compiles its own programs.
    'mha_learned': {},
    'gqa_rope': {'num_kv_heads': 2, 'pos_encoding': 'rope', 'norm': 'rmsnorm', 'ffn': 'swiglu'},
    'mqa_sinusoidal': {'num_kv_heads': 1, 'pos_encoding': 'sinusoidal'},
    'gqa_xla': {'num_kv_heads': 2, 'attention': 'xla'},  # JAX's attention on the cache.
    # Every FFN an MoE whose experts keep every token (a cached step never drops one; a full
    # pass may when capacity binds, see moe.capacity).
    'moe': {'moe_every': 1, 'num_experts': 4, 'moe_top_k': 2, 'moe_capacity_factor': 0.0},
}
NEW = 8  # max_new_tokens in most tests


@pytest.fixture(scope='module')
def tok() -> tokenizers.Tokenizer:
  return tokenizers.train_tokenizer(tokenizers.default_config(), [TEXT])


def _param_shapes(model: DecoderLM) -> dict:
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))['params']


def _random_params(model: DecoderLM, seed: int) -> dict:
  """Norm scales 1, biases 0, other weights N(0, 0.02), the unembedding N(0, 0.4).

  Drawn in numpy (no compile). The large unembedding keeps greedy decoding from repeating one
  token and from near-ties.
  """
  rng = np.random.default_rng(seed)

  def draw(path, x):
    names = [k.key for k in path]
    if names[-1] in ('scale', 'bias'):
      return np.full(x.shape, float(names[-1] == 'scale'), np.float32)
    std = 0.4 if 'unembed' in names else 0.02
    return rng.normal(0, std, x.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, _param_shapes(model))


@pytest.fixture(scope='module')
def models(tok) -> dict[str, tuple[DecoderLM, dict]]:
  """Tiny random models by architecture."""
  out = {}
  for i, (name, overrides) in enumerate(ARCHS.items()):
    model = DecoderLM(ModelConfig(vocab_size=tok.vocab_size, num_layers=2, num_heads=4,
                                  d_model=32, max_len=64, tie_embeddings=False, **overrides))
    out[name] = model, _random_params(model, i)
  return out


@pytest.fixture(scope='module')
def lm(models) -> tuple[DecoderLM, dict]:
  return models['mha_learned']


def _sampling(**overrides):
  s = config_lib.default_config().sampling
  s.update({'max_new_tokens': NEW, **overrides})
  return s


def _prompts(tok, lengths, seed=0) -> list[list[int]]:
  rng = np.random.default_rng(seed)
  return [[tok.bos_id] + rng.integers(10, tok.vocab_size, n - 1).tolist() for n in lengths]


def _full_logits(model, params, tokens, mask):
  """Logits [batch, len, vocab] of one forward pass over left-padded tokens, no cache."""
  return model.apply({'params': params}, tokens, *decoding.prompt_layout(mask))[0]


_full_logits_jit = jax.jit(_full_logits, static_argnums=0)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _cached_and_full_logits(model, params, tokens, mask, p):
  """Next-token logits [batch, len - p, vocab] from prefilling tokens[:, :p] then decoding one
  token per step with the cache, and the same from one forward pass over all tokens."""
  logits, cache, positions = decoding.prefill(model, params, tokens[:, :p], mask[:, :p],
                                              tokens.shape[1])

  def step(cache, inputs):
    tok, pos = inputs
    return decoding.decode_step(model, params, tok, pos, cache)[::-1]

  inputs = tokens[:, p:-1].T, positions[None] + jnp.arange(tokens.shape[1] - p - 1)[:, None, None]
  cached = jnp.concatenate([logits[:, None], jax.lax.scan(step, cache, inputs)[1].swapaxes(0, 1)],
                           axis=1)
  return cached, _full_logits(model, params, tokens, mask)[:, p - 1:-1]


@pytest.mark.parametrize('arch', ARCHS)
def test_cached_decode_matches_full_forward(models, arch):
  model, params = models[arch]
  b, p, k = 3, 6, 5
  tokens = np.random.default_rng(1).integers(10, model.cfg.vocab_size, (b, p + k))
  for pads in ([0, 0, 0], [0, 3, 5]):  # No left padding, then rows padded by 3 and 5.
    mask = np.arange(p + k)[None] >= np.array(pads)[:, None]
    cached, full = _cached_and_full_logits(model, params, tokens, mask, p)
    np.testing.assert_allclose(cached, full, atol=1e-4, rtol=0)


@pytest.mark.parametrize('arch,batch', [('gqa_rope', 2), ('gqa_rope', 1), ('mqa_sinusoidal', 2),
                                        ('mqa_sinusoidal', 1)])
def test_decode_steps_copy_no_part_of_the_cache(models, arch, batch):
  """The einsum kernel keeps the cache heads first, keys transposed, without unit batch or
  kv-head axes (see attention.empty_cache): a decode step writes its slot in place and its batched
  matmuls read the cache as stored, so the only cache-sized arrays it makes are the 2 per layer
  it writes (in other layouts XLA copies the cache, at batch 1 and with MQA too)."""
  model, params = models[arch]
  slots, cfg = 40, model.cfg
  step = jax.jit(functools.partial(decoding.decode_step, model), donate_argnums=3)
  hlo = step.lower(params, jnp.zeros(batch, jnp.int32), jnp.zeros((batch, 1), jnp.int32),
                   init_cache(cfg, batch, slots)).compile().as_text()
  made = re.findall(r'\n\s*(?:ROOT )?%\S+ = f32\[([\d,]+)\]\S* ([\w-]+)\(',
                    hlo[hlo.index('\nENTRY'):])
  size = batch * slots * cfg.kv_heads * cfg.head_dim
  cache_sized = [op for shape, op in made if np.prod([int(d) for d in shape.split(',')]) == size
                 and op not in ('parameter', 'bitcast', 'get-tuple-element')]
  assert len(cache_sized) == 2 * cfg.num_layers, cache_sized


def _greedy_reference(model, params, prompts, mask, steps, eos_id, pad_id):
  """Greedy decoding by argmax over a full forward pass per token (no cache)."""
  b, p = prompts.shape
  tokens = np.concatenate([prompts, np.full((b, steps), pad_id)], 1)
  mask = np.concatenate([mask, np.zeros((b, steps), bool)], 1)
  out, done = np.full((b, steps), pad_id), np.zeros(b, bool)
  for i in range(steps):
    tok = np.argmax(_full_logits_jit(model, params, tokens, mask)[:, p - 1 + i], -1)
    out[:, i] = np.where(done, pad_id, tok)
    done |= tok == eos_id
    tokens[:, p + i], mask[:, p + i] = tok, True
  return out


def _greedy(model, params, prompts, mask, eos_id, pad_id=0):
  return np.asarray(decoding.sample(model, params, prompts, mask, jax.random.key(0),
                                    max_new_tokens=NEW, temperature=0.0, top_k=0, top_p=1.0,
                                    eos_id=eos_id, pad_id=pad_id))


@pytest.fixture(scope='module')
def prompts(tok) -> list[list[int]]:
  return _prompts(tok, [3, 12, 7], seed=2)


@pytest.fixture(scope='module')
def batch(tok, prompts) -> tuple[np.ndarray, np.ndarray]:
  """The prompts left-padded as `generate` pads them, so that its tests reuse compiled code."""
  return decoding.left_pad(prompts, tok.pad_id, decoding.PROMPT_BUCKET)


def _mid_eos(lm, batch) -> int:
  """A token that greedy emits at step 3 of row 0: as EOS it ends row 0 early."""
  return int(_greedy(*lm, *batch, eos_id=-1)[0, 3])


def test_greedy_equals_full_forward_argmax(lm, batch):
  for eos in (-1, _mid_eos(lm, batch)):
    expected = _greedy_reference(*lm, *batch, NEW, eos, 0)
    np.testing.assert_array_equal(_greedy(*lm, *batch, eos), expected)
  assert (expected[0, :4] == eos).any() and (expected[0, 4:] == 0).all()


def test_tiny_temperature_equals_greedy(lm, batch):
  out = decoding.sample(*lm, *batch, jax.random.key(3), max_new_tokens=NEW, temperature=1e-6,
                        top_k=0, top_p=1.0, eos_id=-1, pad_id=0)
  np.testing.assert_array_equal(out, _greedy(*lm, *batch, eos_id=-1))


def _draws(probs, n=4000, **kwargs) -> np.ndarray:
  """n draws of next_token from one row of probabilities."""
  logits = jnp.tile(jnp.log(jnp.asarray(probs)), (n, 1))
  return np.asarray(decoding.next_token(logits, jax.random.key(0), 1.0, **kwargs))


def test_top_k_draws_only_the_k_most_likely():
  probs = np.array([0.05, 0.3, 0.1, 0.25, 0.2, 0.1])
  draws = _draws(probs, top_k=3, top_p=1.0)
  freq = np.bincount(draws, minlength=6) / len(draws)
  np.testing.assert_allclose(freq, np.array([0, 0.3, 0, 0.25, 0.2, 0]) / 0.75, atol=0.03)


def test_top_k_beyond_the_vocabulary_keeps_every_token():
  probs = np.array([0.05, 0.3, 0.1, 0.25, 0.2, 0.1])
  freq = np.bincount(_draws(probs, top_k=50, top_p=1.0), minlength=6) / 4000
  np.testing.assert_allclose(freq, probs, atol=0.03)


@pytest.mark.parametrize('top_p, nucleus', [(0.65, [1, 3]), (0.75, [1, 3, 4]), (0.35, [1])])
def test_top_p_draws_only_from_the_nucleus(top_p, nucleus):
  probs = np.array([0.05, 0.4, 0.1, 0.3, 0.15])
  draws = _draws(probs, top_k=0, top_p=top_p)
  freq = np.bincount(draws, minlength=5) / len(draws)
  expected = np.zeros(5)
  expected[nucleus] = probs[nucleus] / probs[nucleus].sum()
  np.testing.assert_allclose(freq, expected, atol=0.03)


def test_sampling_is_deterministic_given_a_seed(lm, batch):
  run = lambda seed: np.asarray(decoding.sample(
      *lm, *batch, jax.random.key(seed), max_new_tokens=NEW, temperature=1.0, top_k=0,
      top_p=1.0, eos_id=-1, pad_id=0))
  np.testing.assert_array_equal(run(0), run(0))
  assert (run(0) != run(1)).any()


def _beams(model, params, prompts, mask, num_beams, eos_id, length_penalty=1.0, new=NEW):
  tokens, scores = decoding.beam_search(model, params, prompts, mask, num_beams=num_beams,
                                        max_new_tokens=new, length_penalty=length_penalty,
                                        eos_id=eos_id, pad_id=0)
  return np.asarray(tokens), np.asarray(scores)


def test_beam_search_equals_a_search_over_full_forward_passes(lm, batch):
  """No EOS, no length penalty: the beams are the n best continuations kept step by step, here
  found by scoring every token after every kept hypothesis with a full forward pass (no cache),
  so a cache that did not follow its beam would show."""
  model, params = lm
  prompts, mask = batch
  n, (rows, p) = 3, prompts.shape
  tokens, scores = _beams(model, params, prompts, mask, num_beams=n, eos_id=-1,
                          length_penalty=0.0)
  kept = [[((), 0.0)] for _ in range(rows)]  # Per row: (tokens, log-prob) of the hypotheses.
  for step in range(NEW):
    seqs = np.zeros((rows * n, p + NEW), np.int32)
    seq_mask = np.zeros((rows * n, p + NEW), bool)
    for r in range(rows):
      for j, (toks, _) in enumerate(kept[r]):
        seqs[r * n + j, :p + step] = np.concatenate([prompts[r], toks])
        seq_mask[r * n + j, :p + step] = np.concatenate([mask[r], np.ones(step, bool)])
    logits = _full_logits_jit(model, params, seqs, seq_mask)[:, p + step - 1]
    logprobs = np.asarray(jax.nn.log_softmax(logits))
    for r in range(rows):
      candidates = [(toks + (v,), lp + logprobs[r * n + j, v])
                    for j, (toks, lp) in enumerate(kept[r]) for v in range(logprobs.shape[1])]
      kept[r] = sorted(candidates, key=lambda c: -c[1])[:n]
  for r in range(rows):
    np.testing.assert_array_equal(tokens[r], [toks for toks, _ in kept[r]])
    np.testing.assert_allclose(scores[r], [lp for _, lp in kept[r]], atol=1e-4)


def test_beam_width_one_equals_greedy(lm, batch):
  eos = _mid_eos(lm, batch)
  tokens, _ = _beams(*lm, *batch, num_beams=1, eos_id=eos)
  np.testing.assert_array_equal(tokens[:, 0], _greedy(*lm, *batch, eos))


def test_beam_search_is_deterministic_and_sorted(lm, batch):
  eos = _mid_eos(lm, batch)
  tokens, scores = _beams(*lm, *batch, num_beams=3, eos_id=eos)
  again, _ = _beams(*lm, *batch, num_beams=3, eos_id=eos)
  np.testing.assert_array_equal(tokens, again)
  assert (np.diff(scores, axis=1) <= 0).all() and np.isfinite(scores).all()


# A bigram table where greedy is myopic: from A, B (0.5) beats C (0.4), but after B nothing is
# likely, while C -> D -> EOS is. Greedy: B EOS (p = 0.1); best: C D EOS (p = 0.324).
A, B, C, D, EOS = 4, 5, 6, 7, 3
MYOPIC = {A: {B: 0.5, C: 0.4, EOS: 0.02, A: 0.02, D: 0.03}, B: {EOS: 0.2}, C: {D: 0.9},
          D: {EOS: 0.9}}


def _bigram_model(table: dict = MYOPIC) -> tuple[DecoderLM, dict]:
  """A DecoderLM whose next-token log-probs depend only on the last token: table[last][next],
  the rest of a row's mass spread evenly over the other tokens (rows not given: uniform).

  Attention and FFN outputs are zero, the embedding is one-hot in d = vocab + 1 dimensions and the
  unembedding undoes the final LayerNorm, so logits = log_probs[last token].
  """
  v = 8
  probs = np.full((v, v), 1 / v)
  for last, row in table.items():
    probs[last] = (1 - sum(row.values())) / (v - len(row))
    for nxt, p in row.items():
      probs[last, nxt] = p
  cfg = ModelConfig(vocab_size=v, num_layers=1, num_heads=1, d_model=v + 1, max_len=16,
                    tie_embeddings=False)
  model = DecoderLM(cfg)
  params = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), _param_shapes(model))
  params['embed']['embedding'] = np.eye(v, v + 1)
  scale = 1 / np.sqrt(1 / (v + 1) - 1 / (v + 1) ** 2 + 1e-6)  # LayerNorm of a one-hot row.
  unembed = np.log(probs) / scale
  params['ln_final']['scale'] = np.ones(v + 1)
  params['unembed']['kernel'] = np.concatenate([unembed, -unembed.sum(0, keepdims=True)])
  return model, params


@pytest.mark.parametrize('length_penalty', [0.0, 1.0])
def test_beam_search_beats_myopic_greedy(length_penalty):
  model, params = _bigram_model()
  prompts, mask = np.array([[A]]), np.array([[True]])
  greedy = decoding.sample(model, params, prompts, mask, jax.random.key(0), max_new_tokens=4,
                           temperature=0.0, top_k=0, top_p=1.0, eos_id=EOS, pad_id=0)
  np.testing.assert_array_equal(greedy, [[B, EOS, 0, 0]])
  tokens, scores = _beams(model, params, prompts, mask, 2, EOS, length_penalty, new=4)
  np.testing.assert_array_equal(tokens[0, 0], [C, D, EOS, 0])
  np.testing.assert_allclose(scores[0, 0], np.log(0.4 * 0.9 * 0.9) / 3 ** length_penalty,
                             rtol=1e-5)


def _check_batched_equals_single(tok, lm, prompts, sampling):
  batched = decoding.generate(*lm, tok, prompts, sampling, jax.random.key(0))
  assert batched == [decoding.generate(*lm, tok, [p], sampling, jax.random.key(0))[0]
                     for p in prompts]
  assert all(batched)


def test_batched_prompts_match_single_prompts(tok, lm, prompts):
  _check_batched_equals_single(tok, lm, prompts, _sampling(strategy='greedy'))


@pytest.mark.slow
def test_batched_prompts_match_single_prompts_in_beam_search(tok, lm, prompts):
  _check_batched_equals_single(tok, lm, prompts, _sampling(strategy='beam', num_beams=2))


@pytest.mark.parametrize('overrides, message', [
    ({'temperature': -0.5}, r'sampling.temperature=-0.5 must be >= 0'),
    ({'top_p': 0.0}, r'sampling.top_p=0.0 must be in \(0, 1\]'),
    ({'top_p': 1.5}, r'sampling.top_p=1.5 must be in \(0, 1\]'),
    ({'top_k': -1}, r'sampling.top_k=-1 must be >= 0'),
    ({'num_beams': 0}, r'sampling.num_beams=0 must be >= 1'),
    ({'strategy': 'nucleus'}, r"sampling.strategy='nucleus' is not one of"),
    ({'max_new_tokens': 0}, r'sampling.max_new_tokens=0 must be >= 1'),
])
def test_bad_sampling_settings_raise(tok, lm, overrides, message):
  with pytest.raises(UserError, match=message):
    decoding.generate(*lm, tok, [[tok.bos_id]], _sampling(**overrides), jax.random.key(0))


def test_bad_prompts_raise(tok, lm):
  with pytest.raises(UserError, match=r'prompt 1 is empty \(0 tokens\)'):
    decoding.generate(*lm, tok, [[tok.bos_id], []], _sampling(), jax.random.key(0))
  with pytest.raises(UserError, match=r'the prompt has 60 tokens and sampling.max_new_tokens=8, '
                     r'68 in all, more than model.max_len=64; shorten the prompt'):
    decoding.generate(*lm, tok, [[tok.bos_id] * 60], _sampling(), jax.random.key(0))


def test_chat_keeps_history_and_stops_at_exit(tok, lm, monkeypatch):
  monkeypatch.setattr(runs, 'load_trained', lambda workdir: (None, tok, *lm))
  prompts = []
  real_generate = decoding.generate

  def spy(model, params, tokenizer, prompt_ids, sampling, key):
    prompts.append(prompt_ids[0])
    return real_generate(model, params, tokenizer, prompt_ids, sampling, key)

  monkeypatch.setattr(decoding, 'generate', spy)
  stdout = io.StringIO()
  generate.chat_main('run', _sampling(strategy='greedy'), io.StringIO('hi\n\nfox?\n/exit\nno\n'),
                     stdout)
  replies = stdout.getvalue().split('\n')  # The tokenizer has no newline: one line per reply.
  assert len(replies) == 3 and replies[-1] == ''
  history = [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': replies[0]},
             {'role': 'user', 'content': 'fox?'}]
  assert prompts == [decoding.chat_prompt(tok, history[:1]), decoding.chat_prompt(tok, history)]


def test_chat_refuses_an_encoder_decoder_run(tok, monkeypatch):
  model = DecoderLM(ModelConfig(vocab_size=tok.vocab_size, num_layers=1, num_heads=2, d_model=16,
                                max_len=32, family='encoder_decoder'))
  monkeypatch.setattr(runs, 'load_trained', lambda workdir: (None, tok, model, None))
  with pytest.raises(UserError, match='encoder-decoder model.*--mode=generate'):
    generate.chat_main('run', _sampling(), io.StringIO('hi\n'), io.StringIO())


def test_generate_main(tok, lm, monkeypatch, tmp_path, capsys):
  with pytest.raises(UserError, match='holds no run'):
    generate.generate_main(str(tmp_path), 'the', _sampling())
  monkeypatch.setattr(runs, 'load_trained', lambda workdir: (None, tok, *lm))
  with pytest.raises(UserError, match='got no prompt'):
    generate.generate_main('run', None, _sampling())
  greedy = _sampling(strategy='greedy')
  text = generate.generate_main('run', 'the', greedy)
  prompt = [tok.bos_id] + tok.encode('the')
  ids = decoding.generate(*lm, tok, [prompt], greedy, jax.random.key(0))[0]
  assert text == tok.decode(ids)
  # More new tokens than max_len (64) leaves room for: as many as fit, and a note says so.
  capsys.readouterr()
  text = generate.generate_main('run', 'the', _sampling(strategy='greedy', max_new_tokens=500))
  room = lm[0].cfg.max_len - len(prompt)
  ids = decoding.generate(*lm, tok, [prompt], _sampling(strategy='greedy', max_new_tokens=room),
                          jax.random.key(0))[0]
  assert text == tok.decode(ids)
  assert f'{room} new tokens at most' in capsys.readouterr().err
  with pytest.raises(UserError, match='no room for a reply'):
    generate.generate_main('run', 'the ' * 40, greedy)


@pytest.mark.parametrize('length_penalty', [0.0, 1.0, -0.5])
def test_beam_search_waits_for_an_alive_beam_that_can_still_win(length_penalty):
  """A confident model: A -> C -> D -> EOS at p ~ 0.99 each, an EOS at p = 0.005 after A and
  after C. Those two unlikely endings rank in the top n = 2 candidates and fill both finished
  slots at steps 1-2 while A C D (log-prob -0.02) is alive; the search must go on until it ends."""
  model, params = _bigram_model({A: {C: 0.99, EOS: 0.005}, C: {D: 0.99, EOS: 0.005},
                                 D: {EOS: 0.99}})
  prompts, mask = np.array([[A]]), np.array([[True]])
  tokens, scores = _beams(model, params, prompts, mask, 2, EOS, length_penalty, new=5)
  np.testing.assert_array_equal(tokens[0, 0], [C, D, EOS, 0, 0])
  np.testing.assert_allclose(scores[0, 0], np.log(0.99**3) / 3 ** length_penalty, rtol=1e-4)
