"""Text generation: prefill the KV cache with the prompt, then decode one token at a time on
device (`lax.while_loop`) with greedy or temperature / top-k / top-p sampling, or beam search.

`generate` is the host-side entry point: it checks the `sampling` config section and the prompt
lengths, batches the prompts and dispatches on `sampling.strategy`.

Encoder-decoder models take their source as `source` / `source_mask` (or `sources` in `generate`):
prefill encodes it once into the cache, and the decoder prompt is usually just BOS.
"""

import functools
from typing import Any, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from research import tokenizers
from research.errors import UserError
from research.nn.transformer import Cache, init_cache, take_cache_rows

# Prompts are left-padded to a multiple of this many tokens, so that prompts of similar length
# (e.g. the turns of a chat) share one compiled decode loop.
PROMPT_BUCKET = 64


def check_sampling(sampling: ml_collections.ConfigDict) -> None:
  """One clear error per impossible setting of the `sampling` config section."""
  s = sampling
  if s.strategy not in ('greedy', 'sample', 'beam'):
    raise UserError(f"sampling.strategy={s.strategy!r} is not one of ('greedy', 'sample', 'beam'); "
                    'set --config.sampling.strategy to one of them.')
  if s.temperature < 0:
    raise UserError(f'sampling.temperature={s.temperature} must be >= 0 (0 means greedy).')
  if s.top_k < 0:
    raise UserError(f'sampling.top_k={s.top_k} must be >= 0 (0 turns it off).')
  if not 0 < s.top_p <= 1:
    raise UserError(f'sampling.top_p={s.top_p} must be in (0, 1] (1 turns it off).')
  if s.num_beams < 1:
    raise UserError(f'sampling.num_beams={s.num_beams} must be >= 1 (1 is greedy).')
  if s.max_new_tokens < 1:
    raise UserError(f'sampling.max_new_tokens={s.max_new_tokens} must be >= 1.')


def filter_logits(logits: jnp.ndarray, top_k: int, top_p: float) -> jnp.ndarray:
  """Sets to -inf every logit outside the top k and outside the nucleus of mass top_p.

  logits: [batch, vocab]. The nucleus is the smallest set of most likely tokens whose
  probability reaches top_p (Holtzman et al. 2020). Ties at the boundary are kept.
  """
  if 0 < top_k < logits.shape[-1]:  # top_k >= vocab keeps every token.
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.where(mass_before < top_p, sorted_logits, jnp.inf)
    threshold = jnp.min(kept, axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def next_token(logits: jnp.ndarray, key: jax.Array, temperature: float, top_k: int,
               top_p: float) -> jnp.ndarray:
  """Picks one token per row of logits [batch, vocab]: argmax when temperature == 0."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits / temperature, top_k, top_p)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def prompt_layout(prompt_mask: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Positions and segment ids of left-padded prompts: [batch, len] each (pads: segment 0)."""
  mask = prompt_mask.astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0), mask


def prefill(model: nn.Module, params: Any, prompts: jnp.ndarray, prompt_mask: jnp.ndarray,
            cache_len: int, source: jnp.ndarray | None = None,
            source_mask: jnp.ndarray | None = None) -> tuple[jnp.ndarray, Cache, jnp.ndarray]:
  """Runs left-padded prompts [batch, prompt_len] through the model into a fresh cache.

  source, source_mask: [batch, src_len] for encoder-decoder models (mask False on padding).
  Returns the next-token logits [batch, vocab], the cache (`cache_len` slots) and the position
  [batch, 1] of each row's first new token.
  """
  positions, segments = prompt_layout(prompt_mask)
  cache = init_cache(model.cfg, prompts.shape[0], cache_len)
  source_segments = None if source_mask is None else source_mask.astype(jnp.int32)
  logits, cache = model.apply({'params': params}, prompts, positions, segments, cache=cache,
                              source=source, source_segment_ids=source_segments)
  return logits[:, -1], cache, positions[:, -1:] + 1


def decode_step(model: nn.Module, params: Any, tokens: jnp.ndarray, positions: jnp.ndarray,
                cache: Cache) -> tuple[jnp.ndarray, Cache]:
  """Appends tokens [batch] at positions [batch, 1]: (next-token logits [batch, vocab], cache)."""
  logits, cache = model.apply({'params': params}, tokens[:, None], positions,
                              jnp.ones_like(positions), cache=cache)
  return logits[:, -1], cache


def decode(model: nn.Module, params: Any, logits: jnp.ndarray, cache: Cache,
           positions: jnp.ndarray, key: jax.Array, *, max_new_tokens: int, temperature: float,
           top_k: int, top_p: float, eos_id: int, pad_id: int, with_logprobs: bool = False
           ) -> jnp.ndarray | tuple[jnp.ndarray, jnp.ndarray]:
  """The decode loop after `prefill`: its logits [batch, vocab], cache and positions [batch, 1].

  Stops when every row has emitted EOS. Returns int32 [batch, max_new_tokens]: new tokens,
  `pad_id` after a row's EOS; with_logprobs, also float32 [batch, max_new_tokens]: each sampled
  token's log-probability at `temperature` before top-k/top-p filtering (0 after EOS), as
  rl.token_logprobs computes it from a full forward pass.
  """
  b = logits.shape[0]

  def cond(carry):
    i, _, _, done, _, _, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, logits, cache, done, out, logp, key = carry
    key, sub = jax.random.split(key)
    tok = next_token(logits, sub, temperature, top_k, top_p)
    out = out.at[:, i].set(jnp.where(done, pad_id, tok))
    if with_logprobs:
      lp = jax.nn.log_softmax(logits.astype(jnp.float32) / max(temperature, 1e-6), axis=-1)
      chosen = jnp.take_along_axis(lp, tok[:, None], axis=-1)[:, 0]
      logp = logp.at[:, i].set(jnp.where(done, 0.0, chosen))
    done |= tok == eos_id
    logits, cache = decode_step(model, params, tok, positions + i, cache)
    return i + 1, logits, cache, done, out, logp, key

  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
  logp = jnp.zeros((b, max_new_tokens) if with_logprobs else (0,), jnp.float32)
  carry = (0, logits, cache, jnp.zeros((b,), bool), out, logp, key)
  _, _, _, _, out, logp, _ = jax.lax.while_loop(cond, body, carry)
  return (out, logp) if with_logprobs else out


@functools.partial(jax.jit, static_argnames=('model', 'group', 'max_new_tokens', 'temperature'))
def sample_groups(model: nn.Module, params: Any, prompts: jnp.ndarray, prompt_mask: jnp.ndarray,
                  key: jax.Array, *, group: int, max_new_tokens: int, temperature: float,
                  eos_id: int, pad_id: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """`group` sampled replies to each left-padded prompt [prompts, prompt_len] that share its
  prefill: the prompt runs through the model once and its cache is repeated for its replies.
  Returns (replies int32, their log-probs float32), both [prompts * group, max_new_tokens], the
  replies of prompt p in rows p * group ... p * group + group - 1 (see `decode`)."""
  logits, cache, positions = prefill(model, params, prompts, prompt_mask,
                                     prompts.shape[1] + max_new_tokens)
  rows = jnp.repeat(jnp.arange(prompts.shape[0]), group)
  cache = take_cache_rows(model.cfg, cache, rows)
  return decode(model, params, logits[rows], cache, positions[rows], key,
                max_new_tokens=max_new_tokens, temperature=temperature, top_k=0, top_p=1.0,
                eos_id=eos_id, pad_id=pad_id, with_logprobs=True)


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'temperature', 'top_k',
                                             'top_p'))
def sample(model: nn.Module, params: Any, prompts: jnp.ndarray, prompt_mask: jnp.ndarray,
           key: jax.Array, *, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
           eos_id: int, pad_id: int, source: jnp.ndarray | None = None,
           source_mask: jnp.ndarray | None = None) -> jnp.ndarray:
  """Greedy (temperature 0) or sampled continuation of left-padded prompts.

  prompts, prompt_mask: [batch, prompt_len] (mask False on the left padding); source,
  source_mask: see `prefill`.
  Returns int32 [batch, max_new_tokens]: new tokens, `pad_id` after a row's EOS.
  """
  logits, cache, positions = prefill(model, params, prompts, prompt_mask,
                                     prompts.shape[1] + max_new_tokens, source, source_mask)
  return decode(model, params, logits, cache, positions, key, max_new_tokens=max_new_tokens,
                temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id, pad_id=pad_id)


class _Beams(NamedTuple):
  """Beam-search state; b rows of n beams, t = max_new_tokens."""
  step: jnp.ndarray  # [] tokens generated so far
  logits: jnp.ndarray  # [b * n, vocab] next-token logits of the alive beams
  cache: Cache  # batch b * n
  alive: jnp.ndarray  # [b, n, t] alive hypotheses (no EOS yet), pad after `step`
  alive_logprob: jnp.ndarray  # [b, n]
  finished: jnp.ndarray  # [b, n, t] hypotheses that ended with EOS, best first
  scores: jnp.ndarray  # [b, n] their length-penalised scores, -inf for empty slots


def _best(tokens: jnp.ndarray, scores: jnp.ndarray, n: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The n best of hypotheses [b, m, t] with scores [b, m], best first (ties: lowest index)."""
  scores, idx = jax.lax.top_k(scores, n)
  return jnp.take_along_axis(tokens, idx[..., None], axis=1), scores


@functools.partial(jax.jit, static_argnames=('model', 'num_beams', 'max_new_tokens'))
def beam_search(model: nn.Module, params: Any, prompts: jnp.ndarray, prompt_mask: jnp.ndarray, *,
                num_beams: int, max_new_tokens: int, length_penalty: float, eos_id: int,
                pad_id: int, source: jnp.ndarray | None = None,
                source_mask: jnp.ndarray | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The num_beams most likely continuations of left-padded prompts [batch, prompt_len] (and
  sources, see `prefill`).

  Each step extends the n alive beams by their 2n best (beam, token) candidates by cumulative
  log-prob; a candidate ending in EOS and ranked in the top n is finished (as in fairseq), the n
  best others stay alive. A finished hypothesis scores logprob / length ** length_penalty, length
  counting the new tokens with EOS (0: raw log-prob; 1: mean per token). A row stops once it has
  n finished hypotheses and no alive beam can beat the worst of them (an alive log-prob only
  falls; it is scored at its most favourable length up to max_new_tokens). Stopping at n
  finished alone, as fairseq does, lets unlikely early EOS candidates fill the slots while the
  best hypothesis is still alive: a confident model lost 2.7% of seq2seq_small's exact matches
  that way. At max_new_tokens, alive beams compete for the slots (scored without EOS). So
  num_beams=1 is greedy decoding.

  Returns (tokens int32 [batch, num_beams, max_new_tokens], pad after EOS; scores float32
  [batch, num_beams]), best first.
  """
  b, n, t = prompts.shape[0], num_beams, max_new_tokens
  logits, cache, positions = prefill(model, params, prompts, prompt_mask, prompts.shape[1] + t,
                                     source, source_mask)
  # One prefill per prompt, then every row is tiled to its n beams.
  logits, positions = jnp.repeat(logits, n, axis=0), jnp.repeat(positions, n, axis=0)
  cache = take_cache_rows(model.cfg, cache, jnp.repeat(jnp.arange(b), n))
  first_row = jnp.arange(b)[:, None] * n  # [b, 1] flat index of each row's first beam

  def length_norm(logprob, length):
    return logprob / jnp.asarray(length, jnp.float32) ** length_penalty

  def is_open(s: _Beams) -> jnp.ndarray:  # [b, 1]: whether a row's n best may still change
    worst = s.scores[:, -1:]
    best_alive = s.alive_logprob.max(axis=1, keepdims=True)
    bound = jnp.maximum(length_norm(best_alive, s.step + 1), length_norm(best_alive, t))
    return (worst == -jnp.inf) | (bound > worst)

  def body(s: _Beams) -> _Beams:
    vocab = s.logits.shape[-1]
    logprob = s.alive_logprob[..., None] + jax.nn.log_softmax(s.logits).reshape(b, n, vocab)
    cand_logprob, cand = jax.lax.top_k(logprob.reshape(b, n * vocab), 2 * n)  # [b, 2n]
    parent, tok = cand // vocab, cand % vocab
    hyps = jnp.take_along_axis(s.alive, parent[..., None], axis=1).at[:, :, s.step].set(tok)
    # At most n candidates are EOS, so n others always stay alive.
    is_eos = tok == eos_id
    ends = is_eos & (jnp.arange(2 * n) < n) & is_open(s)
    end_scores = jnp.where(ends, length_norm(cand_logprob, s.step + 1), -jnp.inf)
    finished, scores = _best(jnp.concatenate([s.finished, hyps], axis=1),
                             jnp.concatenate([s.scores, end_scores], axis=1), n)
    alive_logprob, keep = jax.lax.top_k(jnp.where(is_eos, -jnp.inf, cand_logprob), n)
    take = lambda x: jnp.take_along_axis(x, keep, axis=1)
    rows = (first_row + take(parent)).reshape(-1)
    # A row's beams share its source: the cross-attention keys/values stay as they are.
    cache = take_cache_rows(model.cfg, s.cache, rows, source=False)
    logits, cache = decode_step(model, params, take(tok).reshape(-1), positions + s.step, cache)
    alive = jnp.take_along_axis(hyps, keep[..., None], axis=1)
    return _Beams(s.step + 1, logits, cache, alive, alive_logprob, finished, scores)

  def cond(s: _Beams) -> jnp.ndarray:
    return (s.step < t) & jnp.any(is_open(s))

  empty = jnp.full((b, n, t), pad_id, jnp.int32)
  only_first = jnp.where(jnp.arange(n) == 0, 0.0, -jnp.inf)  # the n beams start identical
  s = jax.lax.while_loop(cond, body, _Beams(
      jnp.zeros((), jnp.int32), logits, cache, empty, jnp.tile(only_first, (b, 1)), empty,
      jnp.full((b, n), -jnp.inf)))
  alive_scores = jnp.where(is_open(s), length_norm(s.alive_logprob, s.step), -jnp.inf)
  return _best(jnp.concatenate([s.finished, s.alive], axis=1),
               jnp.concatenate([s.scores, alive_scores], axis=1), n)


def left_pad(token_lists: Sequence[Sequence[int]], pad_id: int,
             multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads prompts to one length, rounded up to a multiple of `multiple`.

  Returns (tokens, mask), int32 / bool [batch, length].
  """
  if not token_lists:
    raise UserError('got no prompts; expected a list of at least one token list; pass a prompt.')
  for i, t in enumerate(token_lists):
    if not t:
      raise UserError(f'prompt {i} is empty (0 tokens); expected at least 1 token; give at '
                      'least one character (or start it with BOS).')
  length = -(-max(len(t) for t in token_lists) // multiple) * multiple
  tokens = np.full((len(token_lists), length), pad_id, np.int32)
  mask = np.zeros((len(token_lists), length), bool)
  for i, t in enumerate(token_lists):
    tokens[i, length - len(t):] = t
    mask[i, length - len(t):] = True
  return tokens, mask


def generate(model: nn.Module, params: Any, tokenizer: tokenizers.Tokenizer,
             prompts: Sequence[Sequence[int]], sampling: ml_collections.ConfigDict,
             key: jax.Array, sources: Sequence[Sequence[int]] | None = None) -> list[list[int]]:
  """The new tokens for each prompt (token ids), cut before the first EOS.

  sampling: the `sampling` config section. strategy 'greedy' (or temperature 0) takes the argmax,
  'sample' draws with temperature / top_k / top_p from `key`, 'beam' returns the best hypothesis
  of `beam_search`. All prompts run as one left-padded batch. sources: one token list per prompt
  for encoder-decoder models (the decoder prompt is then typically [BOS]).
  """
  s = sampling
  check_sampling(s)
  tokens, mask = left_pad(prompts, tokenizer.pad_id, PROMPT_BUCKET)
  source = {}
  if sources is not None:
    if max(len(x) for x in sources) > model.cfg.max_len:
      raise UserError(f'a source has {max(len(x) for x in sources)} tokens, more than '
                      f'model.max_len={model.cfg.max_len}; shorten it.')
    source = dict(zip(('source', 'source_mask'),
                      left_pad(sources, tokenizer.pad_id, PROMPT_BUCKET)))
  longest = max(len(p) for p in prompts)
  if longest + s.max_new_tokens > model.cfg.max_len:
    raise UserError(f'the prompt has {longest} tokens and sampling.max_new_tokens='
                    f'{s.max_new_tokens}, {longest + s.max_new_tokens} in all, more than '
                    f'model.max_len={model.cfg.max_len}; shorten the prompt or lower '
                    '--config.sampling.max_new_tokens so that they fit.')
  common = dict(max_new_tokens=s.max_new_tokens, eos_id=tokenizer.eos_id,
                pad_id=tokenizer.pad_id, **source)
  if s.strategy == 'beam':
    out = beam_search(model, params, tokens, mask, num_beams=s.num_beams,
                      length_penalty=s.length_penalty, **common)[0][:, 0]
  elif s.strategy == 'greedy' or s.temperature == 0:
    out = sample(model, params, tokens, mask, key, temperature=0.0, top_k=0, top_p=1.0, **common)
  else:
    out = sample(model, params, tokens, mask, key, temperature=s.temperature, top_k=s.top_k,
                 top_p=s.top_p, **common)
  rows = np.asarray(out).tolist()
  return [row[:row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row for row in rows]


def chat_prompt(tokenizer: tokenizers.Tokenizer,
                messages: Sequence[Mapping[str, str]]) -> list[int]:
  """The ids of a conversation ({'role', 'content'} dicts) followed by the assistant's turn.

  The reply generated from it runs until EOS; the caller appends it to `messages` as
  {'role': 'assistant', ...} to keep the multi-turn history.
  """
  return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
