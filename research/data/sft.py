"""Supervised fine-tuning data: records -> token ids with loss weights -> packed or padded rows.

A record is one of the usual JSONL conventions:
  {"prompt": "...", "completion": "..."}         a user turn and the assistant's answer
  {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}, ...]}
  {"text": "..."}                                 plain text (continued pretraining)
Conversations are rendered with the tokenizer's chat template (role tokens, EOS after each
assistant turn); only assistant tokens (with their EOS) carry loss weight, plain text all of it.
Rows hold several examples when packing (segment ids 1, 2, ...; positions restart per example;
0 = padding), else one example each. `load_records` gives a config's (train, held-out) records,
`score` the held-out exact match of a model's greedy replies (SFT, DPO, PPO, RLHF report it).
"""

import copy
import dataclasses
import json
import os
import zlib
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from research import decoding
from research.data import synthetic
from research.errors import UserError
from research.tokenizers import Tokenizer


@dataclasses.dataclass(frozen=True)
class Record:
  """One training example before tokenisation: a conversation, or plain text when messages is
  None. `where` names its source ('path:line') for error messages."""
  where: str
  messages: list[dict[str, str]] | None
  text: str = ''


@dataclasses.dataclass(frozen=True)
class Example:
  tokens: np.ndarray  # int32 [length]
  weights: np.ndarray  # float32 [length]: 1 where the token is to be predicted (answer tokens)


def parse(record: Any, where: str) -> Record:
  """Checks one decoded JSONL line; a UserError naming `where` says what is wrong."""
  if not isinstance(record, dict):
    record = {}
  if isinstance(record.get('prompt'), str) and isinstance(record.get('completion'), str):
    return Record(where, [{'role': 'user', 'content': record['prompt']},
                          {'role': 'assistant', 'content': record['completion']}])
  if isinstance(record.get('messages'), list):
    messages = record['messages']
    for n, m in enumerate(messages):
      if not isinstance(m, dict) or not isinstance(m.get('content'), str):
        raise UserError(f'{where}: message {n} is not {{"role": ..., "content": "..."}}; fix or '
                        'delete that line.')
      if m.get('role') not in Tokenizer.role_ids:
        raise UserError(f'{where}: message {n} has role {m.get("role")!r}; expected one of '
                        f'{", ".join(Tokenizer.role_ids)}.')
    if not any(m['role'] == 'assistant' for m in messages):
      raise UserError(f'{where}: the conversation has no assistant message, so nothing to learn; '
                      'add one or delete that line.')
    return Record(where, [{'role': m['role'], 'content': m['content']} for m in messages])
  if isinstance(record.get('text'), str):
    return Record(where, None, record['text'])
  raise UserError(f'{where}: expected an object with "prompt" and "completion", "messages", or '
                  '"text" (strings); fix or delete that line.')


def read_jsonl(path: str, parse_line: Callable[[Any, str], Any] | None = None,
               key: str = 'sft.path', expected: str = '{"prompt", "completion"}, {"messages"} '
               'or {"text"} records') -> list:
  """The records of a JSONL file, each line checked (`parse_line(value, 'path:line')`, default
  `parse`) before any is used. `key` and `expected` name the setting and format in errors."""
  if not os.path.isfile(path):
    raise UserError(f'{key}={path!r} is not a file; give a .jsonl file of {expected} (or \'\' '
                    'for the built-in task).')
  records = []
  with open(path, encoding='utf-8') as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        records.append((parse_line or parse)(json.loads(line), f'{path}:{i}'))
      except json.JSONDecodeError as e:
        raise UserError(f'{path}:{i} is not valid JSON ({e.msg}); fix or delete that line.'
                        ) from None
  if not records:
    raise UserError(f'{key}={path!r} holds no records; add JSONL lines.')
  return records


def task_records(problems: Sequence[synthetic.Problem]) -> list[Record]:
  return [Record(p.kind, [{'role': 'user', 'content': p.prompt},
                            {'role': 'assistant', 'content': p.answer}]) for p in problems]


def split(records: Sequence[Record], held_out_fraction: float) -> tuple[list[Record],
                                                                         list[Record]]:
  """(train, held-out) by a hash of each record's prompt: the turns before its last assistant
  turn (plain text: the text). The same wherever the file lies; every answer to a prompt falls
  on its side, and reward/DPO pairs (hashed on their prompt turns) split with the SFT records
  of the same prompt, so no stage trains on another's held-out prompts."""
  def prompt(r: Record):
    turns = r.messages
    if turns and turns[-1]['role'] == 'assistant':
      turns = turns[:-1]
    return json.dumps([turns, r.text])

  held = [zlib.crc32(prompt(r).encode()) / 2**32 < held_out_fraction for r in records]
  return ([r for r, h in zip(records, held) if not h], [r for r, h in zip(records, held) if h])


def encode(tokenizer: Tokenizer, record: Record) -> Example:
  """Token ids and loss weights of a conversation (weights on assistant turns) or plain text.

  Each assistant turn is what the model generates after the prompt of the earlier turns
  (`decoding.chat_prompt`): its content and EOS carry weight, its role token does not (the
  prompt supplies it).
  """
  if record.messages is None:
    ids = tokenizer.encode(record.text, add_bos=True, add_eos=True)
    return Example(np.asarray(ids, np.int32), np.ones(len(ids), np.float32))
  messages = record.messages
  ids = tokenizer.apply_chat_template(messages)
  weights = np.zeros(len(ids), np.float32)
  for i, m in enumerate(messages):
    if m['role'] == 'assistant':
      start = len(tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True))
      weights[start:len(tokenizer.apply_chat_template(messages[:i + 1]))] = 1.0
  return Example(np.asarray(ids, np.int32), weights)


@dataclasses.dataclass
class FitReport:
  truncated: int = 0
  skipped: int = 0


def fit(examples: Sequence[Example], seq_len: int, overlong: str) -> tuple[list[Example],
                                                                            FitReport]:
  """Examples of at most seq_len + 1 tokens (a row holds seq_len inputs and their targets).

  Longer ones are cut to that length (`overlong='truncate'`) or dropped ('skip'); an example left
  with no weighted target is dropped too. The report counts both.
  """
  out, report = [], FitReport()
  for e in examples:
    if len(e.tokens) > seq_len + 1:
      if overlong == 'skip':
        report.skipped += 1
        continue
      report.truncated += 1
      e = Example(e.tokens[:seq_len + 1], e.weights[:seq_len + 1])
    if e.weights[1:].sum() == 0:
      report.skipped += 1
      continue
    out.append(e)
  return out, report


def make_rows(examples: Sequence[Example], seq_len: int, pack: bool,
              pad_id: int) -> dict[str, np.ndarray]:
  """Examples (each of at most seq_len + 1 tokens) laid out in rows, in order.

  An example of n tokens fills n - 1 slots: inputs tokens[:-1], targets tokens[1:] with weights
  weights[1:]. Packing puts the next example in the current row while it fits (next fit).
  Returns 'inputs', 'targets', 'positions', 'segment_ids': int32 and 'weights': float32, each
  [rows, seq_len]; padding has segment 0 and weight 0.
  """
  layout = []  # (row, start) per example
  row, used = -1, seq_len
  for e in examples:
    n = len(e.tokens) - 1
    if not pack or used + n > seq_len:
      row, used = row + 1, 0
    layout.append((row, used))
    used += n
  rows = row + 1
  out = {k: np.zeros((rows, seq_len), np.int32) for k in ('inputs', 'targets', 'positions',
                                                          'segment_ids')}
  out['inputs'][:], out['targets'][:] = pad_id, pad_id
  out['weights'] = np.zeros((rows, seq_len), np.float32)
  segment = np.zeros(rows, np.int32)
  for e, (r, start) in zip(examples, layout):
    n = len(e.tokens) - 1
    segment[r] += 1
    span = slice(start, start + n)
    out['inputs'][r, span], out['targets'][r, span] = e.tokens[:-1], e.tokens[1:]
    out['weights'][r, span] = e.weights[1:]
    out['positions'][r, span] = np.arange(n)
    out['segment_ids'][r, span] = segment[r]
  return out


def num_rows(rows: dict[str, np.ndarray]) -> int:
  return len(next(iter(rows.values())))


def sample_rows(rows: dict[str, np.ndarray], batch_size: int, seed: int, step: int,
                micro: int = 0, part: slice = slice(None)) -> dict[str, np.ndarray]:
  """Rows `part` of a random batch of `batch_size` rows, drawn from (seed, step, micro) only."""
  n = num_rows(rows)
  idx = np.random.default_rng([seed, step, micro]).integers(0, n, size=batch_size)[part]
  return {k: v[idx] for k, v in rows.items()}


def row_batches(train_rows: dict[str, np.ndarray], held_rows: dict[str, np.ndarray],
                batch_size: int, seed: int, num_eval: int
                ) -> tuple[Callable[[int, int, slice], dict[str, np.ndarray]],
                           list[dict[str, np.ndarray]]]:
  """A stage's batches of rows: (train_batch(step, micro, part) by `sample_rows`, the first
  `num_eval` held-out batches by `fixed_batches`), each of `batch_size` rows."""
  return (lambda step, micro, part: sample_rows(train_rows, batch_size, seed, step, micro, part),
          fixed_batches(held_rows, num_eval, batch_size))


def fixed_batches(rows: dict[str, np.ndarray], num_batches: int,
                  batch_size: int) -> list[dict[str, np.ndarray]]:
  """Up to `num_batches` consecutive batches of the first rows (fewer when rows run out)."""
  n = min(num_batches, num_rows(rows) // batch_size)
  if n == 0:
    raise UserError(f'the held-out split fills {num_rows(rows)} rows, fewer than one '
                    f'micro-batch of {batch_size}; add held-out examples or lower '
                    'train.batch_size.')
  return [{k: v[i * batch_size:(i + 1) * batch_size] for k, v in rows.items()} for i in range(n)]


def load_records(config: ml_collections.ConfigDict
                 ) -> tuple[list[Record], list[Record]]:
  """(train, held-out) records: of the JSONL file sft.path, or of the built-in task."""
  s = config.sft
  if s.path:
    train, held_out = split(read_jsonl(s.path), s.held_out_fraction)
  else:
    train, held_out = (task_records(synthetic.problems(part, n, config.seed, s.kinds))
                       for part, n in (('train', s.num_train), ('held_out', s.num_held_out)))
  if not train or not held_out:
    raise UserError(f'the SFT data has {len(train)} train and {len(held_out)} held-out records; '
                    'both need some: add records or change sft.held_out_fraction.')
  return train, held_out


def exact_match(model: nn.Module, params: Any, tok: Tokenizer,
                records: Sequence[Record], sampling: ml_collections.ConfigDict,
                max_new_tokens: int) -> list[bool]:
  """Whether the greedy reply to each conversation's earlier turns equals its last (assistant)
  message, stripped."""
  s = copy.deepcopy(sampling)
  s.update(dict(strategy='greedy', max_new_tokens=max_new_tokens))
  prompts = [decoding.chat_prompt(tok, r.messages[:-1]) for r in records]
  replies = decoding.generate(model, params, tok, prompts, s, jax.random.key(0))
  return [synthetic.matches(tok.decode(reply), r.messages[-1]['content'])
          for reply, r in zip(replies, records)]


def score(config: ml_collections.ConfigDict, model: nn.Module, params: Any,
          tok: Tokenizer, records: Sequence[Record]) -> dict[str, float]:
  """Held-out exact match: 'all', and per kind ('add', ...) for the built-in task."""
  scored = [r for r in records if r.messages and r.messages[-1]['role'] == 'assistant']
  correct = exact_match(model, params, tok, scored, config.sampling, config.sft.max_new_tokens)
  out = {'all': float(np.mean(correct))}
  for kind in sorted({r.where for r in scored} & set(synthetic.KINDS)):
    out[kind] = float(np.mean([c for c, r in zip(correct, scored) if r.where == kind]))
  return out
