"""Decode speed: tokens/s of cached decoding against recomputing the whole context every token.

  python bench/decode_speed.py          # context 512; about 4 minutes on 2 CPU cores
  python bench/decode_speed.py --quick  # context 128, fewer tokens; about 1 minute

Models (random weights, float32): pretrain_small's shape (experiments/pretrain_small.py, its char
vocabulary of 232; max_len raised to fit the context if needed) and GPT-2 small (12 layers, 12
heads, d_model 768, vocab 50257, max_len 1024). Batch 1 and 16. Both paths generate greedily
after a context of --context tokens and are timed on decoding only, compile excluded
(`.lower().compile()` first):
  cached     `decoding.decode`, the on-device loop that `decoding.sample` runs after its prefill,
             from a KV cache that holds the context (its values do not change the cost, so it is
             not prefilled), for --new_tokens tokens;
  recompute  per token, a jitted full forward pass over the fixed padded shape
             [batch, context + new_tokens] (as a model without a cache would run), then the
             argmax at the current position; every token costs the same, so one is timed.
Each cell is the best of --repeats runs (fewer where they would pass 20 s).
Expected (acceptance): cached >= 10x recompute for GPT-2 small at context 512 on CPU.
"""

import argparse
import dataclasses
import functools
import importlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

from research import config as config_lib
from research import decoding
from research import perf
from research.nn.config import ModelConfig
from research.nn.transformer import DecoderLM, init_cache


def model_configs(context: int, new_tokens: int) -> dict[str, ModelConfig]:
  small = config_lib.model_config(
      importlib.import_module('experiments.pretrain_small').get_config(), 232)
  small = dataclasses.replace(small, max_len=max(small.max_len, context + new_tokens))
  gpt2 = ModelConfig(vocab_size=50257, num_layers=12, num_heads=12, d_model=768, max_len=1024)
  return {'pretrain_small': small, 'gpt2_small': gpt2}


def filled_cache(cfg: ModelConfig, batch: int, context: int, length: int):
  """A cache of `length` slots whose first `context` hold (zero) keys and values of one sequence."""
  cache = init_cache(cfg, batch, length)
  held = jnp.arange(length) < context
  cache['index'] = jnp.asarray(context, jnp.int32)
  cache['pos'] = jnp.broadcast_to(jnp.where(held, jnp.arange(length), 0), (batch, length))
  cache['seg'] = jnp.broadcast_to(held.astype(jnp.int32), (batch, length))
  return cache


def best_seconds(fn, repeats: int, budget_s: float = 20.0) -> float:
  """The fastest of up to `repeats` timed calls of fn: at least one, none started after budget_s."""
  times = []
  while len(times) < repeats and (not times or sum(times) < budget_s):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def time_cached(model: DecoderLM, params, batch: int, context: int, new_tokens: int,
                repeats: int) -> float:
  """Tokens/s of `decoding.decode` (greedy; EOS never stops it) over new_tokens steps."""
  cache = filled_cache(model.cfg, batch, context, context + new_tokens)
  logits = jnp.zeros((batch, model.cfg.vocab_size), jnp.float32)
  positions = jnp.full((batch, 1), context, jnp.int32)
  run = jax.jit(functools.partial(decoding.decode, model, max_new_tokens=new_tokens,
                                  temperature=0.0, top_k=0, top_p=1.0, eos_id=-1, pad_id=0))
  args = (params, logits, cache, positions, jax.random.key(0))
  run = run.lower(*args).compile()
  return batch * new_tokens / best_seconds(lambda: run(*args).block_until_ready(), repeats)


def time_recompute(model: DecoderLM, params, batch: int, context: int, new_tokens: int,
                   repeats: int) -> float:
  """Tokens/s of greedy decoding by one full forward pass per token (timed on the first token)."""

  def step(params, tokens, mask, i):
    logits = model.apply({'params': params}, tokens, *decoding.prompt_layout(mask))[0]
    tok = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, context - 1 + i, 1, False), -1)
    return tokens.at[:, context + i].set(tok), mask.at[:, context + i].set(True)

  length = context + new_tokens
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, model.cfg.vocab_size,
                                                         (batch, length)), jnp.int32)
  mask = jnp.broadcast_to(jnp.arange(length) < context, (batch, length))
  args = (params, tokens, mask, jnp.int32(0))
  run = jax.jit(step).lower(*args).compile()
  return batch / best_seconds(lambda: run(*args)[0].block_until_ready(), repeats)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='context 128, fewer tokens')
  parser.add_argument('--context', type=int, default=512)
  parser.add_argument('--new_tokens', type=int, default=32)
  parser.add_argument('--repeats', type=int, default=3, help='timed runs per cell (the best '
                      'counts), fewer where they would pass 20 s')
  parser.add_argument('--batches', default='1,16')
  args = parser.parse_args()
  perf.tune_cpu_runtime()  # As launch.py does.
  if args.quick:
    args.context, args.new_tokens = 128, 16
  print(f'device: {jax.devices()[0].device_kind}; context {args.context}; cached: '
        f'{args.new_tokens} new tokens; best of up to {args.repeats} runs', flush=True)
  print(f'{"model":15} {"params":>12} {"batch":>5} {"cached tok/s":>13} {"recompute tok/s":>16} '
        f'{"speed-up":>9}', flush=True)
  for name, cfg in model_configs(args.context, args.new_tokens).items():
    model = DecoderLM(cfg)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))['params']
    count = sum(x.size for x in jax.tree.leaves(params))
    for batch in map(int, args.batches.split(',')):
      cached = time_cached(model, params, batch, args.context, args.new_tokens, args.repeats)
      recompute = time_recompute(model, params, batch, args.context, args.new_tokens,
                                 args.repeats)
      print(f'{name:15} {count:>12,} {batch:>5} {cached:>13,.1f} {recompute:>16,.2f} '
            f'{cached / recompute:>8.1f}x', flush=True)


if __name__ == '__main__':
  main()
