"""Nothing lost, whatever happens: damaged checkpoints, divergence, two processes on one workdir,
signals, and bad inputs that must end in one line with the workdir untouched."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from research import checkpoint
from research import config as config_lib
from research.errors import UserError
from research.train import pretrain
from research import runs
from tests.conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS='cpu')


def tiny_args(corpus: str, workdir: str, **train) -> list[str]:
  """launch.py arguments of conftest.tiny_config (train.* keys overridable)."""
  keys = dict(dict(steps=8, batch_size=4, seq_len=16, warmup_steps=2, log_every=1,
                   eval_every=4, eval_batches=2, checkpoint_every=4), **train)
  return ([sys.executable, 'launch.py', '--experiment=pretrain_small', f'--workdir={workdir}',
           f'--config.data.path={corpus}', '--config.data.val_fraction=0.2',
           '--config.model.num_layers=1', '--config.model.num_heads=2',
           '--config.model.d_model=32', '--config.model.max_len=32',
           '--config.sampling.max_new_tokens=8']
          + [f'--config.train.{k}={v}' for k, v in keys.items()])


def launch(args: list[str], **kwargs) -> subprocess.CompletedProcess:
  return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV,
                        **kwargs)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
  assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: '), proc.stderr[-2000:]
  for fragment in fragments:
    assert fragment in last, last


def snapshot(directory: str) -> dict[str, bytes]:
  """Every file under `directory` (relative path -> bytes)."""
  out = {}
  for dirpath, _, files in os.walk(directory):
    for f in files:
      path = os.path.join(dirpath, f)
      with open(path, 'rb') as fh:
        out[os.path.relpath(path, directory)] = fh.read()
  return out


def final_params(workdir: str) -> list[np.ndarray]:
  _, _, _, params = runs.load_trained(workdir)
  return [np.asarray(x) for x in jax.tree.leaves(params)]


# --- Damaged checkpoints ----------------------------------------------------------------------

def largest_array_file(step_dir: str) -> str:
  files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs
           if os.sep + 'd' + os.sep in os.path.join(d, f)]
  return max(files, key=os.path.getsize)


def truncate(step_dir: str) -> None:
  path = largest_array_file(step_dir)
  os.truncate(path, os.path.getsize(path) // 2)


def delete_metadata(step_dir: str) -> None:
  os.remove(os.path.join(step_dir, 'default', '_METADATA'))


def empty_folder(step_dir: str) -> None:
  for name in os.listdir(step_dir):
    path = os.path.join(step_dir, name)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def garbage(step_dir: str) -> None:
  path = largest_array_file(step_dir)
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    f.write(np.random.default_rng(0).bytes(256))


@pytest.fixture(scope='module')
def trained_to_8(tmp_path_factory, tiny_corpus):
  """A run trained to step 8 (checkpoints at 4 and 8), and the same run continued to step 12
  from step 4 after step 8 was cleanly removed: what a fallback must reproduce."""
  root = tmp_path_factory.mktemp('damaged')
  base = str(root / 'base')
  config_lib.save_to_workdir(tiny_config(tiny_corpus), base)
  pretrain.train(tiny_config(tiny_corpus), base)
  reference = str(root / 'reference')
  shutil.copytree(base, reference)
  shutil.rmtree(os.path.join(reference, 'checkpoints', '8'))
  pretrain.train(tiny_config(tiny_corpus, steps=12), reference)
  return base, final_params(reference)


@pytest.mark.parametrize('damage', [truncate, delete_metadata, empty_folder, garbage],
                         ids=lambda f: f.__name__)
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(trained_to_8, tiny_corpus, tmp_path,
                                                             capsys, damage):
  """The newest checkpoint damaged: one warning line, resume from step 4, the damaged step moved
  aside (not deleted), and the run ends bit-identical to one resumed from step 4."""
  base, want = trained_to_8
  workdir = str(tmp_path / 'run')
  shutil.copytree(base, workdir)
  damage(os.path.join(workdir, 'checkpoints', '8'))
  capsys.readouterr()
  pretrain.train(tiny_config(tiny_corpus, steps=12), workdir)
  out = capsys.readouterr().out
  assert re.search(r'warning: the checkpoint at step 8 is damaged \(.+\); trying an older one',
                   out), out
  assert 'resumed from the checkpoint at step 4' in out
  assert os.path.isdir(os.path.join(workdir, 'checkpoints_set_aside', '8'))
  for got, expected in zip(final_params(workdir), want):
    np.testing.assert_array_equal(got, expected)


def test_no_intact_checkpoint_is_one_line_and_changes_nothing(trained_to_8, tmp_path):
  base, _ = trained_to_8
  workdir = str(tmp_path / 'run')
  shutil.copytree(base, workdir)
  for step in ('4', '8'):
    delete_metadata(os.path.join(workdir, 'checkpoints', step))
  before = snapshot(workdir)
  with pytest.raises(UserError, match=r'no checkpoint in .*checkpoints loads \(steps 8, 4; '):
    runs.load_trained(workdir)
  assert snapshot(workdir) == before


def test_checksums_see_any_changed_value():
  tree = {'a': np.arange(1000, dtype=np.float32), 'b': np.ones((3, 4), np.int32)}
  sums = jax.device_get(checkpoint.checksums(tree))
  for change in (lambda t: t['a'].__setitem__(500, 500.5), lambda t: t['b'].__setitem__(
      (1, 2), 7), lambda t: t.__setitem__('a', t['a'][::-1].copy())):
    other = {k: v.copy() for k, v in tree.items()}
    change(other)
    assert any((x != y).any() for x, y in zip(jax.device_get(checkpoint.checksums(other)), sums))


def test_a_resumed_run_logs_what_the_uninterrupted_one_logged(tiny_corpus, tmp_path):
  """log_every=3, checkpoint_every=4: a run resumed from its step-4 checkpoint (as after a
  crash) logs the same train losses at the same steps as the run that went on (a log interval
  ends at every checkpoint)."""
  def losses(workdir):
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      return {r['step']: r['train/loss'] for r in map(json.loads, f) if 'train/loss' in r}
  whole, resumed = str(tmp_path / 'whole'), str(tmp_path / 'resumed')
  pretrain.train(tiny_config(tiny_corpus, log_every=3), whole)
  shutil.copytree(whole, resumed)
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '8'))  # Crashed before its step-8 save.
  pretrain.train(tiny_config(tiny_corpus, log_every=3), resumed)
  assert losses(whole) == losses(resumed)
  assert sorted(losses(whole)) == [3, 4, 6, 8]


# --- Divergence -------------------------------------------------------------------------------

def strict_json_lines(path: str) -> list[dict]:
  def refuse(name):
    raise ValueError(f'{name} is not JSON')
  with open(path) as f:
    return [json.loads(line, parse_constant=refuse) for line in f]


def test_divergence_halts_and_its_command_resumes_from_good_weights(tiny_corpus, tmp_path):
  """learning_rate=1e6 with a checkpoint every step: the halt names the last good step and a
  command; that checkpoint's weights are finite and bounded, and the command (with a sane
  learning rate) finishes the run. metrics.jsonl stays strict JSON."""
  workdir = str(tmp_path / 'run')
  proc = launch(tiny_args(tiny_corpus, workdir, steps=30, learning_rate=1e6, checkpoint_every=1,
                          warmup_steps=1))
  assert_one_line_error(proc, 'training diverged', '--config.train.resume_step=')
  command = shlex.split(proc.stderr.strip().splitlines()[-1].split(': ')[-1])
  step = int(next(a for a in command if 'resume_step' in a).split('=')[1])
  assert command[:2] == ['python', 'launch.py']
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'))
  assert max(ckpt.steps()) == step
  ckpt.close()
  _, _, _, params = runs.load_trained(workdir)
  biggest = max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(params))
  assert np.isfinite(biggest) and biggest < 100
  strict_json_lines(os.path.join(workdir, 'metrics.jsonl'))
  sane = [a if 'learning_rate' not in a else '--config.train.learning_rate=0.001'
          for a in command]
  again = launch([sys.executable] + sane[1:])
  assert again.returncode == 0, again.stderr[-3000:]
  assert f'resumed from the checkpoint at step {step}' in again.stdout
  with open(os.path.join(workdir, 'summary.json')) as f:
    assert json.load(f)['finished']
  strict_json_lines(os.path.join(workdir, 'metrics.jsonl'))


# --- One workdir, one process -----------------------------------------------------------------

def test_two_processes_on_one_workdir(tiny_corpus, tmp_path):
  """The second is refused in one line naming the first; after kill -9 of the holder, the next
  run takes over the stale lock."""
  workdir = str(tmp_path / 'run')
  first = subprocess.Popen(tiny_args(tiny_corpus, workdir, steps=100000, checkpoint_every=100000,
                                     eval_every=100000), cwd=ROOT, env=ENV, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  try:
    for line in first.stdout:
      if line.startswith('step 1/'):
        break
    before = snapshot(os.path.join(workdir, 'checkpoints'))
    second = launch(tiny_args(tiny_corpus, workdir))
    assert_one_line_error(second, f'in use by process {first.pid}')
    assert snapshot(os.path.join(workdir, 'checkpoints')) == before
  finally:
    first.kill()  # kill -9: no handler runs, the lock file keeps its holder's name.
    first.wait()
  with open(os.path.join(workdir, '.lock')) as f:
    assert json.load(f)['pid'] == first.pid
  third = launch(tiny_args(tiny_corpus, workdir, steps=2))
  assert third.returncode == 0, third.stderr[-3000:]
  assert 'taking over the lock' in third.stdout


# --- Signals ----------------------------------------------------------------------------------

def test_ctrl_c_during_start_up_is_one_line(tiny_corpus, tmp_path):
  proc = subprocess.Popen(tiny_args(tiny_corpus, str(tmp_path / 'run')), cwd=ROOT, env=ENV,
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  time.sleep(1.5)  # Inside the imports.
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, (out, err)
  assert 'Traceback' not in err and err.strip().splitlines()[-1] == 'interrupted'


# --- Bad inputs: one line, a non-zero exit, the workdir byte-identical --------------------------

def make_fifo(path: str) -> str:
  os.mkfifo(path)
  return path


BAD_INPUTS = {
    'workdir is a file': lambda d, c: (['--workdir=' + os.path.join(d, 'config.json')],
                                       'is a file, not a folder'),
    'data path is a device': lambda d, c: (['--config.data.path=/dev/zero'],
                                           'not a regular file or folder'),
    'data path is a FIFO': lambda d, c: ([f'--config.data.path={make_fifo(c + ".fifo")}'],
                                         'not a regular file or folder'),
    'sampling refused by generate': lambda d, c: (['--config.sampling.max_new_tokens=0'],
                                                  'sampling.max_new_tokens=0 must be >= 1'),
    'sampling top_p': lambda d, c: (['--config.sampling.top_p=0'], 'sampling.top_p=0'),
    'a mesh that does not fit the devices': lambda d, c: (['--config.mesh.fsdp=2'],
                                                          'cannot be split into mesh'),
    'multihost without a cluster': lambda d, c: (['--multihost'], '--multihost could not join'),
    'another model in the workdir': lambda d, c: (['--config.model.d_model=64'],
                                                  'holds a run with another config'),
    'a batch that cannot fit memory': lambda d, c: (
        ['--config.train.steps=4', f'--config.train.batch_size={2**22}',
         '--config.train.eval_batches=1'], 'GiB free; lower train.batch_size'),
}


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory, tiny_corpus):
  workdir = str(tmp_path_factory.mktemp('finished') / 'run')
  proc = launch(tiny_args(tiny_corpus, workdir, steps=2, checkpoint_every=2, eval_every=2))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


@pytest.mark.parametrize('case', list(BAD_INPUTS))
def test_bad_inputs_end_in_one_line_and_leave_the_workdir(finished_run, tiny_corpus, tmp_path,
                                                          case):
  args, message = BAD_INPUTS[case](finished_run, str(tmp_path / 'corpus'))
  before = snapshot(finished_run)
  proc = launch(tiny_args(tiny_corpus, finished_run, steps=2, checkpoint_every=2, eval_every=2)
                + args)
  assert_one_line_error(proc, message)
  assert snapshot(finished_run) == before


def test_read_only_workdir_is_one_line(tiny_corpus, tmp_path):
  if os.geteuid() == 0:
    pytest.skip('root writes into read-only folders')
  parent = tmp_path / 'locked'
  parent.mkdir()
  parent.chmod(0o555)
  try:
    assert_one_line_error(launch(tiny_args(tiny_corpus, str(parent / 'run'))), 'cannot be written')
  finally:
    parent.chmod(0o755)


def test_a_bad_sft_file_is_refused_before_earlier_stages_train(tmp_path):
  """reward_small would first train SFT (and its pretraining) for minutes: a broken sft.path is
  refused at once, before any of it."""
  bad = tmp_path / 'sft.jsonl'
  bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 3}\n')
  workdir = tmp_path / 'run'
  proc = launch([sys.executable, 'launch.py', '--experiment=reward_small', f'--workdir={workdir}',
                 f'--config.sft.path={bad}'])  # Every stage's, the earlier SFT's too.
  assert_one_line_error(proc, f'{bad}:2')
  assert not workdir.exists()


def test_a_fixed_data_file_is_read_again(tmp_path):
  """A data error (too little text for the val split) must not be cached: once the file is
  fixed, the same workdir tokenises it again and trains."""
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text('x\n' * 5)
  workdir = str(tmp_path / 'run')
  first = launch(tiny_args(str(corpus), workdir, steps=2, checkpoint_every=2, eval_every=2))
  assert_one_line_error(first, 'split has')
  corpus.write_text(''.join(f'def f{i}(x):\n    return x * {i % 7}\n\n' for i in range(300)))
  second = launch(tiny_args(str(corpus), workdir, steps=2, checkpoint_every=2, eval_every=2))
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'tokenising it again' in second.stdout
