"""SFT: answer-only loss weights, packing, LoRA, init_from, and one clear error per bad input."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from research import tokenizers
from research.config import default_config
from research.data import sft as sft_data
from research.data import synthetic
from research.errors import UserError
from research.nn import lora
from research.nn.config import ModelConfig
from research.nn.transformer import DecoderLM
from research.train import pretrain, sft
from research import runs
from research.data import preferences
from tests.conftest import tiny_config

TARGETS = default_config().lora.targets


@pytest.fixture(scope='module')
def tok():
  return tokenizers.train_tokenizer(default_config().tokenizer,
                                    ['What is 0123456789 plus minus? abcdefghijklmnopqrstuvwxyz.'])


def tiny_model(**kw):
  cfg = ModelConfig(vocab_size=80, num_layers=2, num_heads=2, d_model=32, max_len=64, **kw)
  model = DecoderLM(cfg)
  return model, model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']


def conversation(prompt, answer):
  return sft_data.Record('test', [{'role': 'user', 'content': prompt},
                                  {'role': 'assistant', 'content': answer}])


def test_only_answer_tokens_carry_weight(tok):
  e = sft_data.encode(tok, conversation('What is 2 plus 3?', '5'))
  prompt = tok.apply_chat_template([{'role': 'user', 'content': 'What is 2 plus 3?'}],
                                   add_generation_prompt=True)
  assert list(e.tokens[:len(prompt)]) == prompt
  assert list(e.tokens[len(prompt):]) == tok.encode('5') + [tok.eos_id]
  assert e.weights.tolist() == [0.0] * len(prompt) + [1.0] * 2
  multi = sft_data.encode(tok, sft_data.Record('t', [
      {'role': 'system', 'content': 'be brief'}, {'role': 'user', 'content': 'a'},
      {'role': 'assistant', 'content': 'bc'}, {'role': 'user', 'content': 'd'},
      {'role': 'assistant', 'content': 'e'}]))
  answers = [t for t, w in zip(multi.tokens, multi.weights) if w]
  assert answers == tok.encode('bc') + [tok.eos_id] + tok.encode('e') + [tok.eos_id]
  text = sft_data.encode(tok, sft_data.Record('t', None, 'abc'))
  assert text.weights.all()
  rows = sft_data.make_rows([e], 24, True, tok.pad_id)
  weighted = rows['targets'][rows['weights'] > 0].tolist()
  assert weighted == tok.encode('5') + [tok.eos_id]


def per_example_losses(model, params, rows):
  """The mean weighted loss of every example (row by row, segment by segment)."""
  logits, _ = model.apply({'params': params}, rows['inputs'], rows['positions'],
                          rows['segment_ids'])
  losses = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, rows['targets']))
  out = []
  for r, segments in enumerate(rows['segment_ids']):
    for s in range(1, segments.max() + 1):
      w = rows['weights'][r] * (segments == s)
      out.append(float((losses[r] * w).sum() / w.sum()))
  return out


@pytest.mark.parametrize('pos_encoding', ['learned', 'rope'])
def test_packed_loss_equals_unpacked(tok, pos_encoding):
  model, params = tiny_model(pos_encoding=pos_encoding)
  examples = [sft_data.encode(tok, conversation(p.prompt, p.answer))
              for p in synthetic.problems('train', 6, seed=0)]
  packed = sft_data.make_rows(examples, 64, True, tok.pad_id)
  padded = sft_data.make_rows(examples, 64, False, tok.pad_id)
  assert len(packed['inputs']) < len(padded['inputs']) == len(examples)
  np.testing.assert_allclose(per_example_losses(model, params, packed),
                             per_example_losses(model, params, padded), rtol=1e-5)


def test_no_attention_across_packed_examples(tok):
  """Changing the first packed example changes none of the logits of the others."""
  model, params = tiny_model(pos_encoding='rope')
  a, b, c = [sft_data.encode(tok, conversation(p, '1')) for p in ('ab', 'cde', 'fg')]
  other = sft_data.Example(np.where(a.tokens > 9, a.tokens + 1, a.tokens), a.weights)
  rows = [sft_data.make_rows(x, 32, True, tok.pad_id) for x in ([a, b, c], [other, b, c])]
  logits = [model.apply({'params': params}, r['inputs'], r['positions'], r['segment_ids'])[0]
            for r in rows]
  segments = rows[0]['segment_ids'][0]
  assert segments.max() == 3
  first, rest = segments == 1, segments > 1  # Padding (segment 0) is never a target.
  assert not np.allclose(logits[0][:, first], logits[1][:, first])
  np.testing.assert_array_equal(logits[0][:, rest], logits[1][:, rest])


def test_lora_zero_b_reproduces_base_logits():
  model, params = tiny_model()
  adapters = lora.init(jax.random.key(1), params, 4, TARGETS)
  assert len(traverse_util.flatten_dict(adapters)) == 2 * 2 * (4 + 2)  # a, b x layers x kernels
  tokens = jnp.arange(16).reshape(2, 8)
  base, _ = model.apply({'params': params}, tokens)
  merged, _ = model.apply({'params': lora.merge(params, adapters, 16.0, 4)}, tokens)
  np.testing.assert_array_equal(base, merged)
  with pytest.raises(UserError, match='match no parameter'):
    lora.init(jax.random.key(1), params, 4, (r'attn/qkv$',))


def test_merged_lora_equals_unmerged():
  """Every merged weight computes what the base layer plus the low-rank path x a b * scale does,
  so the merged (exported) model is the adapted one."""
  _, params = tiny_model()
  adapters = jax.tree.map(lambda x: x + 0.05, lora.init(jax.random.key(1), params, 4, TARGETS))
  merged = traverse_util.flatten_dict(lora.merge(params, adapters, 16.0, 4))
  ab = traverse_util.flatten_dict(adapters)
  for path, w in traverse_util.flatten_dict(params).items():
    if path + ('a',) not in ab:
      np.testing.assert_array_equal(merged[path], w)
      continue
    x = jax.random.normal(jax.random.key(2), (5, w.shape[0]))
    unmerged = x @ w + (16.0 / 4) * (x @ ab[path + ('a',)]) @ ab[path + ('b',)]
    assert not np.allclose(unmerged, x @ w, atol=1e-3)
    np.testing.assert_allclose(x @ merged[path], unmerged, rtol=1e-5, atol=1e-5)


def sft_config(corpus, **sft_keys):
  c = tiny_config(corpus, steps=4, seq_len=64, batch_size=8, eval_every=4, checkpoint_every=4)
  c.stage = 'sft'
  c.model.max_len = 128
  c.sft.update(dict(dict(num_train=64, num_held_out=20, max_new_tokens=4), **sft_keys))
  return c


@pytest.fixture(scope='module')
def pretrained(tiny_corpus, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('pre'))
  c = tiny_config(tiny_corpus, steps=2, seq_len=64)
  c.model.max_len = 128
  pretrain.train(c, workdir)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(c.to_json())
  return workdir


def test_lora_trains_only_adapters_from_init_from(tiny_corpus, pretrained, tmp_path):
  c = sft_config(tiny_corpus)
  c.train.init_from = pretrained
  c.lora.update(rank=2, alpha=4.0)
  c.train.learning_rate = 1e-2
  workdir = str(tmp_path)
  result = sft.train(c, workdir)
  flat = traverse_util.flatten_dict(result.params)
  assert all(k[-1] in ('a', 'b') for k in flat)  # The checkpointed state: adapters only.
  assert all(np.abs(v).max() > 0 for k, v in flat.items() if k[-1] == 'b')
  _, _, _, base = runs.load_trained(pretrained)
  _, _, _, tuned = runs.load_trained(workdir)  # Base + merged adapters.
  targeted = set(lora.target_paths(base, TARGETS))
  for path, w in traverse_util.flatten_dict(base).items():
    changed = not np.array_equal(w, traverse_util.flatten_dict(tuned)[path])
    assert changed == (path in targeted), path
  with open(os.path.join(workdir, 'exact_match.json')) as f:
    assert set(json.load(f)) == {'before', 'after'}


def write_jsonl(path, lines):
  path.write_text(''.join(l + '\n' for l in lines))
  return str(path)


@pytest.mark.parametrize('line, words', [
    ('{"prompt": "a", "completion": ', ['data.jsonl:2', 'not valid JSON']),
    ('{"prompt": "a"}', ['data.jsonl:2', '"completion"']),
    ('["text"]', ['data.jsonl:2', '"messages"']),
    ('{"messages": [{"role": "robot", "content": "x"}]}', ['data.jsonl:2', "'robot'", 'user']),
    ('{"messages": [{"role": "user", "content": "x"}]}', ['data.jsonl:2', 'no assistant']),
    ('{"messages": [{"role": "user"}]}', ['data.jsonl:2', 'content']),
])
def test_bad_jsonl_lines(tmp_path, line, words):
  path = write_jsonl(tmp_path / 'data.jsonl', ['{"prompt": "1+1", "completion": "2"}', line])
  with pytest.raises(UserError) as e:
    sft_data.read_jsonl(path)
  assert '\n' not in str(e.value)
  for w in words:
    assert w in str(e.value)


def test_jsonl_formats_and_overlong(tok, tmp_path):
  path = write_jsonl(tmp_path / 'd.jsonl', [
      '{"prompt": "1+1", "completion": "2"}', '',
      '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}',
      '{"text": "abcabc"}', json.dumps({'prompt': 'a' * 50, 'completion': 'b'})])
  records = sft_data.read_jsonl(path)
  assert [r.where.rsplit(':', 1)[1] for r in records] == ['1', '3', '4', '5']
  examples = [sft_data.encode(tok, r) for r in records]
  kept, report = sft_data.fit(examples, 20, 'truncate')
  assert (len(kept), report.truncated, report.skipped) == (3, 1, 1)  # Truncated to no answer.
  kept, report = sft_data.fit(examples, 20, 'skip')
  assert (len(kept), report.truncated, report.skipped) == (3, 0, 1)
  kept, report = sft_data.fit(examples, 60, 'skip')
  assert (len(kept), report.skipped) == (4, 0)


def test_bad_init_from(tiny_corpus, pretrained, tmp_path):
  c = sft_config(tiny_corpus)
  c.train.init_from = str(tmp_path / 'nothing')
  with pytest.raises(UserError, match='holds no run'):
    sft.train(c, str(tmp_path / 'a'))
  c.lora.rank = 4
  c.train.init_from = ''
  with pytest.raises(UserError, match='lora.rank=4 needs weights to adapt'):
    sft.train(c, str(tmp_path / 'c'))
  c.lora.rank = 0
  c.train.init_from = pretrained
  c.model.d_model = 64
  with pytest.raises(UserError, match='another architecture.*model.d_model: 32 there, 64 here'):
    sft.train(c, str(tmp_path / 'b'))


def test_synthetic_held_out_is_disjoint_and_checkable():
  train = {p.prompt for p in synthetic.problems('train', 2000, seed=0)}
  held_out = synthetic.problems('held_out', 100, seed=0)
  assert not train & {p.prompt for p in held_out}
  assert {p.kind for p in held_out} == set(synthetic.KINDS)
  assert all(synthetic.is_correct(f' {p.answer}\n', p) for p in held_out)
  assert synthetic.problems('held_out', 100, seed=0) == held_out


def test_jsonl_records_split_by_prompt_as_preference_pairs_do(tmp_path):
  """Two answers to one prompt fall on one side, and a preference pair lands on the side of
  the SFT records of its prompt (DPO scores the SFT held-out prompts after training on pairs)."""
  questions = [f'What is {i} plus {i}?' for i in range(300)]
  with open(tmp_path / 'sft.jsonl', 'w') as f:
    for q in questions:
      for answer in ('right', 'wrong'):
        f.write(json.dumps({'messages': [{'role': 'user', 'content': q},
                                         {'role': 'assistant', 'content': answer}]}) + '\n')
  with open(tmp_path / 'pairs.jsonl', 'w') as f:
    for q in questions:
      f.write(json.dumps({'prompt': q, 'chosen': 'right', 'rejected': 'wrong'}) + '\n')
  train, held = sft_data.split(sft_data.read_jsonl(str(tmp_path / 'sft.jsonl')), 0.2)
  held_questions = {r.messages[0]['content'] for r in held}
  assert not held_questions & {r.messages[0]['content'] for r in train}
  assert 0.1 < len(held_questions) / len(questions) < 0.3
  config = default_config()
  config.reward.update(path=str(tmp_path / 'pairs.jsonl'), held_out_fraction=0.2)
  _, held_pairs = preferences.load_pairs(config)
  assert {p.prompt[0]['content'] for p in held_pairs} == held_questions
