"""Causal language-model pretraining: next-token cross-entropy over packed windows of text."""

import json
import os
import shutil
from typing import Any, Callable

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from research import config as config_lib
from research import decoding
from research import hf
from research import perf
from research import tokenizers
from research.checkpoint import Checkpointer
from research.data import lm, sources
from research.errors import UserError
from research.nn import lora, moe
from research.nn.partitioning import constrain
from research.nn.transformer import DecoderLM, init_decoder, to_layout, unembedding
from research.train import loop


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


def target_tokens(batch: loop.Batch) -> float:
  """The weighted targets that `lm_loss` averages over (a `loop.Task.batch_weight`)."""
  return float(np.sum(batch['weights']))


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


def make_task(config: ml_collections.ConfigDict, model: DecoderLM, train_tokens: np.ndarray,
              val_tokens: np.ndarray, start_params: Any = None) -> loop.Task:
  """The pretraining task, from `start_params` (default: a fresh init)."""
  t = config.train
  micro_batch = t.batch_size // t.grad_accum_steps
  loss_fn, eval_fn = lm_fns(model, t.loss_chunk)
  return loop.Task(
      init_params=lambda key: model.init(key, jnp.zeros((1, t.seq_len), jnp.int32))['params'],
      start_params=start_params,
      loss_fn=loss_fn,
      eval_fn=eval_fn,
      train_batch=lambda step, micro, rows: lm.lm_batch(train_tokens, micro_batch, t.seq_len,
                                                        config.seed, step, micro, rows),
      eval_batches=lm.eval_batches(val_tokens, t.eval_batches, micro_batch, t.seq_len),
      tokens_per_step=t.batch_size * t.seq_len,
      flops_per_token=lambda params: perf.train_flops_per_token(
          params, config.model.num_layers, config.model.d_model, t.seq_len,
          config.model.moe_top_k / config.model.num_experts))


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> loop.RunResult:
  """Pretrains a GPT in `workdir` (resuming if it holds a checkpoint) and writes a sample."""
  params = init_from(config, workdir)[1] if config.train.init_from else None
  tok, train_tokens, val_tokens = prepare_data(config, workdir)
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


def load_trained(workdir: str) -> tuple[ml_collections.ConfigDict, tokenizers.Tokenizer,
                                        DecoderLM, Any]:
  """(config, tokenizer, model, params) of the latest checkpoint of a run in `workdir`, or of the
  Hugging Face model 'hf:DIR'."""
  if hf.is_hf(workdir):
    config = config_lib.default_config()
    config.train.init_from = workdir
    config = config_lib.with_imported_model(config)
    tok = tokenizers.load_tokenizer(hf.hf_dir(workdir))
    model = DecoderLM(config_lib.model_config(config, tok.vocab_size))
    return config, tok, model, hf.load_params(hf.hf_dir(workdir), model.cfg)
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise UserError(f'{workdir} holds no run (no config.json); train it first or fix --workdir.')
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if config.get('stage') == 'reward':
    raise UserError(f'{workdir} holds a reward model, which scores text but does not generate it; '
                    'use an SFT, PPO or DPO run.')
  if config.model.family == 'encoder':
    raise UserError(f'{workdir} holds a masked LM (model.family=encoder), which does not generate '
                    'text; use a decoder or encoder_decoder run.')
  tok = tokenizers.load_tokenizer(os.path.join(workdir, 'tokenizer'))
  model = DecoderLM(config_lib.model_config(config, tok.vocab_size))
  rank = config.get('lora', {}).get('rank', 0)
  if rank:  # The checkpoint holds LoRA adapters of train.init_from's weights.
    _, _, _, base = load_trained(config.train.init_from)
    adapters, _ = loop.restore_params(
        config, workdir, lambda key: lora.init(key, base, rank, config.lora.targets))
    return config, tok, model, lora.merge(base, adapters, config.lora.alpha, rank)
  if config.get('stage') == 'ppo':  # PPO saves its final policy alone, in <workdir>/policy.
    ckpt = Checkpointer(os.path.join(workdir, 'policy'))
    target = init_decoder(model, jax.random.key(0))
    step, params = ckpt.restore_newest(lambda s: ckpt.restore(s, target))
    ckpt.close()
    if step is None:
      raise UserError(f'{workdir} holds no final PPO policy yet; run it to train.steps first.')
    return config, tok, model, params
  params, _ = loop.restore_params(config, workdir, lambda key: init_decoder(model, key))
  return config, tok, model, params


def init_from(config: ml_collections.ConfigDict, workdir: str) -> tuple[tokenizers.Tokenizer, Any]:
  """(tokenizer, weights) of the latest checkpoint of the run in `config.train.init_from`, or of
  the Hugging Face model 'hf:DIR' (`config` from config.with_imported_model), whose weights are
  read straight into the shardings the training loop gives them.

  A run must have this config's model (but for COMPUTE_MODEL_KEYS) and tokenizer sections (a key
  its config.json lacks counts as equal: it predates the key). The tokenizer is copied into
  `workdir/tokenizer`, so this run and every later one use it.
  """
  source = config.train.init_from
  if hf.is_hf(source):
    tok = tokenizers.load_tokenizer(hf.hf_dir(source))
    cfg = config_lib.model_config(config, tok.vocab_size)
    abstract = jax.eval_shape(lambda key: init_decoder(DecoderLM(cfg), key), jax.random.key(0))
    params = hf.load_params(hf.hf_dir(source), cfg, loop.param_shardings(config, abstract))
    _copy_tokenizer(tok, workdir)
    return tok, params
  if not os.path.exists(os.path.join(source, 'config.json')):
    raise UserError(f'train.init_from={source!r} holds no run (no config.json); give the '
                    '--workdir of a trained run.')
  saved, tok, _, params = load_trained(source)
  saved, current = json.loads(saved.to_json()), json.loads(config.to_json())
  diffs = [f'{s}.{k}: {saved[s].get(k)!r} there, {v!r} here' for s in ('model', 'tokenizer')
           for k, v in current[s].items()
           if k not in config_lib.COMPUTE_MODEL_KEYS and saved[s].get(k, v) != v]
  if diffs:
    raise UserError(f'train.init_from={source!r} has another architecture ({"; ".join(diffs[:3])}'
                    '); set the same --config.model.* and --config.tokenizer.* as that run.')
  _copy_tokenizer(tok, workdir)
  return tok, to_layout(params, config.model.scan_layers)


def _copy_tokenizer(tok: tokenizers.Tokenizer, workdir: str) -> None:
  """Saves `tok` as `workdir/tokenizer` unless it is there."""
  directory = os.path.join(workdir, 'tokenizer')
  if not os.path.isdir(directory):
    tok.save(directory + '.tmp')
    os.replace(directory + '.tmp', directory)


def tokenizer_report(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The tokenizer report on the val split: the workdir's tokenizer if it has one, else one
  trained now from the config (and not saved)."""
  docs = sources.load_documents(config.data.path, config.data.text_field)
  train, val = sources.split_documents(docs, config.data.val_fraction)
  directory = os.path.join(workdir, 'tokenizer')
  tok = (tokenizers.load_tokenizer(directory) if os.path.isdir(directory)
         else tokenizers.train_tokenizer(config.tokenizer, [d.text for d in train]))
  return tokenizers.tokenizer_report(tok, ''.join(d.text for d in val))
