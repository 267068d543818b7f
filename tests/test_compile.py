"""Ahead-of-time compilation for TPU slices (research/compile.py), with libtpu on this CPU host.

libtpu is a test requirement (requirements-tpu.txt); without it these tests are skipped.
"""

import importlib
import importlib.util
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                                reason='needs libtpu: pip install -r requirements-tpu.txt')

from research import compile as compile_lib  # pylint: disable=g-import-not-at-top
from research.errors import UserError  # pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30


def tiny(experiment: str, **mesh):
  """The experiment's config with a 1-layer, 32-wide model and a 256-token vocabulary."""
  c = importlib.import_module(f'experiments.{experiment}').get_config()
  c.tokenizer.vocab_size = 256
  c.model.update(num_layers=1, num_heads=2, d_model=32)
  c.train.update(batch_size=8, grad_accum_steps=1)
  c.mesh.update(dict(dict(data=2, fsdp=2, tensor=1, expert=1), **mesh))
  return c


@pytest.mark.parametrize('experiment', ['pretrain_small', 'bert_mlm_small', 'seq2seq_small',
                                        'sft_small', 'sft_lora_small', 'reward_small',
                                        'dpo_small', 'ppo_small'])
def test_every_stage_compiles_for_a_tpu_slice(experiment):
  """Each stage's real train step (its loss, the optimiser, the mesh) compiles for 4 v5e chips
  on a data x fsdp mesh, and the report adds up."""
  c = tiny(experiment)
  if experiment == 'ppo_small':
    c.ppo.minibatch_size = 4
  r = compile_lib.compile_step(c, 'v5e-4')
  assert r.chips == 4 and r.device_kind == 'TPU v5 lite' and r.hbm == 16 * GIB
  assert r.fits and 0 < r.params < r.total and r.temporaries >= 0
  assert r.compiled_flops > 0 and r.model_flops > 0 and 0 < r.mfu <= 1
  if experiment == 'sft_lora_small':  # Adam's two moments are the adapters' size; the frozen
    assert r.params > 0.75 * r.opt_state  # base counts among the parameters too.
  assert 'v5e-4' in r.table() and 'collectives' in r.table()


def test_splash_attention_and_scanned_layers_compile_sharded_over_heads():
  """Sequences of 128 take the TPU splash kernel (shard_map over batch and heads) in scanned,
  rematerialised layers on a data x tensor mesh."""
  c = tiny('pretrain_small', data=2, fsdp=1, tensor=2)
  c.model.update(num_layers=2, num_heads=4, d_model=64, max_len=128, scan_layers=True,
                 remat='full', pos_encoding='rope')
  c.train.update(seq_len=128, loss_chunk=64)
  r = compile_lib.compile_step(c, 'v5e-4')
  assert r.fits and r.flops_counted == compile_lib.LOOPS_ONCE and '--count_flops' in r.table()


def test_activations_are_sharded_over_fsdp():
  """With the global batch fixed, 8 fsdp chips hold ~1/8 of one chip's temporaries."""
  def temporaries(topology, fsdp):
    c = tiny('pretrain_small', data=1, fsdp=fsdp)
    c.model.update(num_layers=2, num_heads=8, d_model=512, max_len=512)
    c.train.update(batch_size=64, seq_len=512)
    return compile_lib.compile_step(c, topology).temporaries

  one, eight = temporaries('v5e:1x1', 1), temporaries('v5e-8', 8)
  assert 1 / 10 < eight / one < 1 / 6, (one, eight)


def test_a_step_that_does_not_fit_is_one_line():
  c = tiny('pretrain_small', data=4, fsdp=1)
  c.model.update(num_layers=8, d_model=1024, num_heads=8, max_len=2048)
  c.train.update(batch_size=512, seq_len=2048)
  with pytest.raises(UserError) as e:
    compile_lib.compile_main(c, 'v5e-4')
  message = str(e.value)
  assert '\n' not in message and 'GiB' in message and 'remat' in message, message


@pytest.mark.parametrize('mesh, topology, match', [
    (dict(data=3), 'v5e-4', 'v5e-4 x 1: .*needs 3 devices but 4'),
    (dict(data=2), 'v5e-16', 'needs 2 devices but 16'),
    (dict(data=4), 'v5e-12', 'power of two'),
    (dict(data=4), 'v5p-5', 'counts TensorCores'),
    (dict(data=4), 'tpu-4', 'not a TPU slice name'),
])
def test_a_mesh_or_topology_that_does_not_match_is_refused(mesh, topology, match):
  c = tiny('pretrain_small', **dict(dict(fsdp=1), **mesh))
  with pytest.raises(UserError, match=match):
    compile_lib.compile_step(c, topology)


def test_slice_names_count_chips_as_cloud_tpu_does():
  assert compile_lib.topology_shape('v5e', 16) == '4x4'
  assert compile_lib.topology_shape('v5e', 8) == '2x4'
  assert compile_lib.topology_shape('v5p', 64) == '4x4x4'
  assert compile_lib.topology_shape('v4', 4) == '2x2x1'
  devices, chips = compile_lib.topology_devices('v5p-128')
  assert chips == 64 and len(devices) == 64 and devices[0].device_kind == 'TPU v5'


def test_without_libtpu_the_mode_says_how_to_install_it(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'libtpu' else real(name, *a))
  with pytest.raises(UserError, match='pip install -r requirements-tpu.txt'):
    compile_lib.topology_devices('v5e-4')


def test_compile_mode_from_the_command_line():
  out = subprocess.run(
      [sys.executable, 'launch.py', '--experiment=pretrain_small', '--mode=compile',
       '--topology=v5e-4', '--config.model.num_layers=1', '--config.train.batch_size=8'],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'compiled for v5e-4: 4 x TPU v5 lite' in out.stdout and '| total |' in out.stdout


def test_collectives_are_counted_from_the_hlo():
  hlo = ('%a = f32[16,768]{1,0} all-gather(%x)\n'
         '%b = (bf16[4,4]{1,0}, /*index=1*/bf16[8,4]{1,0}) all-gather-start(%y)\n'
         '%c = bf16[8]{0} all-reduce(%z), to_apply=%add\n')
  assert compile_lib.collectives(hlo) == {'all-gather': (2, 16 * 768 * 4 + 8 * 4 * 2),
                                          'all-reduce': (1, 16)}


@pytest.mark.slow
def test_gpt2_fsdp_keeps_data_parallel_activations_and_flops():
  """gpt2_124m on a v5e-16 with 8 sequences a chip: FSDP fits in 12 GB, its temporaries within
  1.2x and its FLOPs (counted over every loop trip) within 1.1x of data parallelism's."""
  c = importlib.import_module('experiments.gpt2_124m').get_config()
  fsdp = compile_lib.compile_step(c, 'v5e-16', count_flops=True)
  c.mesh.update(data=16, fsdp=1)
  data = compile_lib.compile_step(c, 'v5e-16', count_flops=True)
  assert fsdp.total <= 12e9
  assert fsdp.temporaries <= 1.2 * data.temporaries
  assert fsdp.compiled_flops <= 1.1 * data.compiled_flops
  assert fsdp.total <= 1.3 * fsdp.floor


def test_multislice_runs_data_parallelism_across_slices():
  """Two v5e-4 slices: `data` spans the slices (each data index on one slice), fsdp stays within;
  a `data` that the slices do not divide is one line."""
  from research import parallel  # pylint: disable=g-import-not-at-top
  c = tiny('pretrain_small', data=2, fsdp=4)
  devices, chips = compile_lib.topology_devices('v5e-4', num_slices=2)
  mesh = parallel.make_mesh(c.mesh, devices)
  assert chips == 8 and mesh.shape['data'] == 2
  for i in range(2):
    assert {d.slice_index for d in mesh.devices[i].flat} == {i}
  assert compile_lib.compile_step(c, 'v5e-4', num_slices=2).fits
  c.mesh.update(data=1, fsdp=8)
  with pytest.raises(UserError, match='multiple of 2'):
    compile_lib.compile_step(c, 'v5e-4', num_slices=2)
