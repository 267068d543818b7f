"""Masked-language-model batches (BERT, Devlin et al. 2019): windows of the token stream, 15% of
their tokens selected for prediction, of those 80% replaced by `<mask>`, 10% by a random token and
10% left unchanged; optionally sentence pairs `<cls> A <sep> B <sep>` for next-sentence prediction.

Like `lm.lm_batch`, a batch depends only on (seed, step, micro-step), so resumed runs see the same
batches; the masking of the eval batches is fixed by the seed.
"""

import ml_collections
import numpy as np

from research.tokenizers import SPECIAL_TOKENS, Tokenizer

NUM_SPECIAL = len(SPECIAL_TOKENS)  # Special tokens are never selected nor drawn as replacements.


def mask_tokens(tokens: np.ndarray, rng: np.random.Generator, cfg: ml_collections.ConfigDict,
                tok: Tokenizer) -> dict[str, np.ndarray]:
  """BERT's corruption of tokens int [batch, seq]; cfg: the `mlm` config section.

  Returns {'inputs': corrupted tokens, 'targets': the original tokens at selected positions and
  `pad_id` elsewhere, 'weights': float32 1.0 at selected positions}, each [batch, seq].
  """
  selected = (rng.random(tokens.shape) < cfg.select_prob) & (tokens >= NUM_SPECIAL)
  action = rng.random(tokens.shape)
  to_mask = selected & (action < cfg.mask_prob)
  to_random = selected & (action >= cfg.mask_prob) & (action < cfg.mask_prob + cfg.random_prob)
  random_ids = rng.integers(NUM_SPECIAL, tok.vocab_size, tokens.shape)
  inputs = np.where(to_mask, tok.mask_id, np.where(to_random, random_ids, tokens))
  return {'inputs': inputs.astype(np.int32),
          'targets': np.where(selected, tokens, tok.pad_id).astype(np.int32),
          'weights': selected.astype(np.float32)}


def sentence_pairs(tokens: np.ndarray, starts: np.ndarray, seq_len: int,
                   rng: np.random.Generator, tok: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """Rows `<cls> A <sep> B <sep>` of seq_len tokens: A from each start, B the text right after A
  (label 1) or, for half the rows, from a random place (label 0). Returns (tokens int32 [batch,
  seq_len], labels int32 [batch])."""
  half = (seq_len - 3) // 2
  size = seq_len - 3 - half
  is_next = rng.random(len(starts)) < 0.5
  b_starts = np.where(is_next, starts + half, rng.integers(0, len(tokens) - size, len(starts)))
  a = np.asarray(tokens[starts[:, None] + np.arange(half)], np.int32)
  b = np.asarray(tokens[b_starts[:, None] + np.arange(size)], np.int32)
  col = lambda v: np.full((len(starts), 1), v, np.int32)
  rows = np.concatenate([col(tok.cls_id), a, col(tok.sep_id), b, col(tok.sep_id)], axis=1)
  return rows, is_next.astype(np.int32)


def mlm_example(tokens: np.ndarray, starts: np.ndarray, seq_len: int, rng: np.random.Generator,
                cfg: ml_collections.ConfigDict, tok: Tokenizer) -> dict[str, np.ndarray]:
  """The masked windows starting at `starts` (sentence pairs with 'next_sentence' labels when
  cfg.next_sentence): 'inputs', 'targets', 'weights' [batch, seq_len] as in `mask_tokens`."""
  if cfg.next_sentence:
    rows, labels = sentence_pairs(tokens, starts, seq_len, rng, tok)
    return {**mask_tokens(rows, rng, cfg, tok), 'next_sentence': labels}
  rows = np.asarray(tokens[starts[:, None] + np.arange(seq_len)], np.int32)
  return mask_tokens(rows, rng, cfg, tok)


def mlm_batch(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int,
              micro: int, rows: slice, cfg: ml_collections.ConfigDict,
              tok: Tokenizer) -> dict[str, np.ndarray]:
  """Rows `rows` of a random masked batch of micro-step `micro` of step `step` (the whole batch
  is drawn, so each host's rows are the same whatever the number of hosts)."""
  rng = np.random.default_rng([seed, step, micro])
  starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
  return {k: v[rows] for k, v in mlm_example(tokens, starts, seq_len, rng, cfg, tok).items()}


def eval_batches(tokens: np.ndarray, num_batches: int, batch_size: int, seq_len: int, seed: int,
                 cfg: ml_collections.ConfigDict, tok: Tokenizer) -> list[dict[str, np.ndarray]]:
  """`num_batches` fixed masked batches of windows spread evenly over the split."""
  starts = np.linspace(0, len(tokens) - seq_len - 1, num_batches * batch_size).astype(np.int64)
  return [mlm_example(tokens, starts[i * batch_size:(i + 1) * batch_size], seq_len,
                      np.random.default_rng([seed, i, 0, 1]), cfg, tok)
          for i in range(num_batches)]


def unigram_accuracy(tokens: np.ndarray) -> float:
  """Masked-token accuracy of always guessing the most frequent (non-special) token."""
  counts = np.bincount(np.asarray(tokens))[NUM_SPECIAL:]
  return float(counts.max() / max(counts.sum(), 1))
