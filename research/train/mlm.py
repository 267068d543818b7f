"""Masked-language-model pretraining (BERT, Devlin et al. 2019): an `EncoderLM` predicts the
selected tokens of corrupted windows of the corpus (research/data/mlm.py), plus next-sentence
prediction when mlm.next_sentence. Data preparation (tokenizer, token caches) is pretraining's;
the step loop, checkpoints and metrics are the shared ones. The eval accuracy is the masked-token
accuracy on the val split.
"""

import json
import os
from typing import Callable

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from research import config as config_lib
from research import perf
from research import tokenizers
from research.data import mlm
from research.nn import moe
from research.nn.transformer import EncoderLM
from research.errors import UserError
from research.train import lm, loop, stages


def mlm_fns(model: EncoderLM) -> tuple[Callable, Callable]:
  """(loss_fn, eval_fn) of `loop.Task`. A batch holds 'inputs', 'targets' (int [batch, seq]),
  'weights' (float [batch, seq], 1 at the selected positions) and with a next-sentence head
  'next_sentence' (int [batch], 1 when B follows A)."""
  def objective(logits, nsp_logits, batch):
    loss, accuracy = lm.lm_loss(logits, batch['targets'], batch['weights'])
    metrics = {'accuracy': accuracy}
    if nsp_logits is not None:
      labels = batch['next_sentence']
      nsp_loss = optax.softmax_cross_entropy_with_integer_labels(nsp_logits, labels).mean()
      metrics.update(mlm_loss=loss, nsp_loss=nsp_loss,
                     nsp_accuracy=(nsp_logits.argmax(-1) == labels).mean())
      loss += nsp_loss
    return loss, metrics

  def loss_fn(params, batch, key):
    (logits, nsp_logits), state = model.apply(
        {'params': params}, batch['inputs'], deterministic=False, rngs={'dropout': key},
        mutable=['intermediates'])
    loss, metrics = objective(logits, nsp_logits, batch)
    aux_loss, moe_metrics = moe.collect_losses(state.get('intermediates', {}))
    return loss + aux_loss, {**metrics, **moe_metrics}

  def eval_fn(params, batch):
    loss, metrics = objective(*model.apply({'params': params}, batch['inputs']), batch)
    # The masked-token metrics are means over the selected tokens; NSP's over rows.
    tokens = batch['weights'].sum()
    by_token = {k: (metrics[k], tokens) for k in ('accuracy', 'mlm_loss') if k in metrics}
    return {'loss': loss if 'nsp_loss' in metrics else (loss, tokens), **metrics, **by_token}

  return loss_fn, eval_fn


def make_task(config: ml_collections.ConfigDict, model: EncoderLM, tok: tokenizers.Tokenizer,
              train_tokens: np.ndarray, val_tokens: np.ndarray) -> loop.Task:
  t, m = config.train, config.model
  micro_batch = config_lib.micro_batch(config)
  loss_fn, eval_fn = mlm_fns(model)
  return loop.Task(
      init_params=lambda key: model.init(key, jnp.zeros((1, t.seq_len), jnp.int32))['params'],
      loss_fn=loss_fn,
      eval_fn=eval_fn,
      train_batch=lambda step, micro, rows: mlm.mlm_batch(
          train_tokens, micro_batch, t.seq_len, config.seed, step, micro, rows, config.mlm, tok),
      eval_batches=mlm.eval_batches(val_tokens, t.eval_batches, micro_batch, t.seq_len,
                                    config.seed, config.mlm, tok),
      tokens_per_step=t.batch_size * t.seq_len,
      flops_per_token=lambda params: perf.model_flops_per_token(m, params, t.seq_len),
      # The masked-token loss is a mean over the selected tokens, whose count varies; with the
      # next-sentence loss (a mean over rows) added, micro-batches count the same.
      batch_weight=None if config.mlm.next_sentence else lm.target_tokens)


def step_spec(config: ml_collections.ConfigDict, cfg) -> tuple[loop.Task, loop.Batch]:
  """(task, one micro-batch) of this stage for the model `cfg`, on placeholder data (only the
  shapes matter): the train step that research/compile.py compiles."""
  tokens = np.zeros(4 * config.train.seq_len + 8, np.uint16)
  task = make_task(config, EncoderLM(cfg, config.mlm.next_sentence), tokenizers.ByteTokenizer(),
                   tokens, tokens)
  return task, task.train_batch(0, 0, slice(None))


def train(config: ml_collections.ConfigDict, workdir: str) -> loop.RunResult:
  """Pretrains a BERT in `workdir` (resuming if it holds a checkpoint)."""
  tok, train_tokens, val_tokens = lm.prepare_data(config, workdir)
  model = EncoderLM(config_lib.model_config(config, tok.vocab_size), config.mlm.next_sentence)
  baseline = mlm.unigram_accuracy(val_tokens)
  print(f'tokenizer {config.tokenizer.kind}: vocab {tok.vocab_size} | train {len(train_tokens):,} '
        f'tokens | val {len(val_tokens):,} tokens | unigram baseline masked-token accuracy '
        f'{baseline:.3f}', flush=True)
  with open(os.path.join(workdir, 'data', 'stats.json'), 'w') as f:
    json.dump({'train_tokens': len(train_tokens), 'val_tokens': len(val_tokens),
               'val_unigram_accuracy': baseline, 'vocab_size': tok.vocab_size}, f)
  result = loop.run(config, workdir, make_task(config, model, tok, train_tokens, val_tokens))
  if 'eval/accuracy' in result.metrics:
    print(f'masked-token accuracy {result.metrics["eval/accuracy"]:.3f} (unigram baseline '
          f'{baseline:.3f})', flush=True)
  return result


def sections() -> dict[str, ml_collections.ConfigDict]:
  # Masked-LM pretraining (Devlin et al. 2019).
  return {'mlm': ml_collections.ConfigDict(dict(
      select_prob=0.15,  # Share of tokens predicted (the loss is on these only),
      mask_prob=0.8,  # of which replaced by <mask>,
      random_prob=0.1,  # or by a random token; the rest stay unchanged.
      next_sentence=False,  # Rows <cls> A <sep> B <sep> (B follows A half the time) + NSP head.
  ))}


def check(config: ml_collections.ConfigDict) -> None:
  m = config.mlm
  if not (0 < m.select_prob <= 1 and m.mask_prob >= 0 and m.random_prob >= 0
          and m.mask_prob + m.random_prob <= 1):
    raise UserError(f'mlm.select_prob={m.select_prob} must be in (0, 1], and mlm.mask_prob='
                    f'{m.mask_prob} and mlm.random_prob={m.random_prob} >= 0 with a sum <= 1.')


STAGE = stages.Stage(
    name='mlm', train=train, family='encoder', sections=sections, check=check,
    step_spec=step_spec,
    not_generative='a masked LM (model.family=encoder), which does not generate text; use a '
    'decoder or encoder_decoder run.')
