"""Causal language-model pretraining: next-token cross-entropy over packed windows of text."""

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from research import config as config_lib
from research import decoding
from research import perf
from research import runs
from research import tokenizers
from research.data import lm as lm_data
from research.data import sources
from research.nn.transformer import DecoderLM
from research.train import lm, loop, stages


def make_task(config: ml_collections.ConfigDict, model: DecoderLM, train_tokens: np.ndarray,
              val_tokens: np.ndarray, start_params: Any = None) -> loop.Task:
  """The pretraining task, from `start_params` (default: a fresh init)."""
  t = config.train
  micro_batch = config_lib.micro_batch(config)
  loss_fn, eval_fn = lm.lm_fns(model, t.loss_chunk)
  return loop.Task(
      init_params=lambda key: model.init(key, jnp.zeros((1, t.seq_len), jnp.int32))['params'],
      start_params=start_params,
      loss_fn=loss_fn,
      eval_fn=eval_fn,
      train_batch=lambda step, micro, rows: lm_data.lm_batch(train_tokens, micro_batch, t.seq_len,
                                                        config.seed, step, micro, rows),
      eval_batches=lm_data.eval_batches(val_tokens, t.eval_batches, micro_batch, t.seq_len),
      tokens_per_step=t.batch_size * t.seq_len,
      flops_per_token=lambda params: perf.model_flops_per_token(config.model, params, t.seq_len))


def step_spec(config: ml_collections.ConfigDict, cfg) -> tuple[loop.Task, loop.Batch]:
  """(task, one micro-batch) of this stage for the model `cfg`, on placeholder data (only the
  shapes matter): the train step that research/compile.py compiles."""
  tokens = np.zeros(2 * config.train.seq_len + 4, np.uint16)
  task = make_task(config, DecoderLM(cfg), tokens, tokens)
  return task, task.train_batch(0, 0, slice(None))


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
  """Entropy (nats/token) of the token frequencies: the loss of a model that ignores context."""
  counts = np.bincount(np.asarray(tokens), minlength=vocab_size).astype(np.float64)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


def write_sample(config: ml_collections.ConfigDict, workdir: str, model: DecoderLM, params,
                 tok: tokenizers.Tokenizer) -> str:
  """Generates from config.sampling.prompt; process 0 writes prompt + continuation to
  samples.txt."""
  s = config.sampling
  ids = tok.encode(s.prompt, add_bos=True)
  new = min(s.max_new_tokens, config.model.max_len - len(ids))
  prompts, mask = decoding.left_pad([ids], tok.pad_id)
  out = decoding.sample(model, params, prompts, mask, jax.random.key(config.seed),
                        max_new_tokens=new, temperature=s.temperature, top_k=s.top_k,
                        top_p=s.top_p, eos_id=tok.eos_id, pad_id=tok.pad_id)
  text = s.prompt + tok.decode(np.asarray(out[0]))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'samples.txt'), 'w') as f:
      f.write(f'# prompt: {s.prompt!r}, temperature {s.temperature}, top_k {s.top_k}, '
              f'top_p {s.top_p}\n{text}\n')
  return text


def train(config: ml_collections.ConfigDict, workdir: str) -> loop.RunResult:
  """Pretrains a GPT in `workdir` (resuming if it holds a checkpoint) and writes a sample."""
  params = runs.init_from(config, workdir)[1] if config.train.init_from else None
  tok, train_tokens, val_tokens = lm.prepare_data(config, workdir)
  model = DecoderLM(config_lib.model_config(config, tok.vocab_size))
  entropy = unigram_entropy(val_tokens, tok.vocab_size)
  print(f'tokenizer {config.tokenizer.kind}: vocab {tok.vocab_size} | train {len(train_tokens):,} '
        f'tokens | val {len(val_tokens):,} tokens | val unigram entropy {entropy:.3f} nats/token',
        flush=True)
  with open(os.path.join(workdir, 'data', 'stats.json'), 'w') as f:
    json.dump({'train_tokens': len(train_tokens), 'val_tokens': len(val_tokens),
               'val_unigram_entropy': entropy, 'vocab_size': tok.vocab_size}, f)
  result = loop.run(config, workdir, make_task(config, model, train_tokens, val_tokens, params))
  text = write_sample(config, workdir, model, result.params, tok)  # SPMD: every process samples.
  if jax.process_index() == 0:
    print('sample:\n' + text, flush=True)
  return result


def tokenizer_report(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The tokenizer report on the val split: the workdir's tokenizer if it has one, else one
  trained now from the config (and not saved)."""
  docs = sources.load_documents(config.data.path, config.data.text_field)
  train, val = sources.split_documents(docs, config.data.val_fraction)
  directory = os.path.join(workdir, 'tokenizer')
  tok = (tokenizers.load_tokenizer(directory) if os.path.isdir(directory)
         else tokenizers.train_tokenizer(config.tokenizer, [d.text for d in train]))
  return tokenizers.tokenizer_report(tok, ''.join(d.text for d in val))


STAGE = stages.Stage(name='pretrain', train=train, step_spec=step_spec)
