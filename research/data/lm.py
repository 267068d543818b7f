"""Language-model data: token ids cached in the workdir, batches drawn from (seed, step).

A batch depends only on (seed, step, micro-step), never on what came before, so a resumed run
sees exactly the batches an uninterrupted run would.
"""

import os
from typing import Callable, Iterable

import numpy as np

from research.errors import UserError
from research.tokenizers import Tokenizer


def read_source(path: str) -> str:
  """The text of a cache's .source file ('' when there is none)."""
  if not os.path.exists(path):
    return ''
  with open(path) as f:
    return f.read()


def cached_tokens(path: str, tokenizer: Tokenizer, texts: Callable[[], Iterable[str]],
                  source: str = '') -> np.ndarray:
  """Token ids of `texts()` (each text followed by EOS), memory-mapped from `path` (.npy).

  Tokenises on the first call and writes the file atomically, with `source` (what the texts were
  read from, e.g. sources.fingerprint) beside it in path + '.source'; later calls just map it
  (and never call `texts`) while the source is the same, and tokenise again when it changed.
  """
  recorded = path + '.source'
  if os.path.exists(path) and read_source(recorded) != source:
    print(f'note: the data changed since {path} was made; tokenising it again', flush=True)
    os.remove(path)
  if not os.path.exists(path):
    ids = tokenizer.encode_corpus(texts())
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    tmp = path + '.tmp.npy'
    np.save(tmp, ids.astype(dtype))
    with open(recorded + '.tmp', 'w') as f:
      f.write(source)
    os.replace(recorded + '.tmp', recorded)
    os.replace(tmp, path)
  return np.load(path, mmap_mode='r')


def check_length(tokens: np.ndarray, seq_len: int, split: str) -> None:
  if len(tokens) < seq_len + 2:
    raise UserError(f'the {split} split has {len(tokens)} tokens, fewer than train.seq_len+2='
                    f'{seq_len + 2}; use more text, a smaller train.seq_len or (for val) a larger '
                    'data.val_fraction.')


def lm_batch(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int,
             micro: int = 0, rows: slice = slice(None)) -> dict[str, np.ndarray]:
  """Rows `rows` of a random batch of windows: {'inputs', 'targets'}: int32 [rows, seq_len].

  targets are the inputs shifted by one token. Each host reads only its own rows.
  """
  rng = np.random.default_rng([seed, step, micro])
  starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
  return windows(tokens, starts[rows], seq_len)


def eval_batches(tokens: np.ndarray, num_batches: int, batch_size: int,
                 seq_len: int) -> list[dict[str, np.ndarray]]:
  """`num_batches` fixed batches of windows spread evenly over the split (the same every eval)."""
  n = num_batches * batch_size
  starts = np.linspace(0, len(tokens) - seq_len - 1, n).astype(np.int64)
  return [windows(tokens, starts[i * batch_size:(i + 1) * batch_size], seq_len)
          for i in range(num_batches)]


def windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
  idx = starts[:, None] + np.arange(seq_len + 1)
  chunk = np.asarray(tokens[idx], dtype=np.int32)
  return {'inputs': chunk[:, :-1], 'targets': chunk[:, 1:]}
