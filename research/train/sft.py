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
from research import decoding
from research import perf
from research import tokenizers
from research.data import sft as sft_data
from research.data import synthetic
from research.errors import UserError
from research.nn import lora
from research.nn.transformer import DecoderLM, init_decoder
from research.train import loop, pretrain, stages


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


def load_records(config: ml_collections.ConfigDict
                 ) -> tuple[list[sft_data.Record], list[sft_data.Record]]:
  """(train, held-out) records: of the JSONL file sft.path, or of the built-in task."""
  s = config.sft
  if s.path:
    train, held_out = sft_data.split(sft_data.read_jsonl(s.path), s.held_out_fraction)
  else:
    train, held_out = (sft_data.task_records(synthetic.problems(split, n, config.seed, s.kinds))
                       for split, n in (('train', s.num_train), ('held_out', s.num_held_out)))
  if not train or not held_out:
    raise UserError(f'the SFT data has {len(train)} train and {len(held_out)} held-out records; '
                    'both need some: add records or change sft.held_out_fraction.')
  return train, held_out


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


def exact_match(model: DecoderLM, params: Any, tok: tokenizers.Tokenizer,
                records: Sequence[sft_data.Record], sampling: ml_collections.ConfigDict,
                max_new_tokens: int) -> list[bool]:
  """Whether the greedy reply to each conversation's earlier turns equals its last (assistant)
  message, stripped."""
  s = copy.deepcopy(sampling)
  s.update(dict(strategy='greedy', max_new_tokens=max_new_tokens))
  prompts = [decoding.chat_prompt(tok, r.messages[:-1]) for r in records]
  replies = decoding.generate(model, params, tok, prompts, s, jax.random.key(0))
  return [synthetic.matches(tok.decode(reply), r.messages[-1]['content'])
          for reply, r in zip(replies, records)]


def score(config: ml_collections.ConfigDict, model: DecoderLM, params: Any,
          tok: tokenizers.Tokenizer, records: Sequence[sft_data.Record]) -> dict[str, float]:
  """Held-out exact match: 'all', and per kind ('add', ...) for the built-in task."""
  scored = [r for r in records if r.messages and r.messages[-1]['role'] == 'assistant']
  correct = exact_match(model, params, tok, scored, config.sampling, config.sft.max_new_tokens)
  out = {'all': float(np.mean(correct))}
  for kind in sorted({r.where for r in scored} & set(synthetic.KINDS)):
    out[kind] = float(np.mean([c for c, r in zip(correct, scored) if r.where == kind]))
  return out


def make_task(config: ml_collections.ConfigDict, model: DecoderLM, base: Any,
              train_rows: dict[str, np.ndarray], held_out_rows: dict[str, np.ndarray]
              ) -> loop.Task:
  """Full fine-tuning of `base`, or (lora.rank > 0) training adapters of it, on packed rows."""
  t, lc = config.train, config.lora
  micro_batch = t.batch_size // t.grad_accum_steps
  lm_loss_fn, lm_eval_fn = pretrain.lm_fns(model, t.loss_chunk)
  loss_fn, eval_fn, init_params, frozen = lm_loss_fn, lm_eval_fn, lambda key: base, None
  start = None if lc.rank else base
  if lc.rank:  # The trained params are the adapters; the base weights are frozen.
    merged = lambda adapters, base: lora.merge(base, adapters, lc.alpha, lc.rank)
    loss_fn = lambda adapters, batch, key, frozen: lm_loss_fn(merged(adapters, frozen), batch, key)
    eval_fn = lambda adapters, batch, frozen: lm_eval_fn(merged(adapters, frozen), batch)
    init_params, frozen = lambda key: lora.init(key, base, lc.rank, lc.targets), base
  flops = perf.train_flops_per_token(base, config.model.num_layers, config.model.d_model,
                                     t.seq_len, config.model.moe_top_k / config.model.num_experts)
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
      batch_weight=pretrain.target_tokens,
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> loop.RunResult:
  """Fine-tunes in `workdir` (resuming if it holds a checkpoint); writes exact_match.json."""
  config = copy.deepcopy(config)
  config.train.init_from = base_run(config, workdir)
  if config.lora.rank and not config.train.init_from:
    raise UserError(f'lora.rank={config.lora.rank} needs weights to adapt; set train.init_from or '
                    'sft.pretrain.steps > 0, or lora.rank=0 to train all weights.')
  train, held_out = load_records(config)
  if config.train.init_from:
    if jax.process_index() == 0:  # Records where the weights came from (load_trained reads it).
      config_lib.save_to_workdir(config, workdir)
    tok, base = pretrain.init_from(config, workdir)
  else:
    tok = pretrain.prepare_tokenizer(config, workdir, lambda: [
        r.text if r.messages is None else ''.join(m['content'] for m in r.messages)
        for r in train])
  model = DecoderLM(config_lib.model_config(config, tok.vocab_size))
  if not config.train.init_from:
    base = model.init(jax.random.key(config.seed),
                      jnp.zeros((1, config.train.seq_len), jnp.int32))['params']
  task = make_task(config, model, base, make_rows(config, tok, train, 'train'),
                   make_rows(config, tok, held_out, 'held-out'))
  results = {'before': score(config, model, base, tok, held_out)}
  print(f'held-out exact match before SFT: {results["before"]}', flush=True)
  result = loop.run(config, workdir, task)
  params = (lora.merge(base, result.params, config.lora.alpha, config.lora.rank)
            if config.lora.rank else result.params)
  results['after'] = score(config, model, params, tok, held_out)
  print(f'held-out exact match after SFT: {results["after"]}', flush=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'exact_match.json'), 'w') as f:
      json.dump(results, f, indent=2)
  return result
