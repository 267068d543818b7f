"""Import speed of a Hugging Face checkpoint against the time to read its files.

Writes a synthetic 1.1B-parameter bfloat16 Llama (16 layers, d_model 2048, 32 heads, 8 key/value
heads, FFN 8192, vocabulary 32000, untied; random weights) as 1 GiB safetensors shards with an
index and config.json, then times, each after the one before (so with the files in the page
cache, as on a second run):

  read files       every shard read as bytes (the floor)
  read tensors     every tensor read through safetensors (numpy, bfloat16)
  load (first device)  hf.load_params onto the first device: float32
  load (mesh)      hf.load_params into the run's shardings on all devices (mesh.data=-1)
  load (bfloat16)  the first again with model.param_dtype=bfloat16 (no cast)

  python bench/hf_import.py [--dir=/tmp/hf_1b] [--keep]
"""

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import ml_dtypes
import numpy as np
from flax import traverse_util
from safetensors import safe_open

from research import config as config_lib
from research import hf
from research import perf
from research.nn.transformer import DecoderLM, init_decoder
from research.train import loop

KEYS = dict(num_layers=16, d_model=2048, num_heads=32, num_kv_heads=8, ffn_size=8192,
            pos_encoding='rope', norm='rmsnorm', ffn='swiglu', tie_embeddings=False,
            max_len=4096, rope_base=500000.0, dtype='float32')
VOCAB = 32000


def write_checkpoint(directory: str, cfg) -> int:
  """Random bfloat16 tensors under their Llama names, in 1 GiB shards; returns the bytes."""
  abstract = jax.eval_shape(lambda k: init_decoder(DecoderLM(cfg), k), jax.random.key(0))
  rng = np.random.default_rng(0)
  tensors = {}
  for path, tensors_of in hf.tensor_map(cfg, abstract, 'llama').items():
    shape = traverse_util.flatten_dict(abstract)[path].shape
    for t in tensors_of:
      tensors[t.name] = (0.02 * rng.standard_normal(hf.checkpoint_shape(t, shape), np.float32)
                         ).astype(ml_dtypes.bfloat16)
  os.makedirs(directory, exist_ok=True)
  hf.write_safetensors(directory, tensors, 2**30)
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(hf.hf_config(cfg, 'llama', {'bos_token_id': 1, 'eos_token_id': 2}), f)
  return sum(x.nbytes for x in tensors.values())


def timed(fn):
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dir', default='/tmp/hf_1b')
  parser.add_argument('--keep', action='store_true', help='keep the checkpoint afterwards')
  args = parser.parse_args()
  perf.tune_cpu_runtime()  # As launch.py does.
  config = config_lib.default_config()
  config.model.update(KEYS)
  cfg = config_lib.model_config(config, VOCAB)
  shutil.rmtree(args.dir, ignore_errors=True)
  nbytes, write_s = timed(lambda: write_checkpoint(args.dir, cfg))
  files = sorted(f for f in os.listdir(args.dir) if f.endswith('.safetensors'))

  def read_files():
    for f in files:
      with open(os.path.join(args.dir, f), 'rb') as fh:
        while fh.read(64 << 20):
          pass

  def read_tensors():
    for f in files:
      with safe_open(os.path.join(args.dir, f), 'np') as st:
        for name in st.keys():
          st.get_tensor(name)

  abstract = jax.eval_shape(lambda k: init_decoder(DecoderLM(cfg), k), jax.random.key(0))
  shardings = loop.param_shardings(config, abstract)
  rows = [('read files', timed(read_files)[1]), ('read tensors', timed(read_tensors)[1])]
  host, seconds = timed(lambda: hf.load_params(args.dir, cfg))
  rows.append(('load (first device, float32)', seconds))
  params = sum(x.size for x in jax.tree.leaves(host))
  del host
  on_devices, seconds = timed(lambda: jax.block_until_ready(
      hf.load_params(args.dir, cfg, shardings)))
  rows.append((f'load (mesh of {len(jax.devices())} {jax.default_backend()}, float32)', seconds))
  del on_devices
  half = config_lib.model_config(config, VOCAB)
  half = dataclasses.replace(half, param_dtype='bfloat16')
  rows.append(('load (first device, bfloat16)',
               timed(lambda: jax.block_until_ready(hf.load_params(args.dir, half)))[1]))
  print(f'checkpoint: {params / 1e9:.2f}B parameters, {nbytes / 2**30:.2f} GiB bfloat16 in '
        f'{len(files)} shards (written in {write_s:.1f} s)\n')
  print(f'| {"step":<34} | {"seconds":>8} | {"GiB/s of file":>13} | {"x read files":>12} |')
  print(f'|{"-" * 36}|{"-" * 10}|{"-" * 15}|{"-" * 14}|')
  for name, seconds in rows:
    print(f'| {name:<34} | {seconds:8.2f} | {nbytes / 2**30 / seconds:13.2f} | '
          f'{seconds / rows[0][1]:12.1f} |')
  if not args.keep:
    shutil.rmtree(args.dir)


if __name__ == '__main__':
  main()
