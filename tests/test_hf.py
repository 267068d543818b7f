"""Hugging Face interop, checked against transformers and tokenizers themselves: imported logits
and greedy generations, export round trips (after LoRA fine-tuning too), tokenizer and chat
template ids, sharded loading onto a mesh, and the one-line errors of bad checkpoints.

The tiny models are made by transformers in the test (tests/hf_models.py): no download."""

import functools
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tokenizers as hf_tokenizers
import torch
import transformers

from research import config as config_lib
from research import decoding, hf, tokenizers
from research.errors import UserError
from research.nn.config import ModelConfig
from research.nn.transformer import DecoderLM, init_decoder
from research import runs
from tests import hf_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
  """arch -> a tiny model directory of that architecture (made once per module)."""
  root = tmp_path_factory.mktemp('hf')
  return functools.cache(lambda arch: hf_models.make_model(arch, str(root / arch)))


def padded_batch(vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(ids, mask, positions) [2, 12]; the second row is left-padded by 4."""
  ids = np.random.default_rng(0).integers(0, vocab, (2, 12))
  mask = np.ones_like(ids)
  mask[1, :4] = 0
  return ids, mask, np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def torch_logits(model, ids, mask, positions) -> np.ndarray:
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(positions)).logits.float().numpy()


def our_logits(model: DecoderLM, params, ids, mask, positions) -> np.ndarray:
  logits, _ = model.apply({'params': params}, jnp.asarray(ids), jnp.asarray(positions),
                          jnp.asarray(mask))
  return np.asarray(logits)


def greedy_both(model: DecoderLM, params, tok, ref) -> tuple[list[int], list[int]]:
  """32 greedy tokens after a prompt: (ours through the KV-cache decoder, transformers'
  `generate`'s), each up to its EOS."""
  prompt = tok.encode('def parse(text):\n    return', add_bos=True)
  sampling = ml_collections.ConfigDict(dict(strategy='greedy', max_new_tokens=32, temperature=1.0,
                                            top_k=0, top_p=1.0, num_beams=1, length_penalty=1.0))
  ours = decoding.generate(model, params, tok, [prompt], sampling, jax.random.key(0))[0]
  with torch.no_grad():
    out = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                       max_new_tokens=32, do_sample=False, eos_token_id=tok.eos_id,
                       pad_token_id=tok.pad_id)[0, len(prompt):].tolist()
  return list(ours), out[:out.index(tok.eos_id)] if tok.eos_id in out else out


@pytest.mark.parametrize('arch', hf_models.ARCHS)
def test_imported_logits_equal_transformers(hf_dir, arch):
  """float32 logits of a padded batch within 1e-4 of transformers' (at the real tokens)."""
  _, tok, model, params = runs.load_trained('hf:' + hf_dir(arch))
  ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir(arch)).eval()
  ids, mask, positions = padded_batch(tok.vocab_size)
  want = torch_logits(ref, ids, mask, positions)
  got = our_logits(model, params, ids, mask, positions)
  assert np.abs(want).max() > 0.5  # Logits that would show a wrong bias or norm.
  np.testing.assert_allclose(got[mask > 0], want[mask > 0], atol=1e-4, rtol=0)


@pytest.mark.parametrize('arch', hf_models.ARCHS)
def test_greedy_generation_equals_transformers(hf_dir, arch):
  """32 greedy tokens through our KV-cache decoder equal transformers' generate."""
  _, tok, model, params = runs.load_trained('hf:' + hf_dir(arch))
  ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir(arch)).eval()
  ours, theirs = greedy_both(model, params, tok, ref)
  assert len(ours) >= 8 and ours == theirs


def test_sliding_window_equals_transformers(tmp_path):
  """Mistral with a 4-token window: padded-batch logits, and 32 greedy tokens through the KV
  cache (the window slides past the prompt), equal transformers'."""
  directory = hf_models.make_model('mistral', str(tmp_path / 'window'),
                                   config={'sliding_window': 4})
  _, tok, model, params = runs.load_trained('hf:' + directory)
  assert model.cfg.sliding_window == 4
  ref = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
  ids, mask, positions = padded_batch(tok.vocab_size)
  np.testing.assert_allclose(our_logits(model, params, ids, mask, positions)[mask > 0],
                             torch_logits(ref, ids, mask, positions)[mask > 0], atol=1e-4)
  ours, theirs = greedy_both(model, params, tok, ref)
  assert len(ours) >= 8 and ours == theirs


@pytest.mark.parametrize('arch', hf_models.ARCHS)
def test_import_export_round_trip(hf_dir, arch, tmp_path):
  """Imported, exported (Llama's in shards with an index) and loaded by transformers: the same
  logits and tokenizer ids."""
  _, tok, model, params = runs.load_trained('hf:' + hf_dir(arch))
  out = str(tmp_path / 'export')
  shard_bytes = 300_000 if arch == 'llama' else 2**30
  assert hf.save(out, model.cfg, params, tok, max_shard_bytes=shard_bytes) == arch
  assert os.path.exists(os.path.join(out, hf.INDEX)) == (arch == 'llama')
  ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir(arch)).eval()
  back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  ids, mask, positions = padded_batch(tok.vocab_size)
  np.testing.assert_allclose(torch_logits(back, ids, mask, positions)[mask > 0],
                             torch_logits(ref, ids, mask, positions)[mask > 0], atol=1e-6)
  text = 'héllo wörld, 你好 <|im_end|>\n\tdef f(): pass'
  assert (transformers.AutoTokenizer.from_pretrained(out).encode(text, add_special_tokens=False)
          == transformers.AutoTokenizer.from_pretrained(hf_dir(arch)).encode(
              text, add_special_tokens=False))


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints_load(tmp_path, dtype):
  """bfloat16 and float16 files load, as the float32 weights rounded to that type."""
  half = hf_models.make_model('qwen2', str(tmp_path / 'half'), dtype=dtype)
  full = hf_models.make_model('qwen2', str(tmp_path / 'full'))
  _, _, _, got = runs.load_trained('hf:' + half)
  _, _, _, want = runs.load_trained('hf:' + full)
  to_half = {torch.bfloat16: jnp.bfloat16, torch.float16: jnp.float16}[dtype]
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == np.float32
    np.testing.assert_array_equal(g, np.asarray(jnp.asarray(w).astype(to_half), np.float32))


def test_export_refuses_an_existing_directory_and_leaves_it(hf_dir, tmp_path):
  _, tok, model, params = runs.load_trained('hf:' + hf_dir('llama'))
  (tmp_path / 'keep.txt').write_text('mine')
  with pytest.raises(UserError, match='exists'):
    hf.save(str(tmp_path), model.cfg, params, tok)
  assert os.listdir(tmp_path) == ['keep.txt']


@pytest.mark.parametrize('kind', ['gpt2', 'llama'])
def test_own_model_exports(tmp_path, kind):
  """A model of this project's own (bias-free GPT-2 style with a char tokenizer; Llama style
  with GQA and a byte tokenizer) exported: transformers computes the same logits and tokenizes
  (and renders chats) to the same ids."""
  text = 'def f(x):\n    return x + 1  # héllo 你好 🙂\n'
  if kind == 'gpt2':
    tok = tokenizers.train_tokenizer(tokenizers.default_config(), [text * 3])
    cfg = ModelConfig(vocab_size=tok.vocab_size, num_layers=2, num_heads=2, d_model=32,
                      max_len=64)
  else:
    tok = tokenizers.ByteTokenizer()
    cfg = ModelConfig(vocab_size=tok.vocab_size, num_layers=2, num_heads=4, num_kv_heads=2,
                      d_model=32, max_len=64, pos_encoding='rope', norm='rmsnorm', ffn='swiglu',
                      tie_embeddings=False)
  model = DecoderLM(cfg)
  params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape),
                        init_decoder(model, jax.random.key(0)))
  out = str(tmp_path / 'export')
  assert hf.save(out, cfg, params, tok) == kind
  back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  ids, mask, positions = padded_batch(tok.vocab_size)
  np.testing.assert_allclose(torch_logits(back, ids, mask, positions)[mask > 0],
                             our_logits(model, params, ids, mask, positions)[mask > 0], atol=1e-4)
  theirs = transformers.AutoTokenizer.from_pretrained(out)
  assert theirs.encode(text, add_special_tokens=False) == tok.encode(text)
  assert theirs.decode(tok.encode(text)) == text
  chat = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi 你好'},
          {'role': 'assistant', 'content': 'Hello.'}, {'role': 'user', 'content': 'x+1?'}]
  assert hf_chat_ids(theirs, chat, True) == tok.apply_chat_template(chat, True)


def hf_chat_ids(fast, chat, generation_prompt: bool) -> list[int]:
  """transformers' apply_chat_template ids (it returns a BatchEncoding)."""
  return list(fast.apply_chat_template(chat, add_generation_prompt=generation_prompt,
                                       return_dict=True)['input_ids'])


def mixed_strings(n: int, seed: int = 0) -> list[str]:
  """`n` strings mixing English, Chinese, code with odd whitespace, emoji and look-alikes of
  special tokens (and real ones)."""
  pools = [['the', 'quick', 'Brown', 'fox', "don't", 'naïve', 'café', 'A.I.', '3.14', '2026'],
           ['你好', '世界', '分词器', '测试。', '很小的'],
           ['def f(x):\n', '\treturn x\n', '    if a  and b:', '{"k": [1, 2]}', '\r\n', '  \n\n',
            'x+=1;', '#!/usr/bin/env'],
           ['🙂', '🚀🚀', '👍🏽', '∑', '—'],
           ['<|endoftext|>', '<|im_end|>', '< |im_start|>', '<|eot_id', '</s>', '<s>', '<unk>',
            '[INST]', '<|begin_of_text|>', '<mask>']]
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    parts = [pools[rng.integers(len(pools))][rng.integers(5)] for _ in range(rng.integers(1, 9))]
    out.append(''.join(p + ' ' * int(rng.integers(0, 3)) for p in parts))
  return out


@pytest.mark.parametrize('arch', ['gpt2', 'mistral', 'qwen2'])
def test_hf_tokenizer_ids_equal_tokenizers_and_transformers(hf_dir, arch):
  """Byte-level BPE (GPT-2, Qwen) and Metaspace BPE with byte fallback (Mistral): the ids of
  1,000 mixed strings equal the tokenizers library's and transformers'; decoding agrees."""
  tok = tokenizers.load_tokenizer(hf_dir(arch))
  assert tok.kind == 'hf'
  lib = hf_tokenizers.Tokenizer.from_file(os.path.join(hf_dir(arch), 'tokenizer.json'))
  fast = transformers.AutoTokenizer.from_pretrained(hf_dir(arch))
  for text in mixed_strings(1000):
    ids = tok.encode(text)
    assert ids == lib.encode(text, add_special_tokens=False).ids, text
    assert ids == fast.encode(text, add_special_tokens=False), text
    assert tok.decode(ids) == fast.decode(ids, skip_special_tokens=True), text
  corpus = mixed_strings(50, seed=1)
  np.testing.assert_array_equal(
      tok.encode_corpus(corpus), [i for t in corpus for i in tok.encode(t) + [tok.eos_id]])


CONVERSATIONS = [
    [{'role': 'user', 'content': 'What is 2+3?'}],
    [{'role': 'system', 'content': 'Answer with a number.'},
     {'role': 'user', 'content': 'What is 2+3?'}],
    [{'role': 'user', 'content': 'Sort: 3 1 2'}, {'role': 'assistant', 'content': '1 2 3'},
     {'role': 'user', 'content': ' And 9 7?  '}],
    [{'role': 'system', 'content': '你好 🙂'}, {'role': 'user', 'content': 'a\n\tb'},
     {'role': 'assistant', 'content': 'c <|im_end|>'}, {'role': 'user', 'content': 'd'},
     {'role': 'assistant', 'content': 'e'}],
]


@pytest.mark.parametrize('arch', ['llama', 'mistral', 'qwen2'])
def test_chat_template_ids_equal_transformers(hf_dir, arch):
  """Multi-turn conversations with and without a system message, with and without the
  generation prompt: the ids equal transformers' apply_chat_template."""
  tok = tokenizers.load_tokenizer(hf_dir(arch))
  fast = transformers.AutoTokenizer.from_pretrained(hf_dir(arch))
  for chat in CONVERSATIONS:
    for generation_prompt in (False, True):
      assert (tok.apply_chat_template(chat, generation_prompt)
              == hf_chat_ids(fast, chat, generation_prompt)), (chat, arch)


def test_chat_template_errors_are_one_line(hf_dir):
  tok = tokenizers.load_tokenizer(hf_dir('mistral'))
  with pytest.raises(UserError, match='unknown role tool'):
    tok.apply_chat_template([{'role': 'tool', 'content': 'x'}])


SHARDED_CHECK = r'''
import json, sys
import jax, numpy as np
from research import config as config_lib, hf
from research.nn.transformer import DecoderLM, init_decoder
from research.train import loop
from research import tokenizers
directory = sys.argv[1]
config = config_lib.default_config()
config.train.init_from = 'hf:' + directory
config.mesh.update(data=1, fsdp=8)
config = config_lib.with_imported_model(config)
tok = tokenizers.load_tokenizer(directory)
cfg = config_lib.model_config(config, tok.vocab_size)
abstract = jax.eval_shape(lambda k: init_decoder(DecoderLM(cfg), k), jax.random.key(0))
shardings = loop.param_shardings(config, abstract)
reads = []
read = hf.Checkpoint.read
def counted(self, name, index):
  x = read(self, name, index)
  reads.append((name, x.nbytes))
  return x
hf.Checkpoint.read = counted
sharded = hf.load_params(directory, cfg, shardings)
largest_read = max(n for _, n in reads)
whole = hf.load_params(directory, cfg)
leaves = []
for (path, x), s, w in zip(jax.tree_util.tree_leaves_with_path(sharded),
                           jax.tree.leaves(shardings), jax.tree.leaves(whole)):
  leaves.append(dict(path=jax.tree_util.keystr(path), same_sharding=x.sharding == s,
                     spec=str(s.spec), devices=len(x.devices()), nbytes=int(x.nbytes),
                     per_device=[int(sh.data.nbytes) for sh in x.addressable_shards],
                     equal=bool(np.array_equal(np.asarray(x), w))))
print(json.dumps({'leaves': leaves, 'largest_read': largest_read}))
'''


def test_sharded_checkpoint_loads_onto_an_fsdp_mesh(tmp_path):
  """An index + 3 shards loads onto 8 devices (mesh.fsdp=8): every leaf arrives with the run's
  sharding, each device holding its slice only (per-device bytes), and no read is larger than
  one device's slice of the largest parameter: nothing is assembled whole on the host."""
  directory = hf_models.make_model('llama', str(tmp_path / 'sharded'), max_shard_size='300KB')
  with open(os.path.join(directory, hf.INDEX)) as f:
    assert len(set(json.load(f)['weight_map'].values())) == 3
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', SHARDED_CHECK, directory], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  sharded = 0
  for leaf in report['leaves']:
    assert leaf['same_sharding'] and leaf['equal'] and leaf['devices'] == 8, leaf
    if 'fsdp' in leaf['spec']:
      sharded += 1
      assert leaf['per_device'] == [leaf['nbytes'] // 8] * 8, leaf
  assert sharded >= 10  # Embedding, unembedding and every projection kernel.
  largest = max(leaf['nbytes'] for leaf in report['leaves'])
  assert report['largest_read'] <= largest // 8


def broken_copy(src: str, dst: str) -> str:
  shutil.copytree(src, dst)
  return dst


def edit_config(directory: str, **changes) -> None:
  path = os.path.join(directory, 'config.json')
  with open(path) as f:
    config = json.load(f)
  config.update(changes)
  with open(path, 'w') as f:
    json.dump(config, f)


def test_bad_checkpoints_are_refused_in_one_line(hf_dir, tmp_path):
  # A missing file of the index.
  sharded = hf_models.make_model('qwen2', str(tmp_path / 'sharded'), max_shard_size='300KB')
  with open(os.path.join(sharded, hf.INDEX)) as f:
    missing = sorted(set(json.load(f)['weight_map'].values()))[1]
  os.remove(os.path.join(sharded, missing))
  with pytest.raises(UserError, match=f'lists {missing}, which is missing'):
    runs.load_trained('hf:' + sharded)
  # A shape that does not match config.json.
  wrong = broken_copy(hf_dir('llama'), str(tmp_path / 'shape'))
  edit_config(wrong, intermediate_size=96)
  with pytest.raises(UserError, match=r'mlp\.\w+_proj\.weight .* has shape .* but config.json '
                     'implies'):
    runs.load_trained('hf:' + wrong)
  # An unsupported architecture, and a supported one with maths not implemented here.
  other = broken_copy(hf_dir('llama'), str(tmp_path / 'other'))
  edit_config(other, model_type='falcon', architectures=['FalconForCausalLM'])
  with pytest.raises(UserError, match="architecture 'falcon'.*not supported"):
    runs.load_trained('hf:' + other)
  yarn = broken_copy(hf_dir('llama'), str(tmp_path / 'yarn'))
  edit_config(yarn, rope_parameters={'rope_type': 'yarn', 'rope_theta': 1e4, 'factor': 4.0})
  with pytest.raises(UserError, match="rope type 'yarn' is not supported"):
    runs.load_trained('hf:' + yarn)
  # A tokenizer.json with more ids than the embedding has rows.
  small = broken_copy(hf_dir('gpt2'), str(tmp_path / 'small'))
  edit_config(small, vocab_size=500)
  with pytest.raises(UserError, match='the tokenizer has 900 ids but the embedding '
                     'model.vocab_size=500 rows'):
    runs.load_trained('hf:' + small)
  # On the command line: one line on stderr, exit status 2, no traceback.
  proc = subprocess.run([sys.executable, 'launch.py', '--experiment=sft_lora_small',
                         f'--config.train.init_from=hf:{other}',
                         f'--workdir={tmp_path / "run"}'], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith('error: ') and 'falcon' in proc.stderr
  assert not os.path.exists(tmp_path / 'run')


def test_sft_lora_from_hf_then_export(hf_dir, tmp_path):
  """The README's three commands on a tiny Qwen2: SFT with LoRA from hf:DIR (20 steps), export,
  and transformers' logits of the export equal ours of the merged model within 1e-4."""
  workdir, out = str(tmp_path / 'run'), str(tmp_path / 'export')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  common = [sys.executable, 'launch.py', '--experiment=sft_lora_small', f'--workdir={workdir}']
  train = subprocess.run(common + [
      f'--config.train.init_from=hf:{hf_dir("qwen2")}', '--config.train.steps=20',
      '--config.train.batch_size=4', '--config.train.seq_len=64', '--config.train.log_every=10',
      '--config.train.eval_every=20', '--config.train.eval_batches=1',
      '--config.train.checkpoint_every=20', '--config.sft.num_train=200',
      '--config.sft.num_held_out=4', '--config.sft.max_new_tokens=4'],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
  assert train.returncode == 0, train.stderr[-3000:]
  export = subprocess.run(common + ['--mode=export_hf', f'--out={out}'], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)
  assert export.returncode == 0, export.stderr[-3000:]
  config, tok, model, merged = runs.load_trained(workdir)
  assert config.lora.rank > 0 and config.tokenizer.kind == 'hf'
  _, _, _, base = runs.load_trained('hf:' + hf_dir('qwen2'))
  moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(merged),
                                                         jax.tree.leaves(base)))
  assert moved > 1e-3  # The adapters learned something.
  back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  ids, mask, positions = padded_batch(tok.vocab_size)
  np.testing.assert_allclose(torch_logits(back, ids, mask, positions)[mask > 0],
                             our_logits(model, merged, ids, mask, positions)[mask > 0],
                             atol=1e-4)
  # The run's chat rows are the model's own chat template's ids.
  chat = CONVERSATIONS[2]
  assert tok.apply_chat_template(chat, True) == hf_chat_ids(
      transformers.AutoTokenizer.from_pretrained(out), chat, True)
  # And the export generates through --workdir=hf:DIR.
  gen = subprocess.run([sys.executable, 'launch.py', '--experiment=sft_lora_small',
                        '--mode=generate', f'--workdir=hf:{out}', '--prompt=def',
                        '--config.sampling.max_new_tokens=8'], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=env)
  assert gen.returncode == 0, gen.stderr[-3000:]


def test_with_imported_model_sets_model_and_tokenizer_keys(hf_dir):
  config = config_lib.default_config()
  config.train.init_from = 'hf:' + hf_dir('qwen3')
  config.model.update(remat='full', dropout=0.1)
  config = config_lib.with_imported_model(config)
  m = config.model
  assert (m.qk_norm, m.head_size, m.rope_base, m.norm_eps, m.qkv_bias, m.tie_embeddings) == (
      True, 32, 10000.0, 1e-5, False, True)
  assert config.model.remat == 'full' and config.model.dropout == 0.1  # How to compute: kept.
  assert config.tokenizer.kind == 'hf' and config.model.vocab_size == hf_models.VOCAB
  config_lib.validate(config)


@pytest.mark.slow
def test_every_stage_starts_from_hf(hf_dir, tmp_path):
  """Pretraining continuation, reward model, DPO and PPO (with that reward model) start from
  hf:DIR; chat and analyze_embeddings read a run made from one, and hf:DIR itself."""
  model = f'hf:{hf_dir("qwen2")}'
  small = ['--config.train.steps=4', '--config.train.batch_size=4', '--config.train.seq_len=128',
           '--config.train.log_every=2', '--config.train.eval_every=4',
           '--config.train.eval_batches=1', '--config.train.checkpoint_every=4',
           '--config.sft.num_held_out=4', '--config.sft.max_new_tokens=4',
           '--config.reward.num_train=64', '--config.reward.num_held_out=8',
           '--config.reward.normalise_samples=8', '--config.reward.policy_pairs=0',
           '--config.sampling.max_new_tokens=8']
  runs = {'pretrain_small': [f'--config.train.init_from={model}'],
          'reward_small': [f'--config.train.init_from={model}'],
          'dpo_small': [f'--config.train.init_from={model}'],
          'ppo_small': [f'--config.train.init_from={model}', '--config.ppo.minibatch_size=4',
                        '--config.ppo.max_new_tokens=4',
                        f'--config.ppo.reward_from={tmp_path / "reward_small"}']}
  env = dict(os.environ, JAX_PLATFORMS='cpu')

  def launch(*args, stdin=None):
    proc = subprocess.run([sys.executable, 'launch.py', *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=env, input=stdin)
    assert proc.returncode == 0, (args, proc.stderr[-3000:])
    return proc.stdout

  for name, args in runs.items():
    launch(f'--experiment={name}', f'--workdir={tmp_path / name}', *small, *args)
    with open(tmp_path / name / 'summary.json') as f:
      assert json.load(f)['finished'], name
  assert launch('--experiment=ppo_small', f'--workdir={tmp_path / "ppo_small"}', '--mode=chat',
                '--config.sampling.max_new_tokens=4', stdin='hello\n').strip()
  assert 'def:' in launch('--experiment=ppo_small', f'--workdir={model}',
                          '--mode=analyze_embeddings', '--words=def')
