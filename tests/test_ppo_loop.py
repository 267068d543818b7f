"""PPO on the shared training loop: a SIGTERM mid-run saves and the rerun continues bit-exactly,
8 sharded devices (data=4 x fsdp=2) equal 1, and a divergence halts with the last good checkpoint
intact. A tiny SFT policy (trained here) answers sorting questions; the reward is the checker."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from research import checkpoint
from research import config as config_lib
from research import runs
from research.errors import UserError
from research.train import loop, ppo, stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ppo_config(sft_dir: str, **train) -> config_lib.ml_collections.ConfigDict:
  """PPO of the policy in `sft_dir` against the exact checker, a few tiny iterations."""
  c = runs.read_config(sft_dir)
  c.stage, c.earlier = 'ppo', {}
  c.train.update(dict(dict(steps=4, batch_size=8, learning_rate=1e-3, warmup_steps=1,
                           log_every=1, eval_every=2, checkpoint_every=2, init_from=sft_dir),
                      **train))
  c.ppo.update(reward='checker', epochs=2, minibatch_size=4, max_new_tokens=4, target_kl=1.0)
  return c


def flat(params) -> np.ndarray:
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(params)])


def test_ppo_resumes_bit_exactly_after_sigterm(sft_run, tmp_path, monkeypatch):
  """SIGTERM during iteration 2's rollout: the loop saves after it (its updates done), raises
  Interrupted; the rerun continues from there and ends with the uninterrupted run's weights,
  adaptive KL coefficient (checkpointed task state) and logged metrics."""
  whole = str(tmp_path / 'whole')
  expected = stages.train(ppo_config(sft_run), whole)
  rollout = ppo.Rollouts.__call__

  def signal_at_step_1(self, params, frozen, extra, step):
    if step == 1:
      os.kill(os.getpid(), signal.SIGTERM)  # Caught by loop.Preempted.
    return rollout(self, params, frozen, extra, step)

  stopped = str(tmp_path / 'stopped')
  monkeypatch.setattr(ppo.Rollouts, '__call__', signal_at_step_1)
  with pytest.raises(loop.Interrupted, match='SIGTERM after step 2'):
    stages.train(ppo_config(sft_run), stopped)
  monkeypatch.setattr(ppo.Rollouts, '__call__', rollout)
  resumed = stages.train(ppo_config(sft_run), stopped)
  np.testing.assert_array_equal(flat(resumed.params), flat(expected.params))
  rows = lambda d: [json.loads(line) for line in open(os.path.join(d, 'metrics.jsonl'))]
  keys = lambda d: {(r['step'], k): v for r in rows(d) for k, v in r.items()
                    if k.startswith(('train/loss', 'train/kl', 'train/beta', 'eval/'))}
  assert keys(stopped) == keys(whole)
  assert len({v for (s, k), v in keys(whole).items() if k == 'train/beta'}) > 1  # It adapted.
  _, _, _, policy = runs.load_trained(stopped)  # The exported policy: PPO's final weights.
  np.testing.assert_array_equal(flat(policy), flat(expected.params['policy']))


def test_ppo_nan_halts_with_the_last_good_checkpoint(sft_run, tmp_path, monkeypatch, capsys):
  """NaN advantages in iteration 3's rollout: the run halts in one line naming step 2, the last
  checkpoint (saved every step); nothing later was saved, and the run resumes from it."""
  rollout = ppo.Rollouts.__call__

  def nan_at_step_2(self, params, frozen, extra, step):
    out = rollout(self, params, frozen, extra, step)
    if step == 2:
      self.buffer['advantages'] = np.full_like(self.buffer['advantages'], np.nan)
    return out

  monkeypatch.setattr(ppo.Rollouts, '__call__', nan_at_step_2)
  workdir = str(tmp_path / 'run')
  with pytest.raises(UserError, match=r'the loss became nan at step 3: training diverged.*'
                                      r'--config.train.resume_step=2'):
    stages.train(ppo_config(sft_run, checkpoint_every=1), workdir)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'))
  assert ckpt.steps() == [1, 2]
  ckpt.close()
  monkeypatch.setattr(ppo.Rollouts, '__call__', rollout)
  result = stages.train(ppo_config(sft_run, checkpoint_every=1, resume_step=2), workdir)
  assert 'resumed from the checkpoint at step 2' in capsys.readouterr().out
  assert np.isfinite(flat(result.params)).all()


def test_ppo_on_8_devices_equals_1(sft_run, tmp_path):
  """One PPO iteration (rollout, 2 epochs x 2 minibatch updates) on data=4 x fsdp=2 emulated CPU
  devices gives the weights of the same iteration on 1 device, within 1e-5."""
  def worker(devices, mesh):
    workdir = str(tmp_path / f'd{devices}')
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
    code = ('import json, sys; from tests import test_ppo_loop as t; '
            't.ppo_worker(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))')
    proc = subprocess.run([sys.executable, '-c', code, sft_run, workdir, json.dumps(mesh)],
                          cwd=ROOT, env=env, text=True, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.load(os.path.join(workdir, 'policy.npy'))
  one = worker(1, {})
  eight = worker(8, {'data': 4, 'fsdp': 2})
  np.testing.assert_allclose(eight, one, atol=1e-5, rtol=0)
  assert np.abs(one).max() > 0


def ppo_worker(sft_dir: str, workdir: str, mesh: dict) -> None:
  """Runs one PPO iteration on this process's devices and writes its policy as policy.npy."""
  config = ppo_config(sft_dir, steps=1, eval_every=1, checkpoint_every=1, batch_size=16)
  config.ppo.minibatch_size = 8  # Rows split over the 8 devices.
  config.mesh.update({**dict(data=1, fsdp=1, tensor=1, expert=1), **mesh})
  assert jax.device_count() == int(np.prod(list(config.mesh.values())))
  result = stages.train(config, workdir)
  np.save(os.path.join(workdir, 'policy.npy'), flat(result.params['policy']))
