"""Tests for research/tokenizers.py: round trips, specials, batching, errors."""

import hypothesis
from hypothesis import strategies as st
import ml_collections
import numpy as np
import pytest
import sentencepiece as spm

from research import tokenizers
from research.errors import UserError

TEXTS = [
    'The quick brown fox jumps over the lazy dog. A language model reads '
    'text, one token at a time, and guesses the next one.',
    '今天天气很好，我们去公园散步吧。语言模型把文字切成词元，然后预测下一个词元。',
    "def greet(name: str) -> str:\n    \"\"\"Says hello.\"\"\"\n"
    "    return f'Hello, {name}!'\n",
    'for i in range(10):\n\tif i % 2 == 0:\n\t\tprint(i, i ** 2)  # even\n',
    'Specials written as text stay text: <pad> <eos> <mask> <|user|>.',
] * 4
KINDS = ('char', 'word', 'byte', 'sentencepiece', 'unigram')
# Any Unicode text (no lone surrogates), with CJK, emoji and whitespace common.
ANY_TEXT = st.text(st.characters(codec='utf-8')) | st.text(
    st.sampled_from('ab Z9 \t\n\r  你好世界。，🎉🙂é▁<|>()_.,!?'))
SETTINGS = hypothesis.settings(max_examples=100, deadline=None)


def _config(kind: str, **overrides) -> ml_collections.ConfigDict:
  cfg = tokenizers.default_config()
  if kind == 'unigram':
    kind, cfg.model_type = 'sentencepiece', 'unigram'
  cfg.kind = kind
  cfg.vocab_size = 370 if kind == 'sentencepiece' else 200
  cfg.update(overrides)
  return cfg


@pytest.fixture(scope='module')
def toks() -> dict[str, tokenizers.Tokenizer]:
  return {kind: tokenizers.train_tokenizer(_config(kind), TEXTS)
          for kind in KINDS}


def test_specials_have_fixed_ids(toks):
  for tok in toks.values():
    assert [tok.id_to_token(i) for i in range(10)] == list(
        tokenizers.SPECIAL_TOKENS)
    assert [tok.token_to_id(t) for t in tokenizers.SPECIAL_TOKENS] == list(
        range(10))
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id,
            tok.cls_id, tok.sep_id) == tuple(range(7))
    assert tok.role_ids == {'system': 7, 'user': 8, 'assistant': 9}
    assert tok.pad_id != tok.eos_id


@pytest.mark.parametrize('kind', KINDS)
def test_literal_specials_stay_plain_text(toks, kind):
  text = '<pad> <eos> <mask> <|user|>'
  ids = toks[kind].encode(text)
  assert min(ids) >= 10
  assert toks[kind].decode(ids) == text


@pytest.mark.parametrize('kind', ('byte', 'sentencepiece', 'unigram'))
@SETTINGS
@hypothesis.given(text=ANY_TEXT)
def test_lossless_kinds_round_trip_any_text(toks, kind, text):
  ids = toks[kind].encode(text)
  assert toks[kind].decode(ids) == text
  assert all(i >= 10 for i in ids)


@SETTINGS
@hypothesis.given(text=st.text(st.sampled_from(sorted(set(''.join(TEXTS))))))
def test_char_round_trips_text_in_vocab(toks, text):
  assert toks['char'].decode(toks['char'].encode(text)) == text


@SETTINGS
@hypothesis.given(text=ANY_TEXT)
def test_word_round_trips_normalised_text(text):
  hypothesis.assume(text.strip())
  tok = tokenizers.train_tokenizer(_config('word', vocab_size=10_000), [text])
  assert tok.decode(tok.encode(text)) == ' '.join(text.split())


def test_unknown_symbols_map_to_unk(toks):
  assert toks['char'].encode('q€') == [toks['char'].token_to_id('q'), 1]
  assert toks['word'].encode('fox zebra') == [
      toks['word'].token_to_id('fox'), 1]
  assert toks['word'].decode(toks['word'].encode('fox zebra')) == 'fox <unk>'


def test_word_spacing_and_cjk(toks):
  tok = toks['word']
  ids = tok.encode('The fox, the dog.')
  assert [tok.id_to_token(i) for i in ids] == [
      'The', 'fox', ',', 'the', 'dog', '.']  # One token per word, no markers.
  assert tok.decode(tok.encode('今天天气很好。')) == '今天天气很好。'
  assert len(tok.encode('今天天气很好。')) == 7
  assert tok.decode(tok.encode('  The\n\tfox  ')) == 'The fox'


def test_byte_decode_of_invalid_utf8_replaces(toks):
  tok = toks['byte']
  assert tok.decode([0xE4 + 10, ord('a') + 10]) == '\ufffda'
  assert tok.encode('é') == [0xC3 + 10, 0xA9 + 10]


def test_decode_skips_or_shows_specials(toks):
  for tok in toks.values():
    ids = tok.encode('fox', add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == 'fox'
    assert tok.decode(ids, skip_special=False) in ('<bos>fox<eos>',
                                                   '<bos> fox <eos>')
    assert tok.decode(np.array(ids, np.int32)) == 'fox'


@pytest.mark.parametrize('kind', KINDS)
def test_save_load_gives_identical_ids(toks, kind, tmp_path):
  toks[kind].save(str(tmp_path))
  loaded = tokenizers.load_tokenizer(str(tmp_path))
  assert loaded.kind == toks[kind].kind
  assert loaded.vocab_size == toks[kind].vocab_size
  for text in TEXTS[:5] + ['unseen ζ text 🎉']:
    assert loaded.encode(text) == toks[kind].encode(text)


@pytest.mark.parametrize('kind', KINDS)
def test_encode_corpus_matches_encode(toks, kind):
  texts = TEXTS[:5] + ['', 'unseen ζ▁text 🎉']
  expected = [i for t in texts for i in toks[kind].encode(t, add_eos=True)]
  corpus = toks[kind].encode_corpus(iter(texts))
  assert corpus.dtype == np.int32
  np.testing.assert_array_equal(corpus, expected)


def test_encode_batch_pads_and_truncates(toks):
  tok = toks['byte']
  a, b = ord('a') + 10, ord('b') + 10
  np.testing.assert_array_equal(
      tok.encode_batch(['ab', 'a'], 3), [[a, b, 0], [a, 0, 0]])
  left = tok.encode_batch(['ab', 'a'], 3, add_bos=True, pad_left=True)
  np.testing.assert_array_equal(left, [[2, a, b], [0, 2, a]])
  assert left.dtype == np.int32
  np.testing.assert_array_equal(tok.encode_batch(['abab'], 2), [[a, b]])
  np.testing.assert_array_equal(
      tok.encode_batch(['abba'], 2, add_eos=True, pad_left=True), [[a, 3]])
  np.testing.assert_array_equal(  # Truncation keeps BOS and EOS.
      tok.encode_batch(['abab'], 3, add_bos=True, pad_left=True), [[2, a, b]])
  np.testing.assert_array_equal(tok.encode_batch(['abab'], 3, add_eos=True), [[a, b, 3]])
  with pytest.raises(UserError, match='text 1 has 5 tokens but length=4'):
    tok.encode_batch(['ab', 'abbab'], 4, truncate=False)


def test_chat_template_layout(toks):
  tok = toks['char']
  messages = [{'role': 'system', 'content': 'a'},
              {'role': 'user', 'content': 'bc'},
              {'role': 'assistant', 'content': 'd'}]
  enc = tok.encode
  assert tok.apply_chat_template(messages, add_generation_prompt=True) == (
      [2, 7] + enc('a') + [8] + enc('bc') + [9] + enc('d') + [3, 9])
  assert tok.apply_chat_template(messages[1:2]) == [2, 8] + enc('bc')
  with pytest.raises(UserError, match="role 'robot'.*system, user, assistant"):
    tok.apply_chat_template([{'role': 'robot', 'content': 'hi'}])


def test_sentencepiece_keeps_code_whitespace(toks):
  code = 'class A:\n\n    def f(self):\n\t\treturn  [1,  2]   \n'
  for kind in ('sentencepiece', 'unigram'):
    assert toks[kind].decode(toks[kind].encode(code)) == code


def test_sentencepiece_training_is_quiet_and_deterministic(capfd):
  first = tokenizers.train_tokenizer(_config('sentencepiece'), TEXTS)
  again = tokenizers.train_tokenizer(_config('sentencepiece'), TEXTS)
  assert capfd.readouterr() == ('', '')
  assert first.encode(TEXTS[2]) == again.encode(TEXTS[2])


def test_training_sample_respects_budget_and_keeps_newlines():
  texts = ['a\n' * 3000, 'bb\n' * 100]
  chunks = tokenizers._sample_chunks(texts, 5000)
  assert 4000 < sum(map(len, chunks)) <= 5000
  assert chunks == tokenizers._sample_chunks(texts, 5000)
  assert all(len(c) <= 4096 and c.count('\n') > 1 for c in chunks)
  assert ''.join(tokenizers._sample_chunks(TEXTS, 10**9)) == ''.join(TEXTS)
  tok = tokenizers.train_tokenizer(_config('sentencepiece'), TEXTS)
  assert tok.encode('\n') == [tok.token_to_id('\n')]  # Learnt, not bytes.


def test_sentencepiece_path_loads_a_model(toks, tmp_path):
  toks['sentencepiece'].save(str(tmp_path))
  cfg = _config('sentencepiece', path=str(tmp_path / 'tokenizer.model'))
  tok = tokenizers.train_tokenizer(cfg, [])
  assert tok.encode(TEXTS[1]) == toks['sentencepiece'].encode(TEXTS[1])


def test_foreign_sentencepiece_ids_are_renumbered(tmp_path):
  prefix = str(tmp_path / 'foreign')
  spm.SentencePieceTrainer.train(  # Default ids: unk 0, bos 1, eos 2, no pad.
      sentence_iterator=iter(TEXTS), model_prefix=prefix, vocab_size=120,
      control_symbols=['<mask>'], minloglevel=2)
  tok = tokenizers.train_tokenizer(
      _config('sentencepiece', path=prefix + '.model'), [])
  sp = spm.SentencePieceProcessor(model_file=prefix + '.model')
  assert tok.vocab_size == 10 + sp.vocab_size() - 4  # unk, bos, eos, <mask>.
  assert tok.token_to_id('<s>') == tok.bos_id
  ids = tok.encode('the fox')
  assert min(ids) >= 10
  assert [tok.id_to_token(i) for i in ids] == sp.encode('the fox', out_type=str)
  assert tok.decode(ids + [tok.eos_id]) == 'the fox'


@pytest.mark.parametrize('kind,texts,overrides,words', [
    ('char', [], {}, 'no characters'),
    ('word', ['', ''], {}, 'no characters'),
    ('word', [' \n '], {}, 'no words'),
    ('byte', 'hello', {}, 'one str .* expected a list of texts'),
    ('char', TEXTS, {'vocab_size': 10}, 'set vocab_size >= 11'),
    ('word', TEXTS, {'vocab_size': 12}, 'set vocab_size >= 13'),
    ('sentencepiece', TEXTS, {'vocab_size': 9}, 'set vocab_size >= 11'),
    ('bpe', TEXTS, {}, 'expected one of char, word, byte, sentencepiece'),
    ('sentencepiece', TEXTS, {'model_type': 'wp'}, "'bpe' or 'unigram'"),
    ('sentencepiece', TEXTS, {'vocab_size': 300}, r'too small.*>= \d+'),
    ('unigram', TEXTS, {'vocab_size': 5000}, r'too large.*vocab_size <= \d+'),
    ('sentencepiece', TEXTS, {'path': '/no/such.model'}, 'No SentencePiece'),
])
def test_bad_training_input_raises_user_error(kind, texts, overrides, words):
  cfg = tokenizers.default_config()
  cfg.kind = kind
  if kind == 'unigram':
    cfg.kind, cfg.model_type = 'sentencepiece', 'unigram'
  cfg.update(overrides)
  with pytest.raises(UserError, match=words):
    tokenizers.train_tokenizer(cfg, texts)


def test_not_a_model_file_raises_user_error(tmp_path):
  for name, data in (('empty.model', b''), ('junk.model', b'\x00junk\xff')):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(UserError, match='is not a SentencePiece model'):
      tokenizers.train_tokenizer(_config('sentencepiece', path=str(path)), [])


def test_bad_ids_and_directories_raise_user_error(toks, tmp_path):
  with pytest.raises(UserError, match=r'Id 266 .*\(vocab_size 266\)'):
    toks['byte'].decode([10, 266])
  with pytest.raises(UserError, match='Id -1'):
    toks['char'].id_to_token(-1)
  with pytest.raises(UserError, match='1-D sequence of ints'):
    toks['char'].decode([[10, 11]])
  with pytest.raises(UserError, match='tokenizer.json is missing'):
    tokenizers.load_tokenizer(str(tmp_path / 'nowhere'))
  with pytest.raises(UserError, match='length=0'):
    toks['char'].encode_batch(['a'], 0)
  with pytest.raises(UserError, match='content of type int'):
    toks['char'].apply_chat_template([{'role': 'user', 'content': 3}])


def test_report_lists_rates_and_tokens(toks):
  for tok in toks.values():
    report = tokenizers.tokenizer_report(tok, TEXTS[0], top=5)
    for words in (f'kind: {tok.kind}', 'vocab size', 'tokens per character',
                  'tokens per byte', 'most frequent tokens', 'longest tokens'):
      assert words in report
  assert "'fox'" in tokenizers.tokenizer_report(toks['word'], TEXTS[0])


def test_default_config_keys():
  cfg = tokenizers.default_config()
  assert (cfg.kind, cfg.vocab_size, cfg.model_type, cfg.byte_fallback,
          cfg.path, cfg.max_train_chars) == ('char', 4096, 'bpe', True, '',
                                             3_000_000)
  assert cfg.character_coverage == pytest.approx(0.9995)
