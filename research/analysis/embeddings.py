"""Embedding-space tools on a trained model's token embedding matrix W_e [vocab, d_model].

Directions in W_e can carry meaning (E(queen) - E(king) ~ E(woman) - E(man); Mikolov et al. 2013).
A word the tokenizer splits into several tokens is represented by the mean of their vectors; the
report says which words were split.
"""

import os
from typing import Sequence

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from research import tokenizers
from research.errors import UserError


def unit_rows(matrix: np.ndarray) -> np.ndarray:
  """Rows scaled to unit length (zero rows stay zero). [n, d] -> [n, d]."""
  norms = np.linalg.norm(matrix, axis=-1, keepdims=True)
  return matrix / np.where(norms > 0, norms, 1.0)


def nearest(embeddings: np.ndarray, query: np.ndarray, k: int = 5,
            exclude: Sequence[int] = ()) -> list[tuple[int, float]]:
  """The k rows of `embeddings` [vocab, d] most cosine-similar to `query` [d]: (id, cosine)."""
  cosines = unit_rows(embeddings) @ unit_rows(query[None])[0]
  cosines[list(exclude)] = -np.inf
  order = np.argsort(-cosines)[:k]
  return [(int(i), float(cosines[i])) for i in order]


def analogy(embeddings: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray, k: int = 5,
            exclude: Sequence[int] = ()) -> list[tuple[int, float]]:
  """Rows nearest to a - b + c (vectors [d]), e.g. king - man + woman -> queen."""
  return nearest(embeddings, a - b + c, k, exclude)


def projections(vectors: np.ndarray, positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
  """Projection of each of `vectors` [n, d] on the unit direction mean(positive) - mean(negative)
  (each [m, d]): [n]."""
  direction = positive.mean(0) - negative.mean(0)
  norm = np.linalg.norm(direction)
  if norm == 0:
    raise UserError('the direction is zero: its two token sets have the same mean vector.')
  return vectors @ (direction / norm)


def pca_2d(vectors: np.ndarray) -> np.ndarray:
  """The first two principal-component coordinates of `vectors` [n, d]: [n, 2]."""
  centered = vectors - vectors.mean(0)
  _, _, vt = np.linalg.svd(centered, full_matrices=False)
  return centered @ vt[:2].T


def plot_pca(vectors: np.ndarray, labels: Sequence[str], path: str) -> None:
  """A labelled scatter plot of the 2-D PCA of `vectors` [n, d], saved as a PNG."""
  xy = pca_2d(vectors)
  fig, ax = plt.subplots(figsize=(6, 5))
  ax.scatter(xy[:, 0], xy[:, 1], s=14)
  for (x, y), label in zip(xy, labels):
    ax.annotate(label, (x, y), fontsize=9, xytext=(3, 3), textcoords='offset points')
  ax.set(title='token embeddings, 2-D PCA', xlabel='PC 1', ylabel='PC 2')
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


class Vocabulary:
  """Words -> vectors of a tokenizer's embedding matrix (multi-token words averaged)."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, embeddings: np.ndarray):
    self.tokenizer, self.embeddings = tokenizer, embeddings
    self.split: dict[str, int] = {}  # Words that took several tokens -> how many.

  def ids(self, word: str) -> list[int]:
    ids = self.tokenizer.encode(word)
    if not ids:
      raise UserError(f'{word!r} encodes to no tokens; give another word.')
    if len(ids) > 1:
      self.split[word] = len(ids)
    return ids

  def vector(self, word: str) -> np.ndarray:
    return self.embeddings[self.ids(word)].mean(0)

  def name(self, token_id: int) -> str:
    return self.tokenizer.decode([token_id]) or self.tokenizer.id_to_token(token_id)


def analyze(vocab: Vocabulary, words: Sequence[str], analogies: Sequence[str], direction: str,
            plot_path: str) -> str:
  """The text report of `--mode=analyze_embeddings` (and a PCA plot of `words` at plot_path)."""
  lines = []
  for word in words:
    near = nearest(vocab.embeddings, vocab.vector(word), 6, exclude=vocab.ids(word))
    lines.append(f'{word}: ' + ', '.join(f'{vocab.name(i)!r} {c:.3f}' for i, c in near))
  for spec in analogies:
    parts = [p.strip() for p in spec.split(',')]
    if len(parts) != 3:
      raise UserError(f'--analogy={spec!r} needs three comma-separated words a,b,c (a - b + c).')
    exclude = [i for p in parts for i in vocab.ids(p)]
    best = analogy(vocab.embeddings, *(vocab.vector(p) for p in parts), k=5, exclude=exclude)
    lines.append(f'{parts[0]} - {parts[1]} + {parts[2]}: '
                 + ', '.join(f'{vocab.name(i)!r} {c:.3f}' for i, c in best))
  if direction:
    if '/' not in direction or not words:
      raise UserError('--direction=A1,A2/B1,B2 needs a "/" between two word sets, and --words '
                      'to project on it.')
    sets = [[w.strip() for w in side.split(',') if w.strip()] for side in direction.split('/', 1)]
    values = projections(np.stack([vocab.vector(w) for w in words]),
                         np.stack([vocab.vector(w) for w in sets[0]]),
                         np.stack([vocab.vector(w) for w in sets[1]]))
    lines.append(f'projection on mean({",".join(sets[0])}) - mean({",".join(sets[1])}): '
                 + ', '.join(f'{w} {v:+.3f}' for w, v in zip(words, values)))
  if len(words) >= 3:
    plot_pca(np.stack([vocab.vector(w) for w in words]), words, plot_path)
    lines.append(f'PCA plot of --words: {plot_path}')
  if vocab.split:
    lines.append('averaged over several tokens: '
                 + ', '.join(f'{w} ({n})' for w, n in sorted(vocab.split.items())))
  if not lines:
    raise UserError('nothing to analyze: give --words (and optionally --analogy, --direction).')
  return '\n'.join(lines)


def analyze_workdir(workdir: str, words: Sequence[str], analogies: Sequence[str],
                    direction: str) -> str:
  """Loads the tokenizer and the latest checkpoint's embedding matrix of a trained workdir (or of
  a Hugging Face model 'hf:DIR'; the plot goes into DIR)."""
  from research import hf  # pylint: disable=g-import-not-at-top
  from research import runs  # pylint: disable=g-import-not-at-top
  _, tokenizer, _, params = runs.load_trained(workdir)
  embedding = params.get('embed', {}).get('embedding')
  if embedding is None:
    raise UserError(f'the model in {workdir} has no token embedding "embed/embedding".')
  # Rows past the tokenizer's ids (an imported model's padding) stand for no text.
  vocab = Vocabulary(tokenizer, np.asarray(embedding, np.float32)[:tokenizer.vocab_size])
  directory = hf.hf_dir(workdir) if hf.is_hf(workdir) else workdir
  return analyze(vocab, words, analogies, direction,
                 os.path.join(directory, 'embeddings_pca.png'))
