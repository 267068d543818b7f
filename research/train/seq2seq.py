"""Encoder-decoder training (Vaswani et al. 2017) on the built-in translation task, numbers in
digits -> the same numbers in English words (research/data/numbers.py).

Teacher forcing: the decoder reads `<bos> target` and predicts `target <eos>`, cross-attending to
the encoded source; the loss is pretraining's next-token loss (`pretrain.lm_fns`). The eval adds
the exact match of greedy decoding (research/decoding.py) on held-out numbers; at the end of
training greedy and beam search are both scored on them and written to `results.json`.
"""

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
from research.data import numbers
from research.errors import UserError
from research.nn.transformer import DecoderLM, init_decoder
from research.train import lm, loop, stages

Batch = dict[str, np.ndarray]
TOKENIZER_PAIRS = 5000  # Train pairs the tokenizer learns its vocabulary from.


def encode_pairs(pairs: Sequence[tuple[str, str]], tok: tokenizers.Tokenizer,
                 seq_len: int) -> Batch:
  """(source, target) texts as a batch, one pair per row, right-padded to seq_len.

  Returns 'source' and 'inputs' (`<bos> target`), 'targets' (`target <eos>`), int32 [batch,
  seq_len]; 'source_segment_ids' and 'segment_ids' (1 on tokens, 0 on padding) and 'weights'
  (float32, 1 on target tokens).
  """
  batch = {k: np.full((len(pairs), seq_len), tok.pad_id, np.int32)
           for k in ('source', 'inputs', 'targets')}
  batch.update({k: np.zeros((len(pairs), seq_len), np.int32)
                for k in ('source_segment_ids', 'segment_ids')})
  for i, (source, target) in enumerate(pairs):
    src, tgt = tok.encode(source), tok.encode(target)
    if max(len(src), len(tgt) + 1) > seq_len:
      raise UserError(f'the pair {source!r} -> {target!r} has {len(src)} source and {len(tgt) + 1} '
                      f'target tokens (with EOS), more than train.seq_len={seq_len}; raise '
                      'train.seq_len (and model.max_len).')
    batch['source'][i, :len(src)] = src
    batch['source_segment_ids'][i, :len(src)] = 1
    batch['inputs'][i, :len(tgt) + 1] = [tok.bos_id] + tgt
    batch['targets'][i, :len(tgt) + 1] = tgt + [tok.eos_id]
    batch['segment_ids'][i, :len(tgt) + 1] = 1
  batch['weights'] = batch['segment_ids'].astype(np.float32)
  return batch


def greedy_exact_match(model: DecoderLM, params: Any, batch: Batch, bos_id: int, eos_id: int,
                       pad_id: int) -> jnp.ndarray:
  """Share of rows whose greedy translation is exactly `targets` (traceable; for eval_fn)."""
  b, t = batch['targets'].shape
  out = decoding.sample(model, params, jnp.full((b, 1), bos_id, jnp.int32),
                        jnp.ones((b, 1), bool), jax.random.key(0), max_new_tokens=t,
                        temperature=0.0, top_k=0, top_p=1.0, eos_id=eos_id, pad_id=pad_id,
                        source=batch['source'], source_mask=batch['source_segment_ids'] > 0)
  return jnp.all(out == batch['targets'], axis=1).mean()


def flops_per_token(params: Any, num_layers: int, d_model: int, seq_len: int) -> float:
  """Training FLOPs per token slot (source and target each seq_len): 6N over the encoder's and the
  decoder's matmul parameters, each seeing seq_len tokens, plus attention (PaLM's 12 L d T per
  token for each of encoder self-, decoder self- and cross-attention), over 2 * seq_len slots."""
  return 3.0 * perf.matmul_param_count(params) + 18.0 * num_layers * d_model * seq_len


def make_task(config: ml_collections.ConfigDict, model: DecoderLM,
              tok: tokenizers.Tokenizer) -> loop.Task:
  t, m = config.train, config.model
  micro_batch = config_lib.micro_batch(config)
  loss_fn, lm_eval_fn = lm.lm_fns(model, t.loss_chunk)

  def train_batch(step: int, micro: int, rows: slice) -> Batch:
    rng = np.random.default_rng([config.seed, step, micro])
    batch = encode_pairs(numbers.pairs(numbers.draw_numbers('train', micro_batch, rng)), tok,
                         t.seq_len)
    return {k: v[rows] for k, v in batch.items()}

  def eval_fn(params, batch):
    return {**lm_eval_fn(params, batch), 'exact_match': greedy_exact_match(
        model, params, batch, tok.bos_id, tok.eos_id, tok.pad_id)}

  return loop.Task(
      init_params=lambda key: init_decoder(model, key, t.seq_len),
      loss_fn=loss_fn,
      eval_fn=eval_fn,
      train_batch=train_batch,
      eval_batches=[encode_pairs(p, tok, t.seq_len) for p in held_out_pairs(config)],
      tokens_per_step=2 * t.batch_size * t.seq_len,
      flops_per_token=lambda params: flops_per_token(params, m.num_layers, m.d_model, t.seq_len),
      batch_weight=lm.target_tokens)


def held_out_pairs(config: ml_collections.ConfigDict) -> list[list[tuple[str, str]]]:
  """train.eval_batches fixed micro-batches of held-out (source, target) pairs."""
  t = config.train
  size = config_lib.micro_batch(config)
  rng = np.random.default_rng([config.seed, 0, 0, 1])
  pairs = numbers.pairs(numbers.draw_numbers('held_out', t.eval_batches * size, rng))
  return [pairs[i:i + size] for i in range(0, len(pairs), size)]


def exact_match(model: DecoderLM, params: Any, tok: tokenizers.Tokenizer,
                pairs: Sequence[tuple[str, str]], sampling: ml_collections.ConfigDict,
                max_new_tokens: int) -> tuple[float, list[str]]:
  """(share of pairs translated exactly, the translations), all in one batch, with
  `decoding.generate` under `sampling` (its strategy: greedy or beam)."""
  sampling = ml_collections.ConfigDict(sampling.to_dict())
  sampling.max_new_tokens = max_new_tokens
  out = decoding.generate(model, params, tok, [[tok.bos_id]] * len(pairs), sampling,
                          jax.random.key(0), sources=[tok.encode(s) for s, _ in pairs])
  texts = [tok.decode(ids) for ids in out]
  return float(np.mean([x == target for x, (_, target) in zip(texts, pairs)])), texts


def tokenizer_texts(config: ml_collections.ConfigDict) -> list[str]:
  """The texts the tokenizer learns from: both sides of TOKENIZER_PAIRS train pairs."""
  return [text for pair in numbers.pairs(numbers.draw_numbers(
      'train', TOKENIZER_PAIRS, np.random.default_rng(config.seed))) for text in pair]


def step_spec(config: ml_collections.ConfigDict, cfg) -> tuple[loop.Task, Batch]:
  """(task, one micro-batch) of this stage for the model `cfg`, on placeholder data (only the
  shapes matter): the train step that research/compile.py compiles."""
  tok = tokenizers.train_tokenizer(config.tokenizer, tokenizer_texts(config))
  task = make_task(config, DecoderLM(cfg), tok)
  return task, task.train_batch(0, 0, slice(None))


def train(config: ml_collections.ConfigDict, workdir: str) -> loop.RunResult:
  """Trains the encoder-decoder in `workdir` (resuming if it holds a checkpoint); then scores
  greedy and beam search on the held-out pairs."""
  tok = lm.prepare_tokenizer(config, workdir, lambda: tokenizer_texts(config))
  model = DecoderLM(config_lib.model_config(config, tok.vocab_size))
  print(f'tokenizer {config.tokenizer.kind}: vocab {tok.vocab_size}', flush=True)
  result = loop.run(config, workdir, make_task(config, model, tok))
  batches = held_out_pairs(config)
  pairs = [p for batch in batches for p in batch]
  scores = {}
  for strategy in ('greedy', 'beam'):
    sampling = ml_collections.ConfigDict(dict(config.sampling.to_dict(), strategy=strategy))
    hits, texts = [], []
    for batch in batches:  # One micro-batch at a time: beams multiply the memory.
      batch_hits, batch_texts = exact_match(model, result.params, tok, batch, sampling,
                                            config.train.seq_len)
      hits.append(batch_hits)
      texts += batch_texts
    scores[f'{strategy}_exact_match'] = float(np.mean(hits))
  scores['held_out_pairs'] = len(pairs)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump(scores, f, indent=2)
    with open(os.path.join(workdir, 'samples.txt'), 'w') as f:
      f.writelines(f'{s} -> {x}\n' for (s, _), x in zip(pairs[:20], texts))
  print(f'held-out exact match over {len(pairs)} pairs: greedy '
        f'{scores["greedy_exact_match"]:.4f}, beam ({config.sampling.num_beams}) '
        f'{scores["beam_exact_match"]:.4f}', flush=True)
  return result


STAGE = stages.Stage(name='seq2seq', train=train, family='encoder_decoder', step_spec=step_spec)
