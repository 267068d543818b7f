"""A synthetic, verifiable instruction task: short questions whose answers can be checked exactly.

Kinds: addition and subtraction of numbers below 100, unit conversions (meters to centimeters, ...),
sorting a short list of digits, and counting a letter in a short string. Problems are drawn from
(seed, index), and a problem is held out when a hash of its prompt says so, so no held-out prompt
ever appears in the train split, whatever the seed or the number drawn.

  train = problems('train', 20000, seed=0); held_out = problems('held_out', 200, seed=0)
  is_correct(model_reply, held_out[0])
"""

import dataclasses
import zlib
from typing import Sequence

import numpy as np

from research.errors import UserError

KINDS = ('add', 'subtract', 'convert', 'sort', 'count')
HELD_OUT_FRACTION = 0.1
# (small unit, big unit, small units per big unit): answers append zeros, so they generalise.
UNITS = (('millimeters', 'centimeters', 10), ('centimeters', 'meters', 100),
         ('meters', 'kilometers', 1000), ('grams', 'kilograms', 1000),
         ('milliliters', 'liters', 1000), ('cents', 'dollars', 100))


@dataclasses.dataclass(frozen=True)
class Problem:
  kind: str
  prompt: str
  answer: str


def make_problem(kind: str, rng: np.random.Generator) -> Problem:
  """One random problem of `kind` (one of KINDS)."""
  if kind == 'add':
    a, b = rng.integers(0, 100, 2)
    return Problem(kind, f'What is {a} plus {b}?', str(a + b))
  if kind == 'subtract':
    a, b = sorted(rng.integers(0, 100, 2))[::-1]
    return Problem(kind, f'What is {a} minus {b}?', str(a - b))
  if kind == 'convert':
    small, big, factor = UNITS[rng.integers(len(UNITS))]
    n = int(rng.integers(1, 100))
    return Problem(kind, f'How many {small} are in {n} {big}?', str(n * factor))
  if kind == 'sort':
    digits = rng.integers(0, 10, rng.integers(3, 6))
    return Problem(kind, f'Sort {" ".join(map(str, digits))}.',
                   ' '.join(map(str, sorted(digits))))
  if kind == 'count':
    letters = 'abcde'
    word = ''.join(rng.choice(list(letters), rng.integers(3, 9)))
    letter = letters[rng.integers(len(letters))]
    return Problem(kind, f'How many times does {letter} appear in {word}?', str(word.count(letter)))
  raise ValueError(f'unknown kind {kind!r}; expected one of {KINDS}')


def is_held_out(prompt: str) -> bool:
  return zlib.crc32(prompt.encode()) / 2**32 < HELD_OUT_FRACTION


def problems(split: str, n: int, seed: int, kinds: Sequence[str] = KINDS) -> list[Problem]:
  """`n` problems of `split` ('train' or 'held_out'), `kinds` in turn; the same for a seed."""
  unknown = sorted(set(kinds) - set(KINDS))
  if unknown or not kinds:
    raise UserError(f'sft.kinds={tuple(kinds)}: {unknown or "none"} not among the built-in kinds '
                    f'{KINDS}; pick some of those.')
  rng = np.random.default_rng([seed, split == 'held_out'])
  out = []
  while len(out) < n:
    p = make_problem(kinds[len(out) % len(kinds)], rng)
    if is_held_out(p.prompt) == (split == 'held_out'):
      out.append(p)
  return out


def matches(reply: str, answer: str) -> bool:
  """The checker of every stage: exact match after stripping surrounding whitespace."""
  return reply.strip() == answer.strip()


def is_correct(reply: str, problem: Problem) -> bool:
  return matches(reply, problem.answer)
