"""Runs one tiny training (or greedy sample) for tests/test_parallel.py in a fresh process.

  python tests/parallel_worker.py train CORPUS WORKDIR '{"fsdp": 8, "model": {...}}' [COORD NPROC PID]
  python tests/parallel_worker.py sample WORKDIR

Prints one JSON line: {"losses": {step: loss}, "sample": text, ...}. XLA_FLAGS (device count)
must be set by the caller, before jax is imported.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from research import config as config_lib  # pylint: disable=g-import-not-at-top
from research import decoding, parallel, perf
from research.metrics import read_jsonl
from research.train import pretrain
from research import runs
from tests.conftest import tiny_config


def greedy(workdir: str) -> str:
  config, tok, model, params = runs.load_trained(workdir)
  prompts, mask = decoding.left_pad([[tok.bos_id] + tok.encode('def ')], tok.pad_id)
  out = decoding.sample(model, params, prompts, mask, jax.random.key(0), max_new_tokens=12,
                        temperature=0.0, top_k=0, top_p=1.0, eos_id=tok.eos_id,
                        pad_id=tok.pad_id)
  return tok.decode(np.asarray(out[0]))


def main(argv: list[str]) -> None:
  if argv[1] == 'sample':
    print(json.dumps({'sample': greedy(argv[2])}))
    return
  corpus, workdir, mesh = argv[2], argv[3], json.loads(argv[4])
  if len(argv) > 5:
    parallel.initialize_distributed(argv[5], int(argv[6]), int(argv[7]))
  perf.tune_cpu_runtime()  # As launch.py does.
  config = tiny_config(corpus, steps=5, batch_size=8, eval_every=5, checkpoint_every=5)
  config.model.update(mesh.pop('model', {}))  # E.g. MoE settings for expert parallelism.
  config.mesh.update({**dict(data=1, fsdp=1, tensor=1, expert=1), **mesh})
  config.sampling.update(temperature=0.0, max_new_tokens=12)
  if jax.process_index() == 0:
    config_lib.save_to_workdir(config, workdir)
  result = pretrain.train(config, workdir)
  block = result.params['block_0']
  kernel = (block['moe']['experts'] if 'moe' in block else block['ffn'])['wi']['kernel']
  losses = {r['step']: r['train/loss'] for r in read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
            if 'train/loss' in r}
  print(json.dumps({
      'losses': losses, 'eval': result.metrics['eval/loss'],
      'devices': jax.device_count(), 'processes': jax.process_count(),
      'ffn_spec': str(kernel.sharding.spec),
      'ffn_bytes_per_device': kernel.addressable_shards[0].data.nbytes,
      'ffn_bytes': kernel.nbytes}))


if __name__ == '__main__':
  main(sys.argv)
