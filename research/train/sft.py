"""Supervised fine-tuning: next-token loss on the answers of prompt -> answer examples only.

Starts from `train.init_from` (or from a short pretraining it runs itself in <workdir>/pretrain,
see `sft.pretrain`), trains all weights or, with `lora.rank` > 0, only LoRA adapters (the
checkpoints then hold the adapters alone), and reports held-out exact match of greedy replies
before and after, in <workdir>/exact_match.json.
"""

import copy
import dataclasses
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from research import config as config_lib
from research import perf
from research import tokenizers
from research.data import sft as sft_data
from research.data import synthetic
from research.errors import UserError
from research.nn import lora
from research.nn.transformer import DecoderLM, init_decoder
from research import runs
from research.train import lm, loop, stages


def base_run(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The run to start from: train.init_from, else <workdir>/pretrain once pretrained there with
  the `sft.pretrain` train keys (resumed or skipped when done), else '' (a fresh init)."""
  if config.train.init_from or not config.sft.pretrain.steps:
    return config.train.init_from
  pre = copy.deepcopy(config)
  pre.stage = 'pretrain'
  pre.lora.rank = 0
  pre.train.update(config.sft.pretrain.to_dict())
  return stages.run_stage(pre, os.path.join(workdir, 'pretrain'))


def make_rows(config: ml_collections.ConfigDict, tok: tokenizers.Tokenizer,
              records: Sequence[sft_data.Record], name: str) -> dict[str, np.ndarray]:
  """Tokenised, fitted (and counted) and laid out rows of `records`, in a seeded order."""
  order = np.random.default_rng(config.seed).permutation(len(records))
  examples, report = sft_data.fit([sft_data.encode(tok, records[i]) for i in order],
                                  config.train.seq_len, config.sft.overlong)
  if not examples:
    raise UserError(f'no {name} example has an answer token within train.seq_len='
                    f'{config.train.seq_len}; raise seq_len or shorten the examples.')
  rows = sft_data.make_rows(examples, config.train.seq_len, config.sft.packing, tok.pad_id)
  fill = (rows['segment_ids'] > 0).mean()
  print(f'sft {name}: {len(examples)} examples in {len(rows["inputs"])} rows ({fill:.0%} filled), '
        f'{report.truncated} truncated and {report.skipped} skipped (longer than '
        f'train.seq_len + 1 = {config.train.seq_len + 1} tokens: sft.overlong='
        f'{config.sft.overlong!r})', flush=True)
  return rows


def make_task(config: ml_collections.ConfigDict, model: DecoderLM, base: Any,
              train_rows: dict[str, np.ndarray], held_out_rows: dict[str, np.ndarray]
              ) -> loop.Task:
  """Full fine-tuning of `base`, or (lora.rank > 0) training adapters of it, on packed rows."""
  t, lc = config.train, config.lora
  micro_batch = config_lib.micro_batch(config)
  lm_loss_fn, lm_eval_fn = lm.lm_fns(model, t.loss_chunk)
  loss_fn, eval_fn, init_params, frozen = lm_loss_fn, lm_eval_fn, lambda key: base, None
  start = None if lc.rank else base
  if lc.rank:  # The trained params are the adapters; the base weights are frozen.
    merged = lambda adapters, base: lora.merge(base, adapters, lc.alpha, lc.rank)
    loss_fn = lambda adapters, batch, key, frozen: lm_loss_fn(merged(adapters, frozen), batch, key)
    eval_fn = lambda adapters, batch, frozen: lm_eval_fn(merged(adapters, frozen), batch)
    init_params, frozen = lambda key: lora.init(key, base, lc.rank, lc.targets), base
  flops = perf.model_flops_per_token(config.model, base, t.seq_len)
  train_batch, eval_batches = sft_data.row_batches(train_rows, held_out_rows, micro_batch,
                                                    config.seed, t.eval_batches)
  return loop.Task(
      init_params=init_params,
      loss_fn=loss_fn,
      eval_fn=eval_fn,
      train_batch=train_batch,
      eval_batches=eval_batches,
      tokens_per_step=t.batch_size * t.seq_len,
      flops_per_token=lambda params: flops,
      batch_weight=lm.target_tokens,
      frozen=frozen,
      start_params=start)


def step_spec(config: ml_collections.ConfigDict, cfg) -> tuple[loop.Task, loop.Batch]:
  """(task, one micro-batch) of this stage for the model `cfg`, on placeholder data (only the
  shapes matter): the train step that research/compile.py compiles."""
  t = config.train
  model = DecoderLM(cfg)
  init = lambda key: init_decoder(model, key, t.seq_len)
  base = jax.eval_shape(init, jax.random.key(0))  # LoRA reads only its shapes.
  example = sft_data.Example(np.zeros(t.seq_len + 1, np.int32), np.ones(t.seq_len + 1, np.float32))
  rows = sft_data.make_rows([example] * t.batch_size, t.seq_len, False, 0)
  task = make_task(config, model, base, rows, rows)
  if not config.lora.rank:
    task = dataclasses.replace(task, init_params=init, start_params=None)
  return task, task.train_batch(0, 0, slice(None))


def train(config: ml_collections.ConfigDict, workdir: str) -> loop.RunResult:
  """Fine-tunes in `workdir` (resuming if it holds a checkpoint); writes exact_match.json."""
  config = copy.deepcopy(config)
  config.train.init_from = base_run(config, workdir)
  if config.lora.rank and not config.train.init_from:
    raise UserError(f'lora.rank={config.lora.rank} needs weights to adapt; set train.init_from or '
                    'sft.pretrain.steps > 0, or lora.rank=0 to train all weights.')
  train, held_out = sft_data.load_records(config)
  if config.train.init_from:
    runs.write_config(config, workdir)  # Records where the weights came from (for LoRA).
    tok, base = runs.init_from(config, workdir)
  else:
    tok = lm.prepare_tokenizer(config, workdir, lambda: [
        r.text if r.messages is None else ''.join(m['content'] for m in r.messages)
        for r in train])
  model = DecoderLM(config_lib.model_config(config, tok.vocab_size))
  if not config.train.init_from:
    base = model.init(jax.random.key(config.seed),
                      jnp.zeros((1, config.train.seq_len), jnp.int32))['params']
  task = make_task(config, model, base, make_rows(config, tok, train, 'train'),
                   make_rows(config, tok, held_out, 'held-out'))
  results = {'before': sft_data.score(config, model, base, tok, held_out)}
  print(f'held-out exact match before SFT: {results["before"]}', flush=True)
  result = loop.run(config, workdir, task)
  params = (lora.merge(base, result.params, config.lora.alpha, config.lora.rank)
            if config.lora.rank else result.params)
  results['after'] = sft_data.score(config, model, params, tok, held_out)
  print(f'held-out exact match after SFT: {results["after"]}', flush=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'exact_match.json'), 'w') as f:
      json.dump(results, f, indent=2)
  return result


def sections() -> dict[str, ml_collections.ConfigDict]:
  return {
      'sft': ml_collections.ConfigDict(dict(
          path='',  # '' = the built-in verifiable task (research/data/synthetic.py); else a .jsonl.
          num_train=20000,  # Built-in task: train problems,
          num_held_out=200,  # and held-out ones (loss and exact match),
          kinds=synthetic.KINDS,  # of these kinds (also the reward pairs' and PPO prompts').
          held_out_fraction=0.05,  # A .jsonl: the share of records held out.
          packing=True,  # Several examples per row (segment ids), else one padded example per row.
          overlong='truncate',  # Examples longer than train.seq_len + 1 tokens: truncate | skip.
          max_new_tokens=16,  # Greedy reply length for held-out exact match.
          # Without train.init_from: pretrain first (in <workdir>/pretrain) with these train.*
          # keys (steps=0: fine-tune the random init).
          pretrain=ml_collections.ConfigDict(dict(steps=0, batch_size=16, learning_rate=2e-3,
                                                  warmup_steps=50)),
      )),
      # LoRA (research/nn/lora.py); rank 0 = full fine-tuning. targets: regexes over parameter
      # paths.
      'lora': ml_collections.ConfigDict(dict(
          rank=0,
          alpha=16.0,
          targets=(r'attn/(query|key|value|out)/kernel$', r'ffn/(wi|wg|wo)/kernel$'),
      )),
  }


def check(config: ml_collections.ConfigDict) -> None:
  if config.lora.rank < 0:
    raise UserError(f'lora.rank={config.lora.rank} must be >= 0 (0 = full fine-tuning).')
  if config.sft.overlong not in OVERLONG:
    raise UserError(f'sft.overlong={config.sft.overlong!r} is not one of {OVERLONG}.')


OVERLONG = ('truncate', 'skip')
STAGE = stages.Stage(name='sft', train=train, sections=sections, check=check, step_spec=step_spec,
                     reads=('sft',))
