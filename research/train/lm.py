"""What the language-model stages share (pretrain, mlm, seq2seq, sft): the next-token loss (also
chunked over positions), its Task functions, and the workdir's tokenizer and token caches."""

import os
import shutil
from typing import Callable

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import optax

from research import tokenizers
from research.data import lm, sources
from research.nn import moe
from research.nn.partitioning import constrain
from research.nn.transformer import DecoderLM, unembedding


def lm_loss(logits: jnp.ndarray, targets: jnp.ndarray,
            weights: jnp.ndarray | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Mean next-token cross-entropy (float32) and accuracy over positions with weight > 0.

  logits: [batch, seq, vocab]; targets, weights: [batch, seq].
  """
  weights = jnp.ones(targets.shape, jnp.float32) if weights is None else weights
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  total = jnp.maximum(weights.sum(), 1.0)
  accuracy = ((logits.argmax(-1) == targets) * weights).sum() / total
  return (losses * weights).sum() / total, accuracy


def chunked_lm_loss(hidden: jnp.ndarray, unembedding: jnp.ndarray, targets: jnp.ndarray,
                    weights: jnp.ndarray | None, chunk: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """`lm_loss` of the logits hidden @ unembedding, computed `chunk` positions at a time: the
  float32 logits of one chunk [batch, chunk, vocab] exist at once (forward and backward, which
  recomputes them), not the whole batch's. The products take the hidden states' dtype with
  float32 accumulation. Under a mesh the unembedding stays sharded over the vocabulary (logical
  axis 'vocab', nn/partitioning.py) and so do the logits: each device computes its slice of the
  vocabulary for all rows of the chunk, and the softmax sums across devices.

  hidden: final hidden states [batch, seq, d_model]; unembedding: [d_model, vocab]; seq must be a
  multiple of chunk. Accuracy counts a target whose logit is the largest (ties count as right).
  """
  b, t, _ = hidden.shape
  weights = jnp.ones(targets.shape, jnp.float32) if weights is None else weights
  split = lambda x: jnp.moveaxis(x.reshape(b, t // chunk, chunk, *x.shape[2:]), 1, 0)
  w_DxV = constrain(unembedding.astype(hidden.dtype), (None, 'vocab'))

  @jax.checkpoint
  def one_chunk(sums, xs):
    x_BxCxD, y_BxC, w_BxC = xs
    logits = constrain(jnp.einsum('bcd,dv->bcv', x_BxCxD, w_DxV,
                                  preferred_element_type=jnp.float32), (None, None, 'vocab'))
    label = jnp.take_along_axis(logits, y_BxC[..., None], axis=-1)[..., 0]
    losses = jax.nn.logsumexp(logits, axis=-1) - label
    right = label >= logits.max(-1)
    return (sums[0] + (losses * w_BxC).sum(), sums[1] + (right * w_BxC).sum()), None

  zero = jnp.zeros((), jnp.float32)
  (loss, correct), _ = jax.lax.scan(one_chunk, (zero, zero),
                                    (split(hidden), split(targets), split(weights)))
  total = jnp.maximum(weights.sum(), 1.0)
  return loss / total, correct / total


def target_tokens(batch: dict[str, jnp.ndarray]) -> jnp.ndarray:
  """The weighted targets that `lm_loss` averages over (a `loop.Task.batch_weight`)."""
  return jnp.sum(batch['weights'])


def prepare_tokenizer(config: ml_collections.ConfigDict, workdir: str, train_texts,
                      source: str = '') -> tokenizers.Tokenizer:
  """Loads the workdir's tokenizer, or trains one on the train split and saves it there, with
  `source` (what its texts were read from) in tokenizer.source. A tokenizer whose source changed
  is trained again while the workdir holds no checkpoint (after that, the weights need it)."""
  directory = os.path.join(workdir, 'tokenizer')
  recorded = directory + '.source'
  if os.path.isdir(directory):
    stale = os.path.exists(recorded) and lm.read_source(recorded) != source
    if not stale or os.path.isdir(os.path.join(workdir, 'checkpoints')):
      return tokenizers.load_tokenizer(directory)
    print(f'note: the data changed since {directory} was trained; training it again', flush=True)
    shutil.rmtree(directory)
  tok = tokenizers.train_tokenizer(config.tokenizer, train_texts())
  shutil.rmtree(directory + '.tmp', ignore_errors=True)
  tok.save(directory + '.tmp')
  with open(recorded, 'w') as f:
    f.write(source)
  os.replace(directory + '.tmp', directory)
  return tok


def prepare_data(config: ml_collections.ConfigDict, workdir: str):
  """(tokenizer, train token ids, val token ids), cached in the workdir after the first run.

  With several processes, process 0 writes the caches while the others wait, then read them.
  """
  if jax.process_count() > 1:
    if jax.process_index() == 0:
      _prepare_data(config, workdir)
    multihost_utils.sync_global_devices('prepare_data')
  return _prepare_data(config, workdir)


def _prepare_data(config: ml_collections.ConfigDict, workdir: str):
  split = {}

  def texts(name):
    if not split:
      docs = sources.load_documents(config.data.path, config.data.text_field)
      split['train'], split['val'] = sources.split_documents(docs, config.data.val_fraction)
    return [d.text for d in split[name]]

  source = sources.fingerprint(config.data.path)
  tok = prepare_tokenizer(config, workdir, lambda: texts('train'), source)
  os.makedirs(os.path.join(workdir, 'data'), exist_ok=True)
  train = lm.cached_tokens(os.path.join(workdir, 'data', 'train.npy'), tok, lambda: texts('train'),
                           source)
  val = lm.cached_tokens(os.path.join(workdir, 'data', 'val.npy'), tok, lambda: texts('val'),
                         source)
  lm.check_length(train, config.train.seq_len, 'train')
  lm.check_length(val, config.train.seq_len, 'val')
  return tok, train, val


def lm_fns(model: DecoderLM, loss_chunk: int = 0) -> tuple[Callable, Callable]:
  """(loss_fn, eval_fn) of `loop.Task` for next-token prediction; with `loss_chunk` > 0
  (train.loss_chunk) the logits are computed that many positions at a time (`chunked_lm_loss`).

  A batch holds 'inputs' and 'targets' (int [batch, seq]) and optionally 'positions' and
  'segment_ids' (packed examples, see DecoderLM), 'weights' (float [batch, seq], which targets
  count; default all) and, for encoder-decoder models, 'source' and 'source_segment_ids'.
  """
  def objective(params, batch, weights, **kwargs):
    out, state = model.apply({'params': params}, batch['inputs'], batch.get('positions'),
                             batch.get('segment_ids'), source=batch.get('source'),
                             source_segment_ids=batch.get('source_segment_ids'),
                             features=loss_chunk > 0, mutable=['intermediates'], **kwargs)
    if loss_chunk:
      loss, accuracy = chunked_lm_loss(out[0], unembedding(model.cfg, params), batch['targets'],
                                       weights, loss_chunk)
    else:
      loss, accuracy = lm_loss(out[0], batch['targets'], weights)
    return loss, accuracy, state

  def loss_fn(params, batch, key):
    loss, accuracy, state = objective(params, batch, batch.get('weights'), deterministic=False,
                                      rngs={'dropout': key})
    aux_loss, moe_metrics = moe.collect_losses(state.get('intermediates', {}))
    return loss + aux_loss, {'accuracy': accuracy, **moe_metrics}

  def eval_fn(params, batch):  # Means over the batch's weighted targets, weighted by their count.
    weights = batch.get('weights', jnp.ones(batch['targets'].shape, jnp.float32))
    loss, accuracy, _ = objective(params, batch, weights)
    return {'loss': (loss, weights.sum()), 'accuracy': (accuracy, weights.sum())}

  return loss_fn, eval_fn
