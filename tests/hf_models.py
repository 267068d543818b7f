"""Tiny Hugging Face models of each supported architecture, made by `transformers` itself.

Every model is 2 layers of width 64 over a vocabulary of 1000 ids, with random weights (norm
scales and biases too, so that they matter) and a tokenizer trained here with the `tokenizers`
library (byte-level BPE, or a SentencePiece-like Metaspace BPE with byte fallback for Mistral),
saved with transformers' save_pretrained: the files a user would download, in miniature.
"""

import functools
import os

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ARCHS = ('gpt2', 'llama', 'mistral', 'qwen2', 'qwen3')
VOCAB = 1000

# Chat templates in the styles of the real models' (written for these tests).
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
CHATML_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")
INST_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.system = m['content'] + '\n\n' %}"
    "{% elif m['role'] == 'user' %}[INST] {{ ns.system }}{{ m['content'] }} [/INST]"
    "{% set ns.system = '' %}{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}{% endfor %}")

# (special tokens, {bos, eos, unk, pad}_token, chat template) per tokenizer style.
STYLES = {
    'gpt2': (['<|endoftext|>'], dict(bos_token='<|endoftext|>', eos_token='<|endoftext|>',
                                     unk_token='<|endoftext|>'), None),
    'llama': (['<|begin_of_text|>', '<|end_of_text|>', '<|start_header_id|>',
               '<|end_header_id|>', '<|eot_id|>'],
              dict(bos_token='<|begin_of_text|>', eos_token='<|eot_id|>'), LLAMA3_TEMPLATE),
    'mistral': (['<unk>', '<s>', '</s>'], dict(bos_token='<s>', eos_token='</s>',
                                             unk_token='<unk>'), INST_TEMPLATE),
    'qwen2': (['<|endoftext|>', '<|im_start|>', '<|im_end|>'],
              dict(eos_token='<|im_end|>', pad_token='<|endoftext|>'), CHATML_TEMPLATE),
}
STYLES['qwen3'] = STYLES['qwen2']


def training_text() -> list[str]:
  """Some of the standard library's sources (code and prose), and a line of Chinese."""
  root = os.path.dirname(os.__file__)
  texts = [open(os.path.join(root, n), encoding='utf-8').read()[:20000]
           for n in ('textwrap.py', 'json/decoder.py', 'shlex.py')]
  return texts + ['这是一个测试。我们训练一个很小的分词器。'] * 20


def train_tokenizer(arch: str, vocab_size: int = 900) -> Tokenizer:
  specials = STYLES[arch][0]
  if arch == 'mistral':
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token='<unk>'))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback(),
                                     decoders.Fuse()])
    alphabet = [f'<0x{b:02X}>' for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials + alphabet,
                                  limit_alphabet=100)
  else:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(training_text(), trainer)
  return tok


def hf_config(arch: str, **overrides) -> transformers.PretrainedConfig:
  """A tiny config of `arch`; `overrides` replace its fields."""
  common = dict(vocab_size=VOCAB, tie_word_embeddings=arch in ('gpt2', 'qwen3'))
  if arch == 'gpt2':
    return transformers.GPT2Config(**{**dict(n_positions=128, n_embd=64, n_layer=2, n_head=4,
                                             bos_token_id=0, eos_token_id=0, **common),
                                      **overrides})
  llama_like = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    rms_norm_eps=1e-5, **common)
  llama_like.update(overrides)
  if arch == 'llama':  # Llama 3.1's RoPE scaling, shrunk so that it changes these frequencies.
    return transformers.LlamaConfig(rope_parameters=dict(
        rope_type='llama3', rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=64), **llama_like)
  if arch == 'mistral':
    return transformers.MistralConfig(**{'sliding_window': 4096, **llama_like})
  if arch == 'qwen2':
    return transformers.Qwen2Config(rope_parameters=dict(rope_type='default',
                                                         rope_theta=1000000.0), **llama_like)
  return transformers.Qwen3Config(head_dim=32, **llama_like)


def make_model(arch: str, directory: str, seed: int = 0, dtype: torch.dtype = torch.float32,
               config: dict | None = None, **save_kwargs) -> str:
  """Writes a tiny random `arch` model (its weights in `dtype`; `config` replaces fields of its
  config) and its tokenizer into `directory` (save_pretrained)."""
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(hf_config(arch, **(config or {}))).eval()
  with torch.no_grad():
    for p in model.parameters():  # Norm scales off 1, biases off 0: every parameter counts.
      p.add_(0.05 * torch.randn_like(p))
  model.to(dtype).save_pretrained(directory, **save_kwargs)
  save_tokenizer(arch, directory)
  return directory


@functools.cache
def _trained(arch: str) -> str:
  return train_tokenizer(arch).to_str()


def save_tokenizer(arch: str, directory: str) -> None:
  """Saves the tokenizer, then loads it as transformers' class for `arch` would (Qwen2's brings
  its own NFC normaliser and pre-tokeniser) and saves that: the files transformers itself
  writes for such a model."""
  _, names, template = STYLES[arch]
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_trained(arch)),
                                              **names)
  if template:
    fast.chat_template = template
  fast.save_pretrained(directory)
  transformers.AutoTokenizer.from_pretrained(directory).save_pretrained(directory)
