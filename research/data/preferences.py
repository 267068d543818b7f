"""Preference pairs for the reward model and DPO: a prompt, a chosen and a rejected answer.

A JSONL record is one of the usual conventions:
  {"prompt": "...", "chosen": "...", "rejected": "..."}
  {"chosen": [{"role", "content"}, ...], "rejected": [...]}   conversations that differ in their
                                                               last (assistant) message
The built-in pairs come from the verifiable task (research/data/synthetic.py): the chosen answer
is the correct one, the rejected one wrong; half of them nearly right (an off-by-one number, a
sorted list with one digit changed or two digits swapped, a unit factor off by ten), half
another problem's answer.
"""

import dataclasses
from typing import Any, Sequence

import ml_collections
import numpy as np

from research.data import sft as sft_data
from research.data import synthetic
from research.errors import UserError
from research.tokenizers import Tokenizer


@dataclasses.dataclass(frozen=True)
class Pair:
  """The shared turns (`prompt`, ending with a user turn), the two answers; `where` names the
  source ('path:line', or the task kind)."""
  where: str
  prompt: list[dict[str, str]]
  chosen: str
  rejected: str


def parse(record: Any, where: str) -> Pair:
  """Checks one decoded JSONL line; a UserError naming `where` says what is wrong."""
  record = record if isinstance(record, dict) else {}
  chosen, rejected = record.get('chosen'), record.get('rejected')
  if isinstance(record.get('prompt'), str) and isinstance(chosen, str) and isinstance(
      rejected, str):
    return Pair(where, [{'role': 'user', 'content': record['prompt']}], chosen, rejected)
  if isinstance(chosen, list) and isinstance(rejected, list):
    c = sft_data.parse({'messages': chosen}, where).messages
    r = sft_data.parse({'messages': rejected}, where).messages
    if c[:-1] != r[:-1] or c[-1]['role'] != 'assistant' or r[-1]['role'] != 'assistant':
      raise UserError(f'{where}: "chosen" and "rejected" must share every message but the last, '
                      'an assistant answer; fix or delete that line.')
    return Pair(where, c[:-1], c[-1]['content'], r[-1]['content'])
  raise UserError(f'{where}: expected "prompt", "chosen" and "rejected" strings, or "chosen" and '
                  '"rejected" message lists; fix or delete that line.')


def read_jsonl(path: str) -> list[Pair]:
  """The pairs of a JSONL file, every line checked before any is used."""
  return sft_data.read_jsonl(path, parse, 'reward.path',
                             '{"prompt", "chosen", "rejected"} records')


def nearly_sorted(answer: str, rng: np.random.Generator) -> str:
  """A wrong reply to a sorting question: mostly still sorted with one digit changed, off by one
  or copied from its neighbour (the SFT policy's usual mistakes: "3 6 9 9" for "3 6 8 9" can
  only be caught by counting), else two digits swapped, else (all digits equal) one too few."""
  digits = [int(d) for d in answer.split()]
  i = int(rng.integers(len(digits)))
  off = list(digits)
  off[i] = min(max(off[i] + int(rng.choice([-1, 1])), 0), 9)
  copied = list(digits)
  copied[i] = digits[i - 1] if i == len(digits) - 1 or (i and rng.random() < 0.5) else digits[i + 1]
  swapped = list(digits)
  j = next((j for j in rng.permutation(len(digits) - 1) if digits[j] != digits[j + 1]), 0)
  swapped[j], swapped[j + 1] = digits[j + 1], digits[j]
  first = [sorted(off), copied][int(rng.random() < 0.5)]
  for wrong in [first, swapped] if rng.random() < 0.8 else [swapped, first]:
    if wrong != digits:
      return ' '.join(map(str, wrong))
  return ' '.join(map(str, digits[:-1]))


def nearly_right(problem: synthetic.Problem, rng: np.random.Generator) -> str:
  """A wrong answer close to the right one, of the kind a weak model gives."""
  if problem.kind == 'sort':
    return nearly_sorted(problem.answer, rng)
  n = int(problem.answer)
  deltas = {'convert': (9 * n, n // 10 - n), 'count': (-1, 1)}.get(problem.kind,
                                                                    (-10, -2, -1, 1, 2, 10))
  return str(n + int(rng.choice([d for d in deltas if n + d >= 0])))


def task_pairs(problems: Sequence[synthetic.Problem], seed: int) -> list[Pair]:
  """One pair per problem: the right answer against a nearly right one (every other pair) or
  another problem's answer of the same kind (when it differs, else a nearly right one)."""
  rng = np.random.default_rng([seed, 7])
  pairs = []
  for i, p in enumerate(problems):
    rejected = nearly_right(p, rng)
    if i % 2:
      other = problems[int(rng.integers(len(problems)))]
      if other.kind == p.kind and other.answer != p.answer:
        rejected = other.answer
    pairs.append(Pair(p.kind, [{'role': 'user', 'content': p.prompt}], p.answer, rejected))
  return pairs


def placeholder_rows(pairs: int, seq_len: int) -> dict[str, np.ndarray]:
  """Rows in `encode_pairs`' layout (pad id 0, full length), for compiling a step ahead."""
  return {'tokens': np.zeros((pairs, 2, seq_len), np.int32),
          'completion': np.ones((pairs, 2, seq_len), np.float32),
          'length': np.full((pairs, 2), seq_len, np.int32)}


def encode_pairs(tokenizer: Tokenizer, pairs: Sequence[Pair], seq_len: int
                 ) -> tuple[dict[str, np.ndarray], list[Pair]]:
  """Rows of the chosen (index 0) and rejected (1) conversations, right-padded.

  Returns 'tokens' int32 [pairs, 2, seq_len], 'completion' float32 [pairs, 2, seq_len] (1 on the
  final answer's tokens and its EOS, not on assistant turns of a multi-turn prompt) and 'length'
  int32 [pairs, 2]; and the pairs kept: those with a token past seq_len are dropped (a truncated
  answer cannot be judged).
  """
  rows, kept = [], []
  for pair in pairs:
    sides = [sft_data.encode(tokenizer, sft_data.Record(
        pair.where, pair.prompt + [{'role': 'assistant', 'content': answer}]))
        for answer in (pair.chosen, pair.rejected)]
    start = len(tokenizer.apply_chat_template(pair.prompt, add_generation_prompt=True))
    for s in sides:
      s.weights[:start] = 0.0
    if max(len(s.tokens) for s in sides) <= seq_len:
      rows.append(sides)
      kept.append(pair)
  if not rows:
    raise UserError(f'no preference pair fits in train.seq_len={seq_len} tokens; raise it.')
  out = {'tokens': np.full((len(rows), 2, seq_len), tokenizer.pad_id, np.int32),
         'completion': np.zeros((len(rows), 2, seq_len), np.float32),
         'length': np.zeros((len(rows), 2), np.int32)}
  for i, sides in enumerate(rows):
    for j, s in enumerate(sides):
      n = len(s.tokens)
      out['tokens'][i, j, :n], out['completion'][i, j, :n], out['length'][i, j] = (
          s.tokens, s.weights, n)
  return out, kept


def load_pairs(config: ml_collections.ConfigDict
               ) -> tuple[list[Pair], list[Pair]]:
  """(train, held-out) preference pairs: of the JSONL file reward.path, or of the built-in task."""
  r = config.reward
  if r.path:
    pairs = read_jsonl(r.path)  # Held out by a hash of the prompt, as in SFT.
    held = [bool(sft_data.split([sft_data.Record('', p.prompt)], r.held_out_fraction)[1])
            for p in pairs]
    train = [p for p, h in zip(pairs, held) if not h]
    held_out = [p for p, h in zip(pairs, held) if h]
  else:
    train, held_out = (task_pairs(
        synthetic.problems(split, n, config.seed, config.sft.kinds), config.seed + offset)
        for split, n, offset in (('train', r.num_train, 0), ('held_out', r.num_held_out, 1)))
  if not train or not held_out:
    raise UserError(f'the preference data has {len(train)} train and {len(held_out)} held-out '
                    'pairs; both need some: add pairs or change reward.held_out_fraction.')
  return train, held_out
