"""Tokenizers: char, word, byte, SentencePiece and Hugging Face behind one interface.

The kinds trained here put the same ten special tokens first (`SPECIAL_TOKENS`,
ids 0..9), so models, data pipelines and chat formats never depend on the kind;
special tokens written literally in text stay plain text; only
`apply_chat_template` inserts them. A Hugging Face tokenizer (kind 'hf': a
tokenizer.json and tokenizer_config.json) keeps its own ids, specials and Jinja
chat template, and encodes as the `tokenizers` library does; its bos_id may be
None (Qwen has none). `save_hf` writes a tokenizer transformers loads.

  tok = train_tokenizer(default_config(), texts)  # or load_tokenizer(directory)
  ids = tok.encode("def f(x):\n  return x\n", add_eos=True)
  assert tok.decode(ids) == "def f(x):\n  return x\n"
"""

import abc
import collections
import datetime
import functools
import io
import itertools
import json
import os
import re
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence

import jinja2
from jinja2 import sandbox
import ml_collections
import numpy as np
import sentencepiece as spm
import tokenizers as hf_tokenizers

from research.errors import UserError

SPECIAL_TOKENS = ('<pad>', '<unk>', '<bos>', '<eos>', '<mask>', '<cls>',
                  '<sep>', '<|system|>', '<|user|>', '<|assistant|>')
_NUM_SPECIAL = len(SPECIAL_TOKENS)
_SPECIAL_IDS = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
_THREADS = os.cpu_count() or 1


def default_config() -> ml_collections.ConfigDict:
  """The `tokenizer` section of an experiment config, with its defaults."""
  return ml_collections.ConfigDict(dict(
      kind='char',  # char | word | byte | sentencepiece | hf
      vocab_size=4096,  # Max vocab including specials; byte and hf ignore it.
      model_type='bpe',  # sentencepiece only: bpe | unigram
      character_coverage=0.9995,
      byte_fallback=True,
      # sentencepiece: an existing .model to load instead of training; hf: the directory of a
      # tokenizer.json and tokenizer_config.json (set by train.init_from=hf:DIR).
      path='',
      max_train_chars=3_000_000,  # SentencePiece trains on a sample this big.
  ))


def _check_texts(texts: Sequence[str], where: str) -> None:
  if isinstance(texts, str):
    raise UserError(f'{where}: got one str of {len(texts)} characters; '
                    f'expected a list of texts; wrap it as [text].')


class Tokenizer(abc.ABC):
  """Text <-> int ids. Ids 0..9 are `SPECIAL_TOKENS` for every kind."""

  kind: str
  min_vocab_size: int  # The smallest `vocab_size` that `_train` accepts.
  pad_id = 0
  unk_id = 1
  bos_id = 2
  eos_id = 3
  mask_id = 4
  cls_id = 5
  sep_id = 6
  role_ids = {'system': 7, 'user': 8, 'assistant': 9}

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of ids, specials included."""

  @abc.abstractmethod
  def _encode(self, text: str) -> list[int]:
    """Ids of `text`, without bos/eos."""

  @abc.abstractmethod
  def _decode(self, ids: list[int]) -> str:
    """Text of in-range `ids`; specials among them render as their names."""

  @abc.abstractmethod
  def id_to_token(self, i: int) -> str:
    """The vocab entry with id `i`."""

  @abc.abstractmethod
  def token_to_id(self, token: str) -> int:
    """The id of vocab entry `token`, or `unk_id`."""

  def _save(self, directory: str) -> dict:
    """Writes kind-specific files; returns the fields `_load` needs (JSON)."""
    del directory  # Nothing beyond the kind by default.
    return {}

  @classmethod
  def _load(cls, directory: str, state: dict) -> 'Tokenizer':
    """Inverse of `_save`."""
    del directory, state
    return cls()

  @classmethod
  @abc.abstractmethod
  def _train(cls, cfg: ml_collections.ConfigDict,
             texts: Sequence[str]) -> 'Tokenizer':
    """Learns a vocab from non-empty `texts`."""

  def encode(self, text: str, add_bos: bool = False,
             add_eos: bool = False) -> list[int]:
    """Ids of `text`, optionally framed by bos/eos."""
    ids = self._encode(text)
    return ([self.bos_id] * (add_bos and self.bos_id is not None) + ids
            + [self.eos_id] * add_eos)

  def encode_batch(self, texts: Sequence[str], length: int,
                   add_bos: bool = False, add_eos: bool = False,
                   pad_left: bool = False, truncate: bool = True) -> np.ndarray:
    """Ids of `texts` as int32 [len(texts), length], padded with `pad_id`.

    Longer rows keep their BOS/EOS and the first ids of the text that fit,
    or the last ones with `pad_left` (a left-padded generation prompt must
    keep its end); `truncate=False` raises instead.
    """
    _check_texts(texts, 'encode_batch')
    add_bos = add_bos and self.bos_id is not None
    if length < 1:
      raise UserError(f'encode_batch: length={length}; expected a positive '
                      f'number of tokens per row.')
    out = np.full((len(texts), length), self.pad_id, np.int32)
    for row, text in enumerate(texts):
      ids = self.encode(text, add_bos, add_eos)
      if len(ids) > length:
        if not truncate:
          raise UserError(f'encode_batch: text {row} has {len(ids)} tokens '
                          f'but length={length}; raise length or pass '
                          f'truncate=True.')
        body = ids[add_bos:len(ids) - add_eos]
        room = max(length - add_bos - add_eos, 0)
        body = body[len(body) - room:] if pad_left else body[:room]
        ids = [self.bos_id] * add_bos + body + [self.eos_id] * add_eos
        ids = ids[-length:] if pad_left else ids[:length]
      if pad_left:
        out[row, length - len(ids):] = ids
      else:
        out[row, :len(ids)] = ids
    return out

  def encode_corpus(self, texts: Iterable[str]) -> np.ndarray:
    """encode(t) + [eos_id] for every text, concatenated: int32 [tokens]."""
    _check_texts(texts, 'encode_corpus')
    ids = itertools.chain.from_iterable(
        self._encode(t) + [self.eos_id] for t in texts)
    return np.fromiter(ids, np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray,
             skip_special: bool = True) -> str:
    """Text of 1-D `ids`. `skip_special` drops all specials except `<unk>`."""
    ids = self._check_ids(ids)
    if skip_special:
      ids = [i for i in ids if i >= _NUM_SPECIAL or i == self.unk_id]
    return self._decode(ids)

  def _check_ids(self, ids: Sequence[int] | np.ndarray) -> list[int]:
    ids = np.asarray(ids)
    if ids.size == 0:
      return []
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
      raise UserError(f'Got ids of shape {ids.shape} and dtype {ids.dtype}; '
                      f'expected a 1-D sequence of ints; pass one row at a '
                      f'time.')
    bad = ids[(ids < 0) | (ids >= self.vocab_size)]
    if bad.size:
      raise UserError(f'Id {bad[0]} is out of range for this {self.kind} '
                      f'tokenizer (vocab_size {self.vocab_size}); ids must be '
                      f'in [0, {self.vocab_size}): were they made by another '
                      f'tokenizer?')
    return ids.tolist()

  def apply_chat_template(self, messages: Sequence[Mapping[str, str]],
                          add_generation_prompt: bool = False) -> list[int]:
    """[bos], then per message [role id] + content ids (+ [eos] if assistant).

    `add_generation_prompt` appends the assistant role id for the reply.
    """
    ids = [self.bos_id]
    for n, message in enumerate(messages):
      role, content = message.get('role'), message.get('content')
      if role not in self.role_ids:
        raise UserError(f'apply_chat_template: message {n} has role {role!r}; '
                        f"expected one of {', '.join(self.role_ids)}.")
      if not isinstance(content, str):
        raise UserError(f'apply_chat_template: message {n} has content of type '
                        f'{type(content).__name__}; expected a str.')
      ids += [self.role_ids[role]] + self._encode(content)
      ids += [self.eos_id] * (role == 'assistant')
    return ids + [self.role_ids['assistant']] * add_generation_prompt

  def save_hf(self, directory: str) -> None:
    """Writes tokenizer.json and tokenizer_config.json as transformers reads them (the same
    ids, and a Jinja chat template rendering `apply_chat_template`'s format)."""
    raise UserError(f'a {self.kind} tokenizer has no Hugging Face form here (char, byte and hf '
                    'tokenizers do); train the run with one of those to export it.')

  def _save_hf(self, directory: str, tokenizer: hf_tokenizers.Tokenizer) -> None:
    """save_hf of `tokenizer` (our ids) with our specials and chat format."""
    tokenizer.add_special_tokens([hf_tokenizers.AddedToken(t, special=True)
                                  for t in SPECIAL_TOKENS])
    tokenizer.save(os.path.join(directory, 'tokenizer.json'))
    names = ('pad', 'unk', 'bos', 'eos', 'mask', 'cls', 'sep')
    config = {f'{n}_token': SPECIAL_TOKENS[getattr(self, f'{n}_id')] for n in names}
    config.update(tokenizer_class='PreTrainedTokenizerFast', chat_template=(
        "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"))
    with open(os.path.join(directory, 'tokenizer_config.json'), 'w') as f:
      json.dump(config, f, indent=2)

  def save(self, directory: str) -> None:
    """Writes tokenizer.json (and kind-specific files) into `directory`."""
    os.makedirs(directory, exist_ok=True)
    state = {'kind': self.kind, **self._save(directory)}
    with open(os.path.join(directory, 'tokenizer.json'), 'w') as f:
      json.dump(state, f)


def _decode_runs(ids: list[int], decode_run: Callable[[list[int]], str]) -> str:
  """`decode_run` of each run of non-special ids, and the specials' names."""
  parts = []
  for special, run in itertools.groupby(ids, lambda i: i < _NUM_SPECIAL):
    run = list(run)
    parts.append(''.join(SPECIAL_TOKENS[i] for i in run) if special
                 else decode_run(run))
  return ''.join(parts)


def _append_eos(ids: np.ndarray, lengths: list[int], eos_id: int) -> np.ndarray:
  """Puts `eos_id` after each consecutive run of `lengths` ids: [ids + runs]."""
  return np.insert(ids, np.cumsum(lengths, dtype=np.int64), eos_id)


class _ListTokenizer(Tokenizer):
  """A tokenizer whose vocab is an explicit list of strings."""

  _fixed = SPECIAL_TOKENS  # Tokens before the learned ones.

  def __init__(self, learned: Sequence[str]):
    self._tokens = list(self._fixed) + list(learned)
    self._ids = {token: i for i, token in enumerate(self._tokens)}

  @property
  def vocab_size(self) -> int:
    return len(self._tokens)

  def id_to_token(self, i: int) -> str:
    return self._tokens[self._check_ids([i])[0]]

  def token_to_id(self, token: str) -> int:
    return self._ids.get(token, self.unk_id)

  def _save(self, directory: str) -> dict:
    return {'tokens': self._tokens[len(self._fixed):]}

  @classmethod
  def _load(cls, directory: str, state: dict) -> Tokenizer:
    return cls(state['tokens'])

  @classmethod
  def _learn(cls, counts: collections.Counter, vocab_size: int) -> Tokenizer:
    """Keeps the most frequent entries of `counts` (ties: smallest first)."""
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return cls([token for token, _ in ranked[:vocab_size - len(cls._fixed)]])


class CharTokenizer(_ListTokenizer):
  """One id per Unicode character seen in training; others map to `<unk>`."""

  kind = 'char'
  min_vocab_size = _NUM_SPECIAL + 1

  @classmethod
  def _train(cls, cfg, texts):
    counts = collections.Counter()
    for text in texts:
      counts.update(text)
    return cls._learn(counts, cfg.vocab_size)

  def _encode(self, text):
    return [self._ids.get(c, self.unk_id) for c in text]

  def encode_corpus(self, texts):
    _check_texts(texts, 'encode_corpus')
    texts = list(texts)
    codes = np.frombuffer(''.join(texts).encode('utf-32-le', 'surrogatepass'),
                          np.uint32)
    table = np.full(0x110000, self.unk_id, np.int32)
    table[[ord(c) for c in self._tokens[_NUM_SPECIAL:]]] = np.arange(
        _NUM_SPECIAL, self.vocab_size)
    return _append_eos(table[codes], [len(t) for t in texts], self.eos_id)

  def _decode(self, ids):
    return ''.join(self._tokens[i] for i in ids)

  def save_hf(self, directory: str) -> None:
    """One token per character (a WordLevel model over single-character pieces)."""
    vocab = {t: i for i, t in enumerate(self._tokens)}
    tok = hf_tokenizers.Tokenizer(hf_tokenizers.models.WordLevel(vocab, SPECIAL_TOKENS[1]))
    tok.pre_tokenizer = hf_tokenizers.pre_tokenizers.Split(
        hf_tokenizers.Regex(r'[\s\S]'), 'isolated')
    tok.decoder = hf_tokenizers.decoders.Fuse()
    self._save_hf(directory, tok)


# Ideographs and kana: one word per character.
_CJK = ('\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff'
        '\U00020000-\U0002fa1f')
# (whitespace before, word): a CJK char, a run of other word chars, or a symbol.
_WORD_RE = re.compile(rf'(\s*)([{_CJK}]|[^\W{_CJK}]+|[^\w\s])')
_CJK_LIKE_RE = re.compile(rf'[{_CJK}\u3000-\u303f\uff00-\uffef]')
_NO_SPACE_BEFORE = frozenset('.,;:!?%)]}，。、；：！？）」』》】')
_NO_SPACE_AFTER = frozenset('([{（「『《【')


def _spaced(prev: str, word: str) -> bool:
  """Whether `decode` puts a space between two words unless a marker says."""
  if prev in _NO_SPACE_AFTER or word in _NO_SPACE_BEFORE:
    return False
  return not (_CJK_LIKE_RE.match(prev[-1]) or _CJK_LIKE_RE.match(word))


class WordTokenizer(_ListTokenizer):
  """One id per word: runs of letters/digits, single CJK chars, single symbols.

  Whitespace is normalised to single spaces. `decode` spaces words by rule (none
  before "," or after "(", none next to CJK); where the text differs from the
  rule, `encode` emits `<space>` (id 10) or `<nospace>` (id 11) between the two
  words. So whitespace-normalised text round-trips when all its words are in
  the vocab, and every word is still exactly one token.
  """

  kind = 'word'
  _fixed = SPECIAL_TOKENS + ('<space>', '<nospace>')
  min_vocab_size = len(_fixed) + 1
  _space_id = _NUM_SPECIAL
  _no_space_id = _NUM_SPECIAL + 1

  @classmethod
  def _train(cls, cfg, texts):
    counts = collections.Counter()
    for text in texts:
      counts.update(word for _, word in _WORD_RE.findall(text))
    if not counts:
      raise UserError('train_tokenizer: the training texts have no words, only '
                      'whitespace; expected some text; check the data path.')
    return cls._learn(counts, cfg.vocab_size)

  def _encode(self, text):
    ids, prev = [], None
    for space, word in _WORD_RE.findall(text):
      if prev is not None and bool(space) != _spaced(prev, word):
        ids.append(self._space_id if space else self._no_space_id)
      ids.append(self._ids.get(word, self.unk_id))
      prev = word
    return ids

  def _decode(self, ids):
    parts, prev, space = [], None, None
    for i in ids:
      if i in (self._space_id, self._no_space_id):
        space = i == self._space_id
        continue
      word = self._tokens[i]
      if prev is not None and (_spaced(prev, word) if space is None else space):
        parts.append(' ')
      parts.append(word)
      prev, space = word, None
    return ''.join(parts)


class ByteTokenizer(Tokenizer):
  """The UTF-8 bytes of the text, byte b as id 10 + b; lossless."""

  kind = 'byte'
  min_vocab_size = _NUM_SPECIAL + 1

  @property
  def vocab_size(self) -> int:
    return _NUM_SPECIAL + 256

  @classmethod
  def _train(cls, cfg, texts):
    del cfg, texts  # The 256 bytes need no training.
    return cls()

  def _encode(self, text):
    return [b + _NUM_SPECIAL for b in text.encode('utf-8')]

  def encode_corpus(self, texts):
    _check_texts(texts, 'encode_corpus')
    data = [t.encode('utf-8') for t in texts]
    ids = np.frombuffer(b''.join(data), np.uint8).astype(np.int32)
    ids += _NUM_SPECIAL
    return _append_eos(ids, [len(d) for d in data], self.eos_id)

  def _decode(self, ids):
    return _decode_runs(ids, lambda run: bytes(
        i - _NUM_SPECIAL for i in run).decode('utf-8', 'replace'))

  def id_to_token(self, i: int) -> str:
    i = self._check_ids([i])[0]
    if i < _NUM_SPECIAL:
      return SPECIAL_TOKENS[i]
    return f'<0x{i - _NUM_SPECIAL:02X}>'

  def save_hf(self, directory: str) -> None:
    """A BPE with no pieces but the 256 byte tokens '<0xXX>': every character falls back to
    its UTF-8 bytes."""
    vocab = {**_SPECIAL_IDS, **{self.id_to_token(i): i for i in range(_NUM_SPECIAL,
                                                                        self.vocab_size)}}
    tok = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE(vocab, [], byte_fallback=True))
    tok.decoder = hf_tokenizers.decoders.Sequence([hf_tokenizers.decoders.ByteFallback(),
                                                   hf_tokenizers.decoders.Fuse()])
    self._save_hf(directory, tok)

  def token_to_id(self, token: str) -> int:
    if token in _SPECIAL_IDS:
      return _SPECIAL_IDS[token]
    match = re.fullmatch(r'<0x([0-9A-F]{2})>', token)
    return int(match.group(1), 16) + _NUM_SPECIAL if match else self.unk_id


_SP_SPACE = '\u2581'  # SentencePiece's whitespace marker.
# SentencePiece drops the end of line of each training sentence, so it trains
# on chunks of whole lines, where newlines stay inside.
_CHUNK_RE = re.compile(r'.{0,4095}\n|.{1,4096}', re.DOTALL)


def _sample_chunks(texts: Sequence[str], max_chars: int) -> list[str]:
  """`texts` cut into chunks of whole lines (<= 4096 chars each).

  Returns all chunks, or a fixed random subset of at most `max_chars` chars.
  """
  chunks = [chunk for text in texts for chunk in _CHUNK_RE.findall(text)]
  order = np.random.default_rng(0).permutation(len(chunks))
  total = np.cumsum([len(chunks[i]) for i in order])
  keep = order[:np.searchsorted(total, max_chars, side='right')]
  return [chunks[i] for i in np.sort(keep)]


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece BPE or unigram model.

  A model trained here has our specials at ids 0..9 and, with byte_fallback,
  round-trips any text exactly: identity normalisation, all whitespace kept,
  and a literal U+2581 (SentencePiece's space marker) encoded as bytes. A model
  loaded from `path` is renumbered: its unk/bos/eos/pad and any control pieces
  named like ours take our ids, its other pieces follow from id 10 in their own
  order, and specials it lacks (e.g. `<mask>`) keep their ids but never come
  out of `encode`. Such a model keeps its own normalisation, so it may not
  round-trip.
  """

  kind = 'sentencepiece'
  min_vocab_size = _NUM_SPECIAL + 1

  def __init__(self, model_proto: bytes):
    self._proto = model_proto
    self._sp = sp = spm.SentencePieceProcessor(model_proto=model_proto)
    ours = {sp.unk_id(): self.unk_id, sp.bos_id(): self.bos_id,
            sp.eos_id(): self.eos_id, sp.pad_id(): self.pad_id}
    ours.pop(-1, None)  # Pieces the model lacks.
    for i in range(sp.vocab_size()):
      if sp.is_control(i) and sp.id_to_piece(i) in _SPECIAL_IDS:
        ours.setdefault(i, _SPECIAL_IDS[sp.id_to_piece(i)])
    is_ours = np.zeros(sp.vocab_size(), bool)
    is_ours[list(ours)] = True
    self._to_sp = np.concatenate([np.full(_NUM_SPECIAL, -1),
                                  np.flatnonzero(~is_ours)])
    self._from_sp = np.empty(sp.vocab_size(), np.int32)
    self._from_sp[~is_ours] = np.arange(_NUM_SPECIAL, len(self._to_sp))
    self._from_sp[list(ours)] = list(ours.values())
    # SentencePiece decodes a literal U+2581 as " ", so encode it as bytes.
    byte_ids = [sp.piece_to_id(f'<0x{b:02X}>') for b in _SP_SPACE.encode()]
    self._space_ids = [sp.unk_id()] if sp.unk_id() in byte_ids else byte_ids

  @classmethod
  def from_file(cls, path: str) -> 'SentencePieceTokenizer':
    """Loads a `.model` file written by SentencePiece."""
    if not os.path.isfile(path):
      raise UserError(f'No SentencePiece model at {path!r}; expected a .model '
                      f'file (tokenizer.path, or tokenizer.model in a saved '
                      f'tokenizer directory); fix the path.')
    with open(path, 'rb') as f:
      proto = f.read()
    try:  # An empty file parses as an empty model.
      sp = spm.SentencePieceProcessor(model_proto=proto) if proto else None
    except RuntimeError:
      sp = None
    if sp is None or not sp.vocab_size():
      raise UserError(f'{path!r} is not a SentencePiece model; expected a '
                      f'.model file written by SentencePieceTrainer; fix the '
                      f'path.')
    return cls(proto)

  @classmethod
  def _train(cls, cfg, texts):
    if cfg.model_type not in ('bpe', 'unigram'):
      raise UserError(f'tokenizer.model_type={cfg.model_type!r}; expected '
                      f"'bpe' or 'unigram'.")
    chunks = _sample_chunks(texts, cfg.max_train_chars)
    model = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=iter(chunks), model_writer=model,
          model_type=cfg.model_type, vocab_size=cfg.vocab_size,
          character_coverage=cfg.character_coverage,
          byte_fallback=cfg.byte_fallback,
          pad_id=0, unk_id=1, bos_id=2, eos_id=3,
          pad_piece=SPECIAL_TOKENS[0], unk_piece=SPECIAL_TOKENS[1],
          bos_piece=SPECIAL_TOKENS[2], eos_piece=SPECIAL_TOKENS[3],
          # A list: SentencePiece would read a tuple as one string.
          control_symbols=list(SPECIAL_TOKENS[4:]),
          # Keep every character and all whitespace as it is (source code).
          normalization_rule_name='identity', remove_extra_whitespaces=False,
          add_dummy_prefix=False, allow_whitespace_only_pieces=True,
          split_digits=True, max_sentence_length=4 * 4096,  # UTF-8 bytes.
          num_threads=_THREADS, minloglevel=2)
    except RuntimeError as e:
      reason = str(e).split('] ')[-1].strip()
      given = (f'tokenizer.vocab_size={cfg.vocab_size} for a {cfg.model_type} '
               f'model on {sum(map(len, chunks))} characters of training text')
      if match := re.search(r'required_chars\. \d+ vs (\d+)', reason):
        raise UserError(f'{given} is too small: its specials, byte pieces and '
                        f'characters need {match[1]} ids; set vocab_size >= '
                        f'{match[1]} or lower character_coverage.') from e
      if match := re.search(r'value <= (\d+)', reason):
        raise UserError(f'{given} is too large: SentencePiece finds at most '
                        f'{match[1]} pieces; set vocab_size <= {match[1]} or '
                        f'train on more text.') from e
      raise UserError(f'SentencePiece failed with {given}: {reason}; check the '
                      f'text and the tokenizer config.') from e
    return cls(model.getvalue())

  @property
  def vocab_size(self) -> int:
    return len(self._to_sp)

  def _sp_ids(self, texts: list[str]) -> Iterator[list[int]]:
    """SentencePiece's own ids for each text, encoded on all cores."""
    parts = [t.split(_SP_SPACE) for t in texts]
    encoded = iter(self._sp.encode([p for ps in parts for p in ps],
                                   num_threads=_THREADS))
    for ps in parts:
      ids = next(encoded)
      for _ in ps[1:]:
        ids += self._space_ids + next(encoded)
      yield ids

  def _encode(self, text):
    return self._from_sp[next(self._sp_ids([text]))].tolist()

  def encode_corpus(self, texts):
    _check_texts(texts, 'encode_corpus')
    encoded = list(self._sp_ids(list(texts)))
    ids = np.fromiter(itertools.chain.from_iterable(encoded), np.int32)
    return _append_eos(self._from_sp[ids], [len(e) for e in encoded],
                       self.eos_id)

  def _decode(self, ids):
    return _decode_runs(
        ids, lambda run: self._sp.decode(self._to_sp[run].tolist()))

  def id_to_token(self, i: int) -> str:
    i = self._check_ids([i])[0]
    if i < _NUM_SPECIAL:
      return SPECIAL_TOKENS[i]
    return self._sp.id_to_piece(int(self._to_sp[i]))

  def token_to_id(self, token: str) -> int:
    if token in _SPECIAL_IDS:
      return _SPECIAL_IDS[token]
    return int(self._from_sp[self._sp.piece_to_id(token)])

  def _save(self, directory: str) -> dict:
    with open(os.path.join(directory, 'tokenizer.model'), 'wb') as f:
      f.write(self._proto)
    return {}

  @classmethod
  def _load(cls, directory: str, state: dict) -> Tokenizer:
    return cls.from_file(os.path.join(directory, 'tokenizer.model'))


@functools.cache
def _jinja() -> sandbox.ImmutableSandboxedEnvironment:
  """The Jinja environment chat templates are rendered in, set up as transformers sets up its
  own: blocks trimmed, loop controls, a tojson that keeps non-ASCII, raise_exception and
  strftime_now."""
  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                              extensions=['jinja2.ext.loopcontrols'])
  env.filters['tojson'] = lambda x, ensure_ascii=False, indent=None, separators=None, \
      sort_keys=False: json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                                  separators=separators, sort_keys=sort_keys)
  env.globals['raise_exception'] = raise_exception
  env.globals['strftime_now'] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env


# Conversations of a tokenizer_config.json without a chat_template: the contents one after the
# other, EOS after each assistant turn (how base models are usually fine-tuned on pairs).
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}"
                  "{{ eos_token }}{% endif %}{% endfor %}")


class HFTokenizer(Tokenizer):
  """A Hugging Face fast tokenizer: tokenizer.json (the `tokenizers` library) with the special
  tokens and Jinja `chat_template` of tokenizer_config.json (or chat_template.jinja).

  Ids are the file's own. Text is encoded as tokenizers' `encode(text,
  add_special_tokens=False)` encodes it (special tokens written in the text are parsed as
  specials, as there); `add_bos` adds the bos token where the tokenizer has one.
  `apply_chat_template` renders the template as transformers does and encodes the result the same
  way, so the ids equal transformers' `apply_chat_template`. pad_id is the pad token's, else
  eos's.
  """

  kind = 'hf'
  min_vocab_size = 1

  def __init__(self, tokenizer_json: str, config: dict, where: str = 'tokenizer'):
    self._json, self._config = tokenizer_json, config
    self._tk = hf_tokenizers.Tokenizer.from_str(tokenizer_json)
    self.special_tokens = {}
    for name in ('bos', 'eos', 'unk', 'pad', 'mask', 'cls', 'sep'):
      token = config.get(f'{name}_token')
      token = token.get('content') if isinstance(token, dict) else token
      if token is not None:
        if self._tk.token_to_id(token) is None:
          raise UserError(f'{where}: {name}_token {token!r} is not in tokenizer.json\'s '
                          'vocabulary; fix tokenizer_config.json.')
        self.special_tokens[f'{name}_token'] = token
    ids = {k[:-6]: self._tk.token_to_id(t) for k, t in self.special_tokens.items()}
    if 'eos' not in ids:
      raise UserError(f'{where}: tokenizer_config.json names no eos_token, which ends every '
                      'reply; add one.')
    self.bos_id, self.eos_id, self.unk_id = ids.get('bos'), ids['eos'], ids.get('unk')
    self.pad_id = ids.get('pad', self.eos_id)
    self.mask_id, self.cls_id, self.sep_id = ids.get('mask'), ids.get('cls'), ids.get('sep')
    template = config.get('chat_template') or PLAIN_TEMPLATE
    if isinstance(template, list):  # Named templates: the default one.
      template = {t['name']: t['template'] for t in template}.get('default', PLAIN_TEMPLATE)
    self.chat_template = template
    self._vocab_size = max(self._tk.get_vocab(with_added_tokens=True).values()) + 1

  @classmethod
  def from_directory(cls, directory: str) -> 'HFTokenizer':
    """The tokenizer.json, tokenizer_config.json and chat_template.jinja of `directory`."""
    path = os.path.join(directory, 'tokenizer.json')
    if not os.path.isfile(path):
      raise UserError(f'{directory} has no tokenizer.json (tokenizer.kind=hf reads fast '
                      'tokenizers; convert a slow one with transformers: AutoTokenizer.'
                      'from_pretrained(DIR).save_pretrained(DIR)).')
    with open(path, encoding='utf-8') as f:
      text = f.read()
    config = {}
    if os.path.isfile(os.path.join(directory, 'tokenizer_config.json')):
      with open(os.path.join(directory, 'tokenizer_config.json'), encoding='utf-8') as f:
        config = json.load(f)
    if os.path.isfile(os.path.join(directory, 'chat_template.jinja')):
      with open(os.path.join(directory, 'chat_template.jinja'), encoding='utf-8') as f:
        config['chat_template'] = f.read()
    try:
      return cls(text, config, directory)
    except Exception as e:  # tokenizers raises plain Exceptions for files it cannot parse.
      if isinstance(e, UserError):
        raise
      raise UserError(f'{path} is not a tokenizer.json the tokenizers library reads ({e}).'
                      ) from None

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  def _encode(self, text):
    return self._tk.encode(text, add_special_tokens=False).ids

  def encode_corpus(self, texts):
    _check_texts(texts, 'encode_corpus')
    encoded = [e.ids for e in self._tk.encode_batch(list(texts), add_special_tokens=False)]
    ids = np.fromiter(itertools.chain.from_iterable(encoded), np.int32)
    return _append_eos(ids, [len(e) for e in encoded], self.eos_id)

  def decode(self, ids, skip_special=True):
    """Text of `ids`; ids past the tokenizer's vocabulary (rows an imported model's embedding
    has beyond it, which a model can still sample) decode to nothing, as in tokenizers."""
    ids = np.asarray(ids)
    if ids.ndim == 1 and np.issubdtype(ids.dtype, np.integer):
      ids = ids[ids < self.vocab_size]
    return self._tk.decode(self._check_ids(ids), skip_special_tokens=skip_special)

  def _decode(self, ids):
    return self._tk.decode(ids, skip_special_tokens=False)

  def id_to_token(self, i: int) -> str:
    return self._tk.id_to_token(self._check_ids([i])[0]) or ''

  def token_to_id(self, token: str) -> Optional[int]:
    i = self._tk.token_to_id(token)
    return self.unk_id if i is None else i

  def apply_chat_template(self, messages, add_generation_prompt=False):
    for n, message in enumerate(messages):
      if not isinstance(message.get('content'), str):
        raise UserError(f'apply_chat_template: message {n} has content of type '
                        f'{type(message.get("content")).__name__}; expected a str.')
    try:
      text = _jinja().from_string(self.chat_template).render(
          messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
          **self.special_tokens)
    except jinja2.TemplateError as e:
      raise UserError(f'the chat template refused the conversation: {e}') from None
    return self._encode(text)

  def save(self, directory: str) -> None:
    self.save_hf(directory)

  def save_hf(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, 'tokenizer.json'), 'w', encoding='utf-8') as f:
      f.write(self._json)
    config = dict(self._config, chat_template=self.chat_template)
    with open(os.path.join(directory, 'tokenizer_config.json'), 'w', encoding='utf-8') as f:
      json.dump(config, f, indent=2, ensure_ascii=False)

  @classmethod
  def _train(cls, cfg, texts):
    del texts  # Loaded, never trained.
    return cls.from_directory(cfg.path)


_KINDS = {cls.kind: cls for cls in (CharTokenizer, WordTokenizer, ByteTokenizer,
                                    SentencePieceTokenizer, HFTokenizer)}


def _tokenizer_class(kind: str, where: str) -> type[Tokenizer]:
  if kind not in _KINDS:
    raise UserError(f'{where}: tokenizer kind {kind!r} is unknown; expected '
                    f"one of {', '.join(_KINDS)}.")
  return _KINDS[kind]


def train_tokenizer(cfg: ml_collections.ConfigDict,
                    texts: Sequence[str]) -> Tokenizer:
  """The tokenizer `cfg` (see `default_config`) asks for, learnt from `texts`.

  With kind "sentencepiece" and a `path`, loads that model and ignores `texts`.
  """
  cls = _tokenizer_class(cfg.kind, 'train_tokenizer')
  if cls is SentencePieceTokenizer and cfg.path:
    return SentencePieceTokenizer.from_file(cfg.path)
  if cls is HFTokenizer:
    return HFTokenizer.from_directory(cfg.path)
  _check_texts(texts, 'train_tokenizer')
  texts = list(texts)
  if not any(texts):
    raise UserError(f'train_tokenizer: got {len(texts)} texts with no '
                    f'characters; expected some training text; check the data.')
  if cfg.vocab_size < cls.min_vocab_size:
    raise UserError(f'tokenizer.vocab_size={cfg.vocab_size} is too small: the '
                    f'{cfg.kind} tokenizer has {cls.min_vocab_size - 1} fixed '
                    f'tokens; set vocab_size >= {cls.min_vocab_size}.')
  return cls._train(cfg, texts)


def load_tokenizer(directory: str) -> Tokenizer:
  """The tokenizer that `Tokenizer.save` wrote into `directory`."""
  path = os.path.join(directory, 'tokenizer.json')
  if not os.path.isfile(path):
    raise UserError(f'No tokenizer at {directory!r}: {path} is missing; '
                    f'expected a directory written by Tokenizer.save; check '
                    f'the path.')
  with open(path, encoding='utf-8') as f:
    state = json.load(f)
  if 'kind' not in state and 'model' in state:  # A Hugging Face tokenizer.json.
    return HFTokenizer.from_directory(directory)
  return _tokenizer_class(state.pop('kind'), path)._load(directory, state)


def tokenizer_report(tok: Tokenizer, text: str, top: int = 20) -> str:
  """A human-readable summary of `tok`, with its compression of `text`."""
  ids = tok.encode(text)
  n_bytes = len(text.encode('utf-8'))
  lines = [f'kind: {tok.kind}', f'vocab size: {tok.vocab_size}',
           f'text: {len(text)} characters, {n_bytes} UTF-8 bytes, '
           f'{len(ids)} tokens',
           f'tokens per character: {len(ids) / max(len(text), 1):.4f}',
           f'tokens per byte: {len(ids) / max(n_bytes, 1):.4f}',
           'most frequent tokens:']
  for i, count in collections.Counter(ids).most_common(top):
    lines.append(f'  {i:6d} {tok.id_to_token(i)!r:24} {count}')
  surfaces = {i: tok.decode([i]) for i in range(tok.vocab_size) if i != tok.unk_id}
  lines.append('longest tokens (characters decoded):')
  for i in sorted(surfaces, key=lambda i: (-len(surfaces[i]), i))[:top]:
    lines.append(f'  {i:6d} {surfaces[i]!r}')
  return '\n'.join(lines)
