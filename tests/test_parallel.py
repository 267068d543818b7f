"""Sharded training on 8 emulated CPU devices and across 2 processes equals 1 device.

Each run is a fresh subprocess (tests/parallel_worker.py) so that it can set its own device
count through XLA_FLAGS before jax is imported.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, 'tests', 'parallel_worker.py')


def run_worker(*args, devices=1, wait=True):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  proc = subprocess.Popen([sys.executable, WORKER, *args], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  return finish(proc) if wait else proc


def finish(proc):
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  return json.loads(out.strip().splitlines()[-1])


def greedy_text(workdir):
  with open(os.path.join(workdir, 'samples.txt')) as f:
    return f.read().split('\n', 1)[1][:-1]


def max_diff(a, b):
  assert a['losses'].keys() == b['losses'].keys()
  return max(abs(a['losses'][k] - b['losses'][k]) for k in a['losses'])


@pytest.fixture(scope='module')
def single(tiny_corpus, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('single'))
  return run_worker('train', tiny_corpus, workdir, '{}'), workdir


@pytest.fixture(scope='module')
def fsdp(tiny_corpus, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('fsdp'))
  return run_worker('train', tiny_corpus, workdir, '{"fsdp": 8}', devices=8), workdir


@pytest.mark.parametrize('mesh', [{'data': 8}, {'tensor': 8}, {'data': 2, 'tensor': 4},
                                  {'data': 2, 'fsdp': 2, 'tensor': 2}])
def test_losses_match_one_device(mesh, single, tiny_corpus, tmp_path):
  sharded = run_worker('train', tiny_corpus, str(tmp_path), json.dumps(mesh), devices=8)
  assert sharded['devices'] == 8
  assert max_diff(sharded, single[0]) < 1e-4


MOE = {'moe_every': 1, 'num_experts': 4, 'moe_top_k': 2}


def test_expert_parallel_matches_one_device(tiny_corpus, tmp_path):
  single = run_worker('train', tiny_corpus, str(tmp_path / 'one'), json.dumps({'model': MOE}))
  sharded = run_worker('train', tiny_corpus, str(tmp_path / 'eight'),
                       json.dumps({'data': 2, 'expert': 4, 'model': MOE}), devices=8)
  assert max_diff(sharded, single) < 1e-4
  assert sharded['ffn_spec'].startswith("P('expert'")
  assert sharded['ffn_bytes_per_device'] * 4 == sharded['ffn_bytes']


def test_fsdp_matches_and_shards_parameters(fsdp, single):
  result, _ = fsdp
  assert max_diff(result, single[0]) < 1e-4
  assert result['ffn_spec'] == "P('fsdp', 'tensor')"
  assert result['ffn_bytes_per_device'] * 8 == result['ffn_bytes']


def test_fsdp_checkpoint_restores_on_one_device_with_the_same_greedy_text(fsdp):
  _, workdir = fsdp
  restored = run_worker('sample', workdir, devices=1)
  assert 'def ' + restored['sample'] == greedy_text(workdir)


def test_two_processes_match_one_and_restore_in_one(single, tiny_corpus, tmp_path):
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  workdir = str(tmp_path)
  procs = [run_worker('train', tiny_corpus, workdir, '{"data": -1}', f'localhost:{port}', '2',
                      str(pid), devices=4, wait=False) for pid in range(2)]
  results = [finish(p) for p in procs]
  assert all(r['processes'] == 2 and r['devices'] == 8 for r in results)
  assert max_diff(results[0], single[0]) < 1e-4
  restored = run_worker('sample', workdir, devices=1)
  assert 'def ' + restored['sample'] == greedy_text(workdir)
  np.testing.assert_allclose(results[0]['eval'], single[0]['eval'], atol=1e-4)
