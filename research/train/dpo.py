"""Direct preference optimisation (Rafailov et al. 2023): the policy learns from preference pairs
directly, with loss -log sigmoid(beta * ((logp_c - ref_c) - (logp_r - ref_r))) where logp sums
the log-probs of the completion tokens and the reference (the starting SFT model) log-probs are
computed once before training. With dpo.nll_coef > 0 the loss adds that multiple of the chosen
answers' per-token NLL (RPO, Pang et al. 2024: plain DPO can make the chosen answers less likely
while it widens the margin, and on tasks with one right answer that costs accuracy).

Starts from `train.init_from`, else trains `earlier.sft` in <workdir>/sft first; the pairs are
the reward stage's (`reward.*` keys). Held-out exact match of greedy replies before and after
goes to <workdir>/exact_match.json.
"""

import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from research import config as config_lib
from research import perf
from research import rl
from research.data import preferences
from research.data import sft as sft_data
from research.nn.transformer import DecoderLM, init_decoder
from research import runs
from research.train import loop, stages


def completion_logprobs(model: DecoderLM, params: Any, batch: dict) -> jnp.ndarray:
  """Summed log-probs [pairs, 2] of the completion tokens of `preferences.encode_pairs` rows."""
  tokens = batch['tokens']
  n, _, length = tokens.shape
  tokens = tokens.reshape(2 * n, length)
  segments = (jnp.arange(length) < batch['length'].reshape(2 * n, 1)).astype(jnp.int32)
  logits, _ = model.apply({'params': params}, tokens[:, :-1], None, segments[:, :-1])
  logp, _ = rl.token_logprobs(logits, tokens[:, 1:])
  return (logp * batch['completion'].reshape(2 * n, length)[:, 1:]).sum(-1).reshape(n, 2)


def with_reference(rows: dict[str, np.ndarray], logprob_fn, batch_size: int
                   ) -> dict[str, np.ndarray]:
  """`rows` plus 'ref_logp' [pairs, 2]: the reference model's completion log-probs."""
  n = len(rows['tokens'])
  ref = [np.asarray(logprob_fn({k: v[i:i + batch_size] for k, v in rows.items()}))
         for i in range(0, n, batch_size)]
  return {**rows, 'ref_logp': np.concatenate(ref)}


def make_task(config: ml_collections.ConfigDict, model: DecoderLM, init_params,
              train_rows: dict[str, np.ndarray], held_rows: dict[str, np.ndarray]) -> loop.Task:
  """DPO on `with_reference` rows; init_params(key) -> the starting policy."""
  t = config.train
  micro_batch = config_lib.micro_batch(config)

  def loss_fn(params, batch, key):
    del key
    return rl.dpo_loss(completion_logprobs(model, params, batch), batch['ref_logp'],
                       config.dpo.beta, batch['completion'][:, 0, 1:].sum(-1), config.dpo.nll_coef)

  def eval_fn(params, batch):
    loss, metrics = loss_fn(params, batch, None)
    return {'loss': loss, **metrics}

  train_batch, eval_batches = sft_data.row_batches(train_rows, held_rows, micro_batch,
                                                    config.seed, t.eval_batches)
  return loop.Task(
      init_params=init_params,
      loss_fn=loss_fn,
      eval_fn=eval_fn,
      train_batch=train_batch,
      eval_batches=eval_batches,
      tokens_per_step=t.batch_size * 2 * t.seq_len,
      flops_per_token=lambda params: perf.model_flops_per_token(config.model, params, t.seq_len))


def step_spec(config: ml_collections.ConfigDict, cfg) -> tuple[loop.Task, dict]:
  """(task, one micro-batch) of this stage for the model `cfg`, on placeholder data (only the
  shapes matter): the train step that research/compile.py compiles."""
  t = config.train
  rows = preferences.placeholder_rows(t.batch_size * t.eval_batches, t.seq_len)
  rows['ref_logp'] = np.zeros((t.batch_size * t.eval_batches, 2), np.float32)
  model = DecoderLM(cfg)
  task = make_task(config, model, lambda key: init_decoder(model, key), rows, rows)
  return task, task.train_batch(0, 0, slice(None))


def train(config: ml_collections.ConfigDict, workdir: str) -> loop.RunResult:
  """Trains the policy with DPO in `workdir` (resuming); writes exact_match.json."""
  tok, base = runs.init_from(config, workdir)
  model = DecoderLM(config_lib.model_config(config, tok.vocab_size))
  t = config.train
  train, held_out = preferences.load_pairs(config)
  ref_fn = jax.jit(functools.partial(completion_logprobs, model, base))
  train_rows = with_reference(preferences.encode_pairs(tok, train, t.seq_len)[0], ref_fn,
                              t.batch_size)
  held_rows = with_reference(preferences.encode_pairs(tok, held_out, t.seq_len)[0], ref_fn,
                             t.batch_size)
  task = make_task(config, model, lambda key: base, train_rows, held_rows)
  _, held_records = sft_data.load_records(config)
  results = {'before': sft_data.score(config, model, base, tok, held_records)}
  print(f'held-out exact match before DPO: {results["before"]}', flush=True)
  result = loop.run(config, workdir, task)
  results['after'] = sft_data.score(config, model, result.params, tok, held_records)
  print(f'held-out exact match after DPO: {results["after"]}', flush=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'exact_match.json'), 'w') as f:
      json.dump(results, f, indent=2)
  return result


def sections() -> dict[str, ml_collections.ConfigDict]:
  # On the reward section's pairs.
  return {'dpo': ml_collections.ConfigDict(dict(
      beta=0.1,
      nll_coef=0.0,  # > 0: plus this times the chosen answers' per-token NLL (RPO).
  ))}


STAGE = stages.Stage(name='dpo', train=train, needs=(stages.Need('sft'),), sections=sections,
                     step_spec=step_spec, reads=('sft', 'pairs'))
