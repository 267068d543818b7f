"""Dense vs Mixture-of-Experts at equal active parameters and equal steps, over seeds.

  python bench/moe_vs_dense.py                    # pretrain_moe_small and its dense twin, seeds 0,1
  python bench/moe_vs_dense.py --steps=20 --root=/tmp/smoke

The MoE run is experiments/pretrain_moe_small.py as it stands. Its dense twin is the same config
with moe_every=0 and ffn_multiplier = moe_top_k * ffn_multiplier: each token then passes through
as many FFN weights as in the MoE (which runs top_k experts of ffn_multiplier width). Every run
trains in its own workdir under --root (a rerun resumes or reuses it) through
research.train.pretrain.train; the table reads each workdir's metrics.jsonl.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from experiments import pretrain_moe_small
from research import config as config_lib
from research.metrics import read_jsonl
from research.nn.transformer import DecoderLM
from research.train import pretrain


def dense_twin(config):
  """The dense config with the MoE config's active parameters."""
  dense = config.copy_and_resolve_references()
  m = config.model
  dense.model.update(moe_every=0, ffn_multiplier=m.moe_top_k * m.ffn_multiplier)
  return dense


def param_counts(config, vocab_size: int) -> tuple[int, int]:
  """(all parameters, parameters a token passes through): experts count top_k / num_experts."""
  model = DecoderLM(config_lib.model_config(config, vocab_size))
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))['params']
  total = active = 0
  for path, leaf in traverse_util.flatten_dict(shapes).items():
    n = int(np.prod(leaf.shape))
    total += n
    active += n * config.model.moe_top_k // config.model.num_experts if 'experts' in path else n
  return total, active


def summarize(workdir: str) -> dict:
  """Last eval loss/accuracy and the extreme routing figures over the MoE layers."""
  records = read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  ev = [r for r in records if 'eval/loss' in r][-1]
  train = [r for r in records if 'train/loss' in r][-1]
  frac = lambda suffix: [v for k, v in train.items() if k.endswith(suffix)]
  return {'eval_loss': ev['eval/loss'], 'eval_accuracy': ev['eval/accuracy'],
          'frac_min': min(frac('/expert_frac_min'), default=np.nan),
          'frac_max': max(frac('/expert_frac_max'), default=np.nan),
          'dropped': max(frac('/dropped_frac'), default=np.nan)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--root', default='runs/moe_vs_dense', help='one workdir per run under it')
  parser.add_argument('--seeds', default='0,1')
  parser.add_argument('--steps', type=int, default=0, help='override train.steps (0 = keep)')
  args = parser.parse_args()
  moe = pretrain_moe_small.get_config()
  if args.steps:
    moe.train.steps = args.steps
  rows = []
  for name, base in (('moe', moe), ('dense', dense_twin(moe))):
    for seed in map(int, args.seeds.split(',')):
      config = base.copy_and_resolve_references()
      config.seed = seed
      workdir = os.path.join(args.root, f'{name}_seed{seed}')
      config_lib.validate(config)
      config_lib.save_to_workdir(config, workdir)
      t0 = time.perf_counter()
      pretrain.train(config, workdir)
      minutes = (time.perf_counter() - t0) / 60
      with open(os.path.join(workdir, 'data', 'stats.json')) as f:
        vocab = json.load(f)['vocab_size']
      rows.append(dict(name=name, seed=seed, minutes=minutes, **summarize(workdir),
                       **dict(zip(('params', 'active'), param_counts(config, vocab)))))

  m = moe.model.num_experts
  print(f'\n{moe.train.steps} steps; balanced = every expert of every MoE layer within '
        f'[1/(4M), 4/M] = [{1 / (4 * m):.3f}, {4 / m:.3f}] of the tokens (last logged interval)')
  print(f'{"run":8} {"seed":>4} {"params":>10} {"active":>10} {"eval loss":>9} {"eval acc":>8} '
        f'{"frac min":>8} {"frac max":>8} {"dropped":>7} {"minutes":>7}')
  for r in rows:
    print(f'{r["name"]:8} {r["seed"]:>4} {r["params"]:>10,} {r["active"]:>10,} '
          f'{r["eval_loss"]:>9.4f} {r["eval_accuracy"]:>8.4f} {r["frac_min"]:>8.3f} '
          f'{r["frac_max"]:>8.3f} {r["dropped"]:>7.3f} {r["minutes"]:>7.1f}')
  for name in ('moe', 'dense'):
    losses = [r['eval_loss'] for r in rows if r['name'] == name]
    print(f'{name:8} mean eval loss {np.mean(losses):.4f} (seeds {args.seeds}, '
          f'spread {np.ptp(losses):.4f})')


if __name__ == '__main__':
  main()
