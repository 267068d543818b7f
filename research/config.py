"""The default experiment config (every key any stage reads) and checks across sections.

Experiments start from `default_config()` and change what they need; `--config.a.b=value`
overrides any key from the command line with its type checked.
"""

import dataclasses
import json
import os

import ml_collections

from research import tokenizers
from research.errors import UserError
from research.nn.config import ModelConfig


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stage = 'pretrain'  # Which trainer runs the experiment (research/train/<stage>.py).

  c.data = ml_collections.ConfigDict(dict(
      path='',  # '' = the Python standard library's own sources; else a file, folder or .jsonl.
      val_fraction=0.05,
      text_field='text',  # JSONL field holding the text.
  ))
  c.tokenizer = tokenizers.default_config()
  fields = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name != 'vocab_size'}
  c.model = ml_collections.ConfigDict(fields)
  c.train = ml_collections.ConfigDict(dict(
      steps=1000,
      batch_size=32,  # Sequences per optimiser step (over all devices and micro-batches).
      seq_len=128,
      grad_accum_steps=1,
      learning_rate=1e-3,
      warmup_steps=100,
      schedule='cosine',  # cosine | linear | constant (after linear warmup)
      min_lr_ratio=0.1,
      weight_decay=0.1,
      b1=0.9,
      b2=0.95,
      grad_clip=1.0,
      log_every=50,
      eval_every=250,
      eval_batches=8,
      checkpoint_every=500,
      keep_checkpoints=3,
  ))
  # Device mesh axis sizes (research/parallel.py); -1 = all remaining devices.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
  c.sampling = ml_collections.ConfigDict(dict(
      strategy='sample',  # greedy | sample | beam
      temperature=0.8,
      top_k=0,  # 0 = off
      top_p=1.0,  # 1.0 = off
      num_beams=4,
      length_penalty=1.0,
      max_new_tokens=200,
      prompt='',  # Prompt of the sample written to samples.txt at the end of training.
  ))
  return c


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
  return ModelConfig(vocab_size=vocab_size, **config.model.to_dict())


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises UserError for settings that cannot work together (before anything is written)."""
  t = config.train
  model_config(config, vocab_size=1)  # Checks the model section.
  if t.seq_len > config.model.max_len:
    raise UserError(f'train.seq_len={t.seq_len} is longer than model.max_len='
                    f'{config.model.max_len}; lower seq_len or raise max_len.')
  for key in ('steps', 'batch_size', 'seq_len', 'grad_accum_steps', 'log_every', 'eval_every',
              'eval_batches', 'checkpoint_every', 'keep_checkpoints'):
    if t[key] < 1:
      raise UserError(f'train.{key}={t[key]} must be >= 1.')
  if t.batch_size % t.grad_accum_steps:
    raise UserError(f'train.batch_size={t.batch_size} is not divisible by train.grad_accum_steps='
                    f'{t.grad_accum_steps}; each micro-batch has batch_size/grad_accum_steps rows.')
  if t.learning_rate <= 0:
    raise UserError(f'train.learning_rate={t.learning_rate} must be > 0.')


# Sections that fix what a workdir holds (weights, tokenizer, token caches): a rerun in the same
# workdir must keep them; train.* and sampling.* may change between runs (e.g. more steps).
FIXED_SECTIONS = ('model', 'tokenizer', 'data')


def save_to_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes `workdir/config.json`, refusing a workdir made with other fixed sections."""
  path = os.path.join(workdir, 'config.json')
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    current = json.loads(config.to_json())
    diffs = [f'{s}.{k}: {saved.get(s, {}).get(k)!r} there, {v!r} now'
             for s in FIXED_SECTIONS for k, v in current[s].items()
             if saved.get(s, {}).get(k) != v]
    if diffs:
      raise UserError(f'{workdir} holds a run with another config ({"; ".join(diffs[:3])}); '
                      'use a new --workdir, or the settings it was made with.')
  os.makedirs(workdir, exist_ok=True)
  with open(path + '.tmp', 'w') as f:
    f.write(config.to_json(indent=2))
  os.replace(path + '.tmp', path)
