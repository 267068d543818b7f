"""Hugging Face checkpoints in and out: GPT-2, Llama (2, 3, 3.1+), Mistral, Qwen2/2.5 and Qwen3.

A model directory as `save_pretrained` writes it (config.json, model.safetensors or shards with
model.safetensors.index.json, tokenizer.json, tokenizer_config.json) is named `hf:DIR` wherever a
run is expected (train.init_from, --workdir of generate/chat/analyze_embeddings):

  model_keys(DIR)            -> the model.* config keys (a config field whose maths is not
                                implemented here is refused, naming it)
  load_params(DIR, cfg, s)   -> parameters, each read slice by slice from the safetensors files
                                straight into the shardings `s` (each process reads what its
                                devices hold); bfloat16 and float16 files load
  save(OUT, cfg, params, tok) -> a directory transformers loads (--mode=export_hf)

Parameter names: ours per layer 'block_i/attn/query/kernel' [d_model, heads * head_dim] is
torch's 'model.layers.i.self_attn.q_proj.weight' [heads * head_dim, d_model] transposed (GPT-2's
Conv1D weights are stored [in, out], and its c_attn holds query, key and value side by side).
"""

import dataclasses
import functools
import json
import os
import shutil
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from research.errors import UserError
from research.nn.config import ModelConfig
from research.nn.transformer import DecoderLM, SCANNED, init_decoder, to_layout

PREFIX = 'hf:'
ARCHITECTURES = {'gpt2': 'GPT2LMHeadModel', 'llama': 'LlamaForCausalLM',
                 'mistral': 'MistralForCausalLM', 'qwen2': 'Qwen2ForCausalLM',
                 'qwen3': 'Qwen3ForCausalLM'}
GPT2_ACTIVATIONS = {'gelu_new': 'gelu', 'gelu_pytorch_tanh': 'gelu', 'gelu': 'gelu_exact',
                    'relu': 'relu'}
# Checkpoint entries that are not parameters (buffers older transformers saved).
IGNORED_SUFFIXES = ('.attn.bias', '.attn.masked_bias', 'rotary_emb.inv_freq')
INDEX = 'model.safetensors.index.json'
SINGLE = 'model.safetensors'


def is_hf(path: str) -> bool:
  """Whether a run path names a Hugging Face model directory ('hf:DIR')."""
  return path.startswith(PREFIX)


def hf_dir(path: str) -> str:
  """DIR of 'hf:DIR'."""
  return path[len(PREFIX):]


def read_config(directory: str) -> dict:
  """config.json of a supported architecture."""
  path = os.path.join(directory, 'config.json')
  if not os.path.isfile(path):
    raise UserError(f'hf:{directory} has no config.json; give a directory as transformers\' '
                    'save_pretrained writes it.')
  with open(path) as f:
    config = json.load(f)
  model_type = config.get('model_type')
  if model_type not in ARCHITECTURES:
    names = ', '.join(config.get('architectures') or [])
    raise UserError(f'{path}: architecture {model_type!r} ({names}) is not supported; supported '
                    f'model_type: {", ".join(ARCHITECTURES)}.')
  return config


def _rope_keys(config: dict, where: str) -> dict:
  """model.rope_* keys of a config.json's rope_parameters (transformers 5) or rope_theta +
  rope_scaling (earlier files)."""
  rope = dict(config.get('rope_parameters') or config.get('rope_scaling') or {})
  kind = rope.get('rope_type', rope.get('type', 'default'))
  if kind not in ('default', 'linear', 'llama3'):
    raise UserError(f'{where}: rope type {kind!r} is not supported (default, linear, llama3 are).')
  if rope.get('partial_rotary_factor', config.get('partial_rotary_factor', 1.0)) != 1.0:
    raise UserError(f'{where}: partial_rotary_factor is not supported (RoPE over whole heads).')
  keys = {'rope_base': float(rope.get('rope_theta', config.get('rope_theta', 10000.0))),
          'rope_scaling': {'default': 'none'}.get(kind, kind)}
  if kind != 'default':
    keys['rope_factor'] = float(rope['factor'])
  if kind == 'llama3':
    keys.update(rope_low_freq_factor=float(rope['low_freq_factor']),
                rope_high_freq_factor=float(rope['high_freq_factor']),
                rope_original_max_len=int(rope['original_max_position_embeddings']))
  return keys


def model_keys(directory: str) -> dict[str, Any]:
  """The model.* config keys (vocab_size included: the embedding's rows) of hf:`directory`.
  Raises UserError naming the first config.json field whose maths is not implemented here."""
  c = read_config(directory)
  where = os.path.join(directory, 'config.json')

  def refuse_unless(key: str, ok: Callable[[Any], bool], default: Any) -> Any:
    value = c.get(key, default)
    if not ok(value):
      raise UserError(f'{where}: {key}={value!r} is not supported (it changes the maths); '
                      f'supported: {default!r}.')
    return value

  keys = dict(family='decoder', norm_position='pre', moe_every=0,
              vocab_size=c['vocab_size'])
  if c['model_type'] == 'gpt2':
    act = refuse_unless('activation_function', lambda v: v in GPT2_ACTIVATIONS, 'gelu_new')
    refuse_unless('scale_attn_weights', bool, True)
    refuse_unless('scale_attn_by_inverse_layer_idx', lambda v: not v, False)
    refuse_unless('add_cross_attention', lambda v: not v, False)
    d = c['n_embd']
    keys.update(pos_encoding='learned', norm='layernorm', ffn=GPT2_ACTIVATIONS[act],
                norm_eps=c.get('layer_norm_epsilon', 1e-5), num_layers=c['n_layer'],
                num_heads=c['n_head'], num_kv_heads=0, d_model=d, head_size=0,
                ffn_size=c.get('n_inner') or 4 * d, max_len=c.get('n_positions', 1024),
                qkv_bias=True, out_bias=True, ffn_bias=True, qk_norm=False, sliding_window=0,
                tie_embeddings=c.get('tie_word_embeddings', True))
    return keys
  refuse_unless('hidden_act', lambda v: v == 'silu', 'silu')
  refuse_unless('use_sliding_window', lambda v: not v, False)
  refuse_unless('layer_types', lambda v: v is None or set(v) == {'full_attention'}, None)
  d, heads = c['hidden_size'], c['num_attention_heads']
  head = c.get('head_dim') or d // heads
  bias = c.get('attention_bias', False)
  keys.update(pos_encoding='rope', norm='rmsnorm', ffn='swiglu',
              norm_eps=c.get('rms_norm_eps', 1e-6), num_layers=c['num_hidden_layers'],
              num_heads=heads, num_kv_heads=c.get('num_key_value_heads') or heads, d_model=d,
              head_size=0 if head * heads == d else head, ffn_size=c['intermediate_size'],
              max_len=c.get('max_position_embeddings', 2048),
              qkv_bias=bias or c['model_type'] == 'qwen2', out_bias=bias,
              ffn_bias=c.get('mlp_bias', False), qk_norm=c['model_type'] == 'qwen3',
              sliding_window=(c.get('sliding_window') or 0) if c['model_type'] == 'mistral' else 0,
              tie_embeddings=c.get('tie_word_embeddings', False), **_rope_keys(c, where))
  return keys


@dataclasses.dataclass(frozen=True)
class Tensor:
  """Where one of our parameters lies in a checkpoint: tensor `name`, transposed (torch Linear
  weights are [out, in]), and of a fused tensor the `part`-th of `parts` equal slices of its
  last axis (GPT-2's c_attn: query, key, value)."""
  name: str
  transpose: bool = False
  part: int = 0
  parts: int = 1


def _gpt2_names() -> tuple[dict, Callable[[int], dict]]:
  """(names outside the blocks, layer i -> the names in block i) of GPT-2."""
  top = {('embed', 'embedding'): Tensor('transformer.wte.weight'),
         ('pos_embed', 'embedding'): Tensor('transformer.wpe.weight'),
         ('ln_final', 'scale'): Tensor('transformer.ln_f.weight'),
         ('ln_final', 'bias'): Tensor('transformer.ln_f.bias')}

  def layer(i: int) -> dict:
    p = f'transformer.h.{i}.'
    names = {('ln_attn', 'scale'): Tensor(p + 'ln_1.weight'),
             ('ln_attn', 'bias'): Tensor(p + 'ln_1.bias'),
             ('ln_ffn', 'scale'): Tensor(p + 'ln_2.weight'),
             ('ln_ffn', 'bias'): Tensor(p + 'ln_2.bias')}
    for n, proj in enumerate(('query', 'key', 'value')):
      names[('attn', proj, 'kernel')] = Tensor(p + 'attn.c_attn.weight', part=n, parts=3)
      names[('attn', proj, 'bias')] = Tensor(p + 'attn.c_attn.bias', part=n, parts=3)
    for ours, theirs in (('attn', 'out'), 'attn.c_proj'), (('ffn', 'wi'), 'mlp.c_fc'), (
        ('ffn', 'wo'), 'mlp.c_proj'):
      names[ours + ('kernel',)] = Tensor(p + theirs + '.weight')
      names[ours + ('bias',)] = Tensor(p + theirs + '.bias')
    return names

  return top, layer


def _llama_names() -> tuple[dict, Callable[[int], dict]]:
  """(names outside the blocks, layer i -> the names in block i) of Llama, Mistral and Qwen."""
  top = {('embed', 'embedding'): Tensor('model.embed_tokens.weight'),
         ('ln_final', 'scale'): Tensor('model.norm.weight')}

  def layer(i: int) -> dict:
    p = f'model.layers.{i}.'
    names = {('ln_attn', 'scale'): Tensor(p + 'input_layernorm.weight'),
             ('ln_ffn', 'scale'): Tensor(p + 'post_attention_layernorm.weight'),
             ('attn', 'query_norm', 'scale'): Tensor(p + 'self_attn.q_norm.weight'),
             ('attn', 'key_norm', 'scale'): Tensor(p + 'self_attn.k_norm.weight')}
    for ours, theirs in ((('attn', 'query'), 'self_attn.q_proj'),
                         (('attn', 'key'), 'self_attn.k_proj'),
                         (('attn', 'value'), 'self_attn.v_proj'),
                         (('attn', 'out'), 'self_attn.o_proj'), (('ffn', 'wg'), 'mlp.gate_proj'),
                         (('ffn', 'wi'), 'mlp.up_proj'), (('ffn', 'wo'), 'mlp.down_proj')):
      names[ours + ('kernel',)] = Tensor(p + theirs + '.weight', transpose=True)
      names[ours + ('bias',)] = Tensor(p + theirs + '.bias')
    return names

  return top, layer


def tensor_map(cfg: ModelConfig, abstract: Any, model_type: str) -> dict[tuple, list[Tensor]]:
  """Our flat parameter path -> its checkpoint tensor per layer (one entry for parameters outside
  the blocks, num_layers for scanned blocks), for the parameters `abstract` holds."""
  top, layer = (_gpt2_names if model_type == 'gpt2' else _llama_names)()
  top[('unembed', 'kernel')] = Tensor('lm_head.weight', transpose=True)
  out = {}
  for path in traverse_util.flatten_dict(abstract):
    if path[0] == SCANNED:
      out[path] = [layer(i)[path[1:]] for i in range(cfg.num_layers)]
    elif path[0].startswith('block_'):
      out[path] = [layer(int(path[0][6:]))[path[1:]]]
    else:
      out[path] = [top[path]]
  return out


class Checkpoint:
  """The safetensors files of a model directory: one model.safetensors, or the shards its
  model.safetensors.index.json lists. Tensors are read by slices, never whole files."""

  def __init__(self, directory: str):
    self.directory = directory
    index = os.path.join(directory, INDEX)
    if os.path.isfile(index):
      with open(index) as f:
        self.files = json.load(f)['weight_map']
    elif os.path.isfile(os.path.join(directory, SINGLE)):
      with safe_open(os.path.join(directory, SINGLE), 'np') as f:
        self.files = {k: SINGLE for k in f.keys()}
    else:
      raise UserError(f'hf:{directory} has neither {SINGLE} nor {INDEX}; only safetensors '
                      'checkpoints load (convert .bin files with transformers\' save_pretrained).')
    for name in sorted(set(self.files.values())):
      if not os.path.isfile(os.path.join(directory, name)):
        raise UserError(f'{os.path.join(directory, INDEX)} lists {name}, which is missing from '
                        f'{directory}; download or copy it there.')
    self._open = {}

  def _file(self, name: str):
    file = self.files[name]
    if file not in self._open:
      self._open[file] = safe_open(os.path.join(self.directory, file), 'np')
    return self._open[file]

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._file(name).get_slice(name).get_shape())

  def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
    return self._file(name).get_slice(name)[index]


def checkpoint_shape(t: Tensor, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The checkpoint shape of tensor `t` that holds one of our parameters of `shape`."""
  shape = (*shape[:-1], shape[-1] * t.parts)
  return shape[::-1] if t.transpose else shape


def _read(ckpt: Checkpoint, t: Tensor, index: tuple[slice, ...],
          shape: tuple[int, ...]) -> np.ndarray:
  """Slices `index` of tensor `t` in its file layout, whose slice for our parameter has `shape`
  (ours, with the last two axes swapped when t.transpose)."""
  idx = [slice(*s.indices(n)) for s, n in zip(index, shape)]
  if t.parts > 1:
    offset = t.part * shape[-1]
    idx[-1] = slice(idx[-1].start + offset, idx[-1].stop + offset)
  return ckpt.read(t.name, tuple(idx))


def _swap_last(shape_or_spec: tuple) -> tuple:
  return (*shape_or_spec[:-2], shape_or_spec[-1], shape_or_spec[-2])


def _file_sharding(sharding: jax.sharding.Sharding, ndim: int) -> jax.sharding.Sharding:
  """The sharding of a parameter's transpose (last two axes swapped) that `sharding` places."""
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return sharding  # Single-device or replicated: the same devices hold the whole.
  spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*_swap_last(spec)))


def load_params(directory: str, cfg: ModelConfig, shardings: Optional[Any] = None) -> Any:
  """The `DecoderLM(cfg)` parameters (cfg from `model_keys`) in the safetensors of `directory`,
  as cfg.param_dtype. Each array is assembled from the slices its devices hold
  (jax.make_array_from_callback) in the checkpoint's layout and dtype, then transposed and cast
  on the devices: no process reads more than its devices keep, and no parameter passes whole
  through the host. `shardings`: a pytree of jax.sharding.Sharding like the parameters; default:
  all on the first local device.

  Raises UserError for a tensor that is missing, has another shape than config.json implies, or
  is left over (a parameter this config does not have)."""
  model_type = read_config(directory)['model_type']
  ckpt = Checkpoint(directory)
  abstract = jax.eval_shape(lambda key: init_decoder(DecoderLM(cfg), key), jax.random.key(0))
  names = tensor_map(cfg, abstract, model_type)
  flat = traverse_util.flatten_dict(abstract)
  for path, tensors in names.items():
    shape = flat[path].shape[1:] if path[0] == SCANNED else flat[path].shape
    for t in tensors:
      if t.name not in ckpt.files:
        raise UserError(f'hf:{directory} has no tensor {t.name}, which config.json implies; the '
                        'checkpoint and its config.json disagree.')
      if ckpt.shape(t.name) != checkpoint_shape(t, shape):
        raise UserError(f'{t.name} in {ckpt.files[t.name]} has shape {ckpt.shape(t.name)}, but '
                        f'config.json implies {checkpoint_shape(t, shape)}; the checkpoint and its '
                        'config.json disagree.')
  used = {t.name for tensors in names.values() for t in tensors}
  if cfg.tie_embeddings:
    used.add('lm_head.weight')
  extra = sorted(n for n in ckpt.files if n not in used and not n.endswith(IGNORED_SUFFIXES))
  if extra:
    raise UserError(f'hf:{directory} holds {len(extra)} tensors this config.json does not explain, '
                    f'e.g. {extra[0]}; is config.json the checkpoint\'s own?')
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
  shard_flat = traverse_util.flatten_dict(shardings)
  dtype = jnp.dtype(cfg.param_dtype)
  out = {}
  for path, x in flat.items():
    tensors, transpose = names[path], names[path][0].transpose
    shape = _swap_last(x.shape) if transpose else x.shape

    def leaf(index, tensors=tensors, shape=shape, scanned=path[0] == SCANNED):
      if not scanned:
        return _read(ckpt, tensors[0], index, shape)
      layers = range(*index[0].indices(shape[0]))
      return np.stack([_read(ckpt, tensors[i], index[1:], shape[1:]) for i in layers])

    stored = jax.make_array_from_callback(
        shape, _file_sharding(shard_flat[path], len(shape)) if transpose else shard_flat[path],
        leaf)
    out[path] = _to_param(dtype, transpose, shard_flat[path])(stored)
  return traverse_util.unflatten_dict(out)


@functools.cache
def _to_param(dtype: Any, transpose: bool, sharding: jax.sharding.Sharding) -> Callable:
  """A jitted function: a checkpoint array as the parameter, cast to `dtype` (and transposed),
  placed as `sharding`."""
  return jax.jit(lambda x: (jnp.swapaxes(x, -1, -2) if transpose else x).astype(dtype),
                 out_shardings=sharding)


def _export_type(cfg: ModelConfig) -> str:
  """The Hugging Face model_type that computes what `cfg` computes, or a UserError."""
  def refuse(why: str):
    raise UserError(f'this model has no Hugging Face architecture: {why}. GPT-2 needs '
                    'model.pos_encoding=learned, norm=layernorm and a GELU or ReLU ffn; Llama, '
                    'Mistral and Qwen need pos_encoding=rope, norm=rmsnorm and ffn=swiglu.')
  if cfg.family != 'decoder' or cfg.moe_every or cfg.norm_position != 'pre':
    refuse(f'model.family={cfg.family}, moe_every={cfg.moe_every}, '
           f'norm_position={cfg.norm_position} (export takes dense pre-norm decoders)')
  if cfg.pos_encoding == 'learned' and cfg.norm == 'layernorm' and cfg.ffn != 'swiglu':
    if cfg.qk_norm or cfg.sliding_window or cfg.head_size not in (0, cfg.d_model // cfg.num_heads):
      refuse('GPT-2 has no qk_norm, sliding_window or head_size')
    if cfg.num_kv_heads not in (0, cfg.num_heads):
      refuse(f'GPT-2 has no grouped key/value heads (model.num_kv_heads={cfg.num_kv_heads})')
    return 'gpt2'
  if cfg.pos_encoding != 'rope' or cfg.norm != 'rmsnorm' or cfg.ffn != 'swiglu':
    refuse(f'model.pos_encoding={cfg.pos_encoding}, norm={cfg.norm}, ffn={cfg.ffn}')
  if cfg.qk_norm:
    model_type = 'qwen3'
  elif cfg.qkv_bias and not cfg.out_bias:
    model_type = 'qwen2'
  elif cfg.sliding_window:
    model_type = 'mistral'
  else:
    model_type = 'llama'
  if model_type != 'qwen2' and cfg.qkv_bias != cfg.out_bias:
    refuse('biases on the query/key/value and attention output projections differ')
  if cfg.sliding_window and model_type != 'mistral':
    refuse('model.sliding_window with qk_norm or query/key/value biases')
  if model_type == 'mistral' and cfg.qkv_bias:
    refuse('Mistral has no attention biases')
  if cfg.ffn_bias and model_type != 'llama':
    refuse(f'{model_type} has no feed-forward biases')
  return model_type


def hf_config(cfg: ModelConfig, model_type: str, special_ids: dict[str, Optional[int]]) -> dict:
  """config.json of `cfg` as `model_type`; special_ids: bos/eos/pad token ids (None allowed)."""
  common = dict(architectures=[ARCHITECTURES[model_type]], model_type=model_type,
                vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings,
                dtype=cfg.param_dtype, **special_ids)
  if model_type == 'gpt2':
    act = {v: k for k, v in reversed(GPT2_ACTIVATIONS.items())}[cfg.ffn]
    return dict(common, n_embd=cfg.d_model, n_layer=cfg.num_layers, n_head=cfg.num_heads,
                n_inner=cfg.ffn_dim, n_positions=cfg.max_len, layer_norm_epsilon=cfg.norm_eps,
                activation_function=act, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  rope = {'rope_type': {'none': 'default'}.get(cfg.rope_scaling, cfg.rope_scaling),
          'rope_theta': cfg.rope_base}
  if cfg.rope_scaling != 'none':
    rope['factor'] = cfg.rope_factor
  if cfg.rope_scaling == 'llama3':
    rope.update(low_freq_factor=cfg.rope_low_freq_factor,
                high_freq_factor=cfg.rope_high_freq_factor,
                original_max_position_embeddings=cfg.rope_original_max_len)
  out = dict(common, hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers,
             num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
             head_dim=cfg.head_dim, intermediate_size=cfg.ffn_dim, hidden_act='silu',
             max_position_embeddings=cfg.max_len, rms_norm_eps=cfg.norm_eps,
             rope_parameters=rope, attention_dropout=0.0)
  if model_type in ('llama', 'qwen3'):
    out['attention_bias'] = cfg.qkv_bias
  if model_type == 'llama':
    out['mlp_bias'] = cfg.ffn_bias
  if model_type == 'mistral':
    out['sliding_window'] = cfg.sliding_window
  if model_type in ('qwen2', 'qwen3'):
    out.update(use_sliding_window=False, sliding_window=None)
  return out


def checkpoint_tensors(cfg: ModelConfig, params: Any, model_type: str) -> dict[str, np.ndarray]:
  """The checkpoint tensors (name -> numpy array) of `params`; biases the model lacks but the
  architecture has (GPT-2's, for a bias-free model) are zeros, which compute the same."""
  params = jax.tree.map(np.asarray, to_layout(params, False))
  flat = traverse_util.flatten_dict(params)
  top, layer = (_gpt2_names if model_type == 'gpt2' else _llama_names)()
  wanted = dict(top)
  if not cfg.tie_embeddings:
    wanted[('unembed', 'kernel')] = Tensor('lm_head.weight', transpose=True)
  for i in range(cfg.num_layers):
    wanted.update({(f'block_{i}', *k): t for k, t in layer(i).items()})
  parts = {}
  for path, t in wanted.items():
    if path in flat:
      x = flat[path].T if t.transpose else flat[path]
    elif path[-1] == 'bias' and model_type == 'gpt2':
      kernel = flat[(*path[:-1], 'kernel')]
      x = np.zeros(kernel.shape[-1], kernel.dtype)
    else:
      continue  # A parameter of another variant (e.g. q_norm without model.qk_norm).
    parts.setdefault(t.name, {})[t.part] = x
  return {name: np.ascontiguousarray(np.concatenate([p[k] for k in sorted(p)], axis=-1))
          for name, p in parts.items()}


def write_safetensors(directory: str, tensors: dict[str, np.ndarray],
                      max_shard_bytes: int) -> None:
  """`tensors` as model.safetensors, or (above max_shard_bytes) as shards
  model-0000i-of-0000n.safetensors with their index, in order, as transformers writes them."""
  shards, size = [{}], 0
  for name, x in tensors.items():
    if size and size + x.nbytes > max_shard_bytes:
      shards, size = shards + [{}], 0
    shards[-1][name] = x
    size += x.nbytes
  if len(shards) == 1:
    save_file(shards[0], os.path.join(directory, SINGLE), metadata={'format': 'pt'})
    return
  weight_map = {}
  for n, shard in enumerate(shards, 1):
    file = f'model-{n:05d}-of-{len(shards):05d}.safetensors'
    save_file(shard, os.path.join(directory, file), metadata={'format': 'pt'})
    weight_map.update({name: file for name in shard})
  with open(os.path.join(directory, INDEX), 'w') as f:
    json.dump({'metadata': {'total_size': sum(x.nbytes for x in tensors.values())},
               'weight_map': weight_map}, f, indent=2)


def save(out: str, cfg: ModelConfig, params: Any, tok: Any,
         max_shard_bytes: int = 5 * 2**30) -> str:
  """Writes `params` of DecoderLM(cfg) and the tokenizer `tok` as a Hugging Face model
  directory `out` (config.json, generation_config.json, safetensors (sharded with an index
  above max_shard_bytes), tokenizer files): written in out + '.tmp', then renamed, and refused
  when `out` exists. Returns the model_type."""
  model_type = _export_type(cfg)
  if os.path.exists(out):
    raise UserError(f'--out={out} exists; give a new directory (nothing there is overwritten).')
  tmp = out.rstrip('/') + '.tmp'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    _write(tmp, cfg, params, tok, model_type, max_shard_bytes)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  os.replace(tmp, out)
  return model_type


def _write(tmp: str, cfg: ModelConfig, params: Any, tok: Any, model_type: str,
           max_shard_bytes: int) -> None:
  tok.save_hf(tmp)  # First: a tokenizer that cannot be written fails before the weights.
  special = {'bos_token_id': tok.bos_id, 'eos_token_id': tok.eos_id, 'pad_token_id': tok.pad_id}
  write_safetensors(tmp, checkpoint_tensors(cfg, params, model_type), max_shard_bytes)
  with open(os.path.join(tmp, 'config.json'), 'w') as f:
    json.dump(hf_config(cfg, model_type, special), f, indent=2)
  with open(os.path.join(tmp, 'generation_config.json'), 'w') as f:
    json.dump(special, f, indent=2)
