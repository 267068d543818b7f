"""Text generation: prefill the KV cache with the prompt, then decode one token at a time on
device (`lax.while_loop`) with greedy or temperature / top-k / top-p sampling."""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from research.errors import UserError
from research.nn.transformer import init_cache


def check_sampling(strategy: str, temperature: float, top_k: int, top_p: float,
                   num_beams: int) -> None:
  """One clear error per impossible sampling setting."""
  if strategy not in ('greedy', 'sample', 'beam'):
    raise UserError(f"sampling.strategy={strategy!r} is not one of ('greedy', 'sample', 'beam').")
  if temperature < 0:
    raise UserError(f'sampling.temperature={temperature} must be >= 0 (0 means greedy).')
  if top_k < 0:
    raise UserError(f'sampling.top_k={top_k} must be >= 0 (0 turns it off).')
  if not 0 < top_p <= 1:
    raise UserError(f'sampling.top_p={top_p} must be in (0, 1] (1 turns it off).')
  if num_beams < 1:
    raise UserError(f'sampling.num_beams={num_beams} must be >= 1.')


def filter_logits(logits: jnp.ndarray, top_k: int, top_p: float) -> jnp.ndarray:
  """Sets to -inf every logit outside the top k and outside the nucleus of mass top_p.

  logits: [batch, vocab]. The nucleus is the smallest set of most likely tokens whose
  probability reaches top_p (Holtzman et al. 2020). Ties at the boundary are kept.
  """
  if top_k > 0:
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


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'temperature', 'top_k',
                                             'top_p', 'eos_id', 'pad_id'))
def sample(model: nn.Module, params: Any, prompts: jnp.ndarray, prompt_mask: jnp.ndarray,
           key: jax.Array, *, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
           eos_id: int, pad_id: int) -> jnp.ndarray:
  """Greedy (temperature 0) or sampled continuation of left-padded prompts.

  prompts, prompt_mask: [batch, prompt_len] (mask False on the left padding).
  Returns int32 [batch, max_new_tokens]: new tokens, `pad_id` after a row's EOS.
  """
  b, p = prompts.shape
  positions, segments = prompt_layout(prompt_mask)
  cache = init_cache(model.cfg, b, p + max_new_tokens)
  logits, cache = model.apply({'params': params}, prompts, positions, segments, cache=cache)
  last_pos = positions[:, -1:]

  def cond(carry):
    i, _, _, done, _, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, logits, cache, done, out, key = carry
    key, sub = jax.random.split(key)
    tok = next_token(logits, sub, temperature, top_k, top_p)
    out = out.at[:, i].set(jnp.where(done, pad_id, tok))
    done |= tok == eos_id
    logits, cache = model.apply({'params': params}, tok[:, None], last_pos + 1 + i,
                                jnp.ones((b, 1), jnp.int32), cache=cache)
    return i + 1, logits[:, -1], cache, done, out, key

  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
  carry = (0, logits[:, -1], cache, jnp.zeros((b,), bool), out, key)
  return jax.lax.while_loop(cond, body, carry)[4]


def left_pad(token_lists: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads prompts to one length: (tokens, mask), int32 / bool [batch, max_len]."""
  if not token_lists or any(len(t) == 0 for t in token_lists):
    raise UserError('the prompt is empty after tokenisation; give at least one character.')
  length = max(len(t) for t in token_lists)
  tokens = np.full((len(token_lists), length), pad_id, np.int32)
  mask = np.zeros((len(token_lists), length), bool)
  for i, t in enumerate(token_lists):
    tokens[i, length - len(t):] = t
    mask[i, length - len(t):] = True
  return tokens, mask
