"""The training loop: learning, exact resume after a crash, preemption, NaN guard, outputs."""

import json
import os
import platform
import re
import signal
import struct
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tensorboardX.proto import event_pb2

from research import config as config_lib
from research import perf
from research.checkpoint import Checkpointer
from research.config import default_config
from research.data import lm, sources
from research.data.prefetch import Prefetcher
from research.errors import UserError
from research.metrics import read_jsonl
from research.train import loop, pretrain
from research.train.optimizer import make_optimizer, make_schedule
from tests.conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def losses(workdir):
  return {r['step']: r['train/loss'] for r in read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
          if 'train/loss' in r}


@pytest.fixture(scope='module')
def uninterrupted(tiny_corpus, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('full'))
  result = pretrain.train(tiny_config(tiny_corpus), workdir)
  return workdir, result


def test_loss_falls_and_outputs_exist(tiny_corpus, tmp_path):
  workdir = str(tmp_path)
  config = tiny_config(tiny_corpus, steps=60, learning_rate=1e-2, eval_every=30,
                       checkpoint_every=30, log_every=10)
  result = pretrain.train(config, workdir)
  with open(os.path.join(workdir, 'data', 'stats.json')) as f:
    entropy = json.load(f)['val_unigram_entropy']
  first = losses(workdir)[10]
  assert result.metrics['eval/loss'] < 0.7 * entropy < first
  for name in ('metrics.jsonl', 'loss.png', 'samples.txt', 'tokenizer', 'checkpoints/60'):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert any(f.startswith('events') for f in os.listdir(os.path.join(workdir, 'tensorboard')))
  schedule = make_schedule(config.train)  # Step s logs the rate of its update, optax's count s-1.
  for r in read_jsonl(os.path.join(workdir, 'metrics.jsonl')):
    if 'train/learning_rate' in r:
      assert r['train/learning_rate'] == pytest.approx(float(schedule(r['step'] - 1)))


# First losses of the tiny config, pinned so that speed work cannot silently change the maths
# (init, data order, loss, optimiser). Re-pin only for a deliberate change, and say why.
GOLDEN_LOSSES = {1: 3.488866, 2: 3.533188, 3: 3.471539, 4: 3.421947, 8: 3.229730}


def test_golden_first_losses(uninterrupted):
  got = losses(uninterrupted[0])
  for step, want in GOLDEN_LOSSES.items():
    assert got[step] == pytest.approx(want, abs=2e-4), (step, got[step])


def test_resume_after_crash_gives_identical_losses(tiny_corpus, tmp_path, monkeypatch,
                                                   uninterrupted):
  """Killed (not asked) after the step-4 checkpoint, rerun: steps 5.. match the full run."""
  workdir = str(tmp_path)
  config = tiny_config(tiny_corpus)
  real_batch = lm.lm_batch

  def crash_at_step_6(tokens, batch_size, seq_len, seed, step, micro=0, rows=slice(None)):
    if step == 6:
      # Saves run in the background: die once step 4's checkpoint is committed, not mid-save.
      deadline = time.time() + 60
      saved = os.path.join(workdir, 'checkpoints', '4')
      while not os.path.exists(saved) and time.time() < deadline:
        time.sleep(0.05)
      raise RuntimeError('simulated crash')
    return real_batch(tokens, batch_size, seq_len, seed, step, micro, rows)

  monkeypatch.setattr(lm, 'lm_batch', crash_at_step_6)
  with pytest.raises(RuntimeError, match='simulated crash'):
    pretrain.train(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['4']
  monkeypatch.setattr(lm, 'lm_batch', real_batch)
  resumed = pretrain.train(config, workdir)

  full_dir, full = uninterrupted
  assert losses(workdir) == losses(full_dir)  # Steps 1..8, bit for bit.
  assert resumed.metrics['eval/loss'] == full.metrics['eval/loss']
  assert tensorboard_steps(workdir, 'train/loss') == list(range(1, 9))  # Step 5 once.


def test_gradient_accumulation_may_change_on_resume(tiny_corpus, tmp_path):
  """Steps 1-4 without accumulation, 5-8 with 2 micro-batches, 9-12 without again: the optimiser
  state is the same either way (Adam's step count reaches 12; the moments are kept)."""
  workdir = str(tmp_path)
  for steps, accum in ((4, 1), (8, 2), (12, 1)):
    config = tiny_config(tiny_corpus, steps=steps, grad_accum_steps=accum, eval_every=100)
    result = pretrain.train(config, workdir)
    assert np.isfinite(result.metrics['train/loss'])
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'))
  tx = make_optimizer(config.train, config_lib.flat_optimizer(config))
  state = ckpt.restore(12, loop.TrainState(result.params, tx.init(result.params)))
  ckpt.close()
  counts = [int(x) for path, x in jax.tree_util.tree_leaves_with_path(state.opt_state)
            if 'count' in jax.tree_util.keystr(path)]
  assert counts and set(counts) == {12}
  mu = [x for path, x in jax.tree_util.tree_leaves_with_path(state.opt_state)
        if 'mu' in jax.tree_util.keystr(path)]
  assert mu and all(np.abs(np.asarray(m)).sum() > 0 for m in mu)


def tensorboard_steps(workdir: str, tag: str) -> list[int]:
  """The steps of `tag` that TensorBoard shows: events read in file order (TFRecord framing:
  length u64, its crc u32, the event, its crc u32), and a SessionLog START at step s purges the
  points at steps >= s written before it."""
  steps = []
  folder = os.path.join(workdir, 'tensorboard')
  for name in sorted(os.listdir(folder)):
    data = open(os.path.join(folder, name), 'rb').read()
    i = 0
    while i < len(data):
      n = struct.unpack('<Q', data[i:i + 8])[0]
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 16 + n
      if event.session_log.status == event_pb2.SessionLog.START:
        steps = [s for s in steps if s < event.step]
      steps += [event.step for v in event.summary.value if v.tag == tag]
  return steps


def test_jsonl_records_keep_unicode_line_separators_and_split_alike_anywhere(tmp_path):
  """JSON strings may hold U+2028/U+2029/U+0085 unescaped: a record is one '\\n'-ended line.
  Record names (which the train/val split hashes) do not depend on where the data lies."""
  records = [{'text': f'line\u2028sep\u0085{i} 中文'} for i in range(300)]
  splits = []
  for where in ('a', 'b/elsewhere'):
    folder = tmp_path / where / 'corpus'
    folder.mkdir(parents=True)
    (folder / 'x.jsonl').write_text(
        '\n'.join(json.dumps(r, ensure_ascii=False) for r in records), encoding='utf-8')
    docs = sources.load_documents(str(folder))
    assert [d.text for d in docs] == [r['text'] for r in records]
    assert sources.load_documents(str(folder / 'x.jsonl'))[0].name == 'x.jsonl:1'
    splits.append([d.name for d in sources.split_documents(docs, 0.1)[1]])
  assert splits[0] == splits[1] and splits[0]


def test_a_split_shorter_than_two_windows_of_targets_is_refused():
  """lm_batch draws windows of seq_len+1 tokens from starts below len - seq_len - 1."""
  lm.check_length(np.zeros(18), 16, 'val')
  with pytest.raises(UserError, match=r'val split has 17 tokens, fewer than train.seq_len\+2=18'):
    lm.check_length(np.zeros(17), 16, 'val')


def test_few_documents_are_split_inside_each_and_many_whole():
  few = [sources.Document(f'f{i}.txt', 'ab' * 50 * (i + 1)) for i in range(3)]
  train, val = sources.split_documents(few, 0.2)
  assert [d.name for d in val] == ['f0.txt:val', 'f1.txt:val', 'f2.txt:val']
  for doc, t, v in zip(few, train, val):  # Each file's last fifth, not one whole file.
    assert t.text + v.text == doc.text and len(v.text) == len(doc.text) // 5
  many = [sources.Document(f'doc{i}', 'x' * 10) for i in range(500)]
  train, val = sources.split_documents(many, 0.1)
  assert sorted(d.name for d in train + val) == sorted(d.name for d in many)  # Whole, disjoint.
  assert 0.05 < len(val) / len(many) < 0.2


def test_gradient_accumulation_equals_the_big_batch():
  """One optimiser step over 2 stacked micro-batches of 2 rows == one step over the 4 rows."""
  x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
  y = x @ np.array([1.0, -2.0, 0.5], np.float32)

  def loss_fn(params, batch, key):
    del key
    return jnp.mean((batch['x'] @ params['w'] - batch['y']) ** 2), {}

  task = loop.Task(init_params=lambda key: {'w': jnp.zeros((3,))}, loss_fn=loss_fn,
                   eval_fn=None, train_batch=None, eval_batches=[], tokens_per_step=0,
                   flops_per_token=None)
  cfg = default_config().train
  cfg.update(warmup_steps=0, schedule='constant', learning_rate=0.1)
  tx = make_optimizer(cfg)
  params = []
  for accum, batch in ((1, {'x': x, 'y': y}), (2, {'x': x.reshape(2, 2, 3), 'y': y.reshape(2, 2)})):
    p = task.init_params(None)
    step = loop.make_train_step(task, tx, seed=0, accum=accum)
    state, _ = step(loop.TrainState(p, tx.init(p)), batch, np.int32(0))
    params.append(np.asarray(state.params['w']))
  assert np.abs(params[0]).min() > 0
  np.testing.assert_allclose(params[0], params[1], atol=1e-6)


def test_accumulated_token_means_equal_the_big_batch():
  """Losses that are means over weighted tokens (SFT, seq2seq, MLM): micro-batches holding 3 and
  1 tokens, weighted by Task.batch_weight inside the step, make the step (loss, grad_norm and
  update) of the 4 tokens at once; plain averaging of the two means would weight the lone token
  3 times as much."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 3)).astype(np.float32)
  y = rng.normal(size=(6,)).astype(np.float32)
  w = np.array([1, 1, 1, 0, 0, 1], np.float32)

  def loss_fn(params, batch, key):
    del key
    err = (batch['x'] @ params['w'] - batch['y']) ** 2
    return (err * batch['w']).sum() / batch['w'].sum(), {}

  def train(accum, weigh):
    task = loop.Task(init_params=None, loss_fn=loss_fn, eval_fn=None, train_batch=None,
                     eval_batches=[], tokens_per_step=0, flops_per_token=None,
                     batch_weight=(lambda b: b['w'].sum()) if weigh else None)
    tx = optax.sgd(0.1)
    p = {'w': jnp.ones((3,))}
    batch = {'x': x, 'y': y, 'w': w}
    if accum > 1:
      batch = {k: v.reshape(accum, -1, *v.shape[1:]) for k, v in batch.items()}
    state, out = loop.make_train_step(task, tx, seed=0, accum=accum)(
        loop.TrainState(p, tx.init(p)), batch, np.int32(0))
    return np.asarray(state.params['w']), float(out['grad_norm']), float(out['loss'])

  big, big_norm, big_loss = train(1, True)
  np.testing.assert_allclose(big_norm, np.linalg.norm((np.ones(3) - big) / 0.1), rtol=1e-5)
  accumulated, norm, loss = train(2, True)
  np.testing.assert_allclose(accumulated, big, atol=1e-6)
  np.testing.assert_allclose([norm, loss], [big_norm, big_loss], rtol=1e-5)
  assert np.abs(train(2, False)[0] - big).max() > 1e-2


def test_eval_averages_weighted_means_over_the_whole_set():
  """A metric given as (mean, weight) averages to the mean over all the weight (3 tokens of mean
  1 and 1 token of mean 5: 2, not 3); a plain scalar to the mean over batches."""
  batches = [{'sum': np.float32(3.0), 'n': np.float32(3.0)},
             {'sum': np.float32(5.0), 'n': np.float32(1.0)}]
  step = jax.jit(lambda params, b: {'loss': (b['sum'] / b['n'], b['n']), 'rows': b['sum']})
  got = loop.evaluate(step, None, batches)
  assert got == {'eval/loss': pytest.approx(2.0), 'eval/rows': pytest.approx(4.0)}


def test_flattened_optimizer_equals_adamw_per_parameter():
  """The flat optimizer (train.flatten_optimizer): the same updates (clipping active, decay on
  matrices only) and grad_norm metric as the per-parameter AdamW, with a flat moment vector."""
  rng = np.random.default_rng(0)
  params = {'w': rng.normal(size=(3, 4)).astype(np.float32),
            'b': rng.normal(size=(4,)).astype(np.float32)}
  batch = {'x': rng.normal(size=(8, 3)).astype(np.float32),
           'y': rng.normal(size=(8, 4)).astype(np.float32)}

  def loss_fn(p, b, key):
    del key
    return 10.0 * jnp.mean((b['x'] @ p['w'] + p['b'] - b['y']) ** 2), {}

  task = loop.Task(init_params=None, loss_fn=loss_fn, eval_fn=None, train_batch=None,
                   eval_batches=[], tokens_per_step=0, flops_per_token=None)
  results = []
  for flat in (False, True):
    cfg = default_config().train
    cfg.update(warmup_steps=0, schedule='constant', learning_rate=0.1)
    tx = make_optimizer(cfg, flat)
    p = jax.tree.map(jnp.asarray, params)  # The step donates (deletes) its input state.
    state = loop.TrainState(p, tx.init(p))
    step = loop.make_train_step(task, tx, seed=0, flat_optimizer=flat)
    norms = []
    for i in range(3):
      state, out = step(state, batch, np.int32(i))
      norms.append(float(out['grad_norm']))
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
    results.append((state.params, norms, moments))
  (per_param, norms, moments), (flat, flat_norms, flat_moments) = results
  assert norms[0] > 1.0  # Clipped (train.grad_clip = 1).
  np.testing.assert_allclose(flat_norms, norms, rtol=1e-6)
  for name in params:
    assert np.abs(np.asarray(per_param[name]) - params[name]).min() > 0
    np.testing.assert_allclose(flat[name], per_param[name], atol=1e-6)
  assert len(moments) == 4 and [m.shape for m in flat_moments] == [(16,), (16,)]


def test_optimizer_is_flat_only_on_meshes_that_keep_parameters_whole(tiny_corpus):
  config = tiny_config(tiny_corpus)  # pretrain_small's: train.flatten_optimizer=True.
  assert config_lib.flat_optimizer(config)
  config.mesh.data = 8
  assert config_lib.flat_optimizer(config)
  for axis, size in (('fsdp', -1), ('tensor', 4), ('expert', 2)):
    sharded = json.loads(config.to_json())
    sharded['mesh'][axis] = size
    assert not config_lib.flat_optimizer(sharded)
  saved = json.loads(config.to_json())
  del saved['train']['flatten_optimizer']  # A workdir made before the key.
  assert not config_lib.flat_optimizer(saved)


def test_nan_loss_stops_with_a_clear_error(tiny_corpus, tmp_path):
  config = tiny_config(tiny_corpus, learning_rate=1e12, warmup_steps=1, grad_clip=0.0, steps=30,
                       checkpoint_every=1)
  with pytest.raises(UserError, match=r'became nan at step \d+: training diverged') as err:
    pretrain.train(config, str(tmp_path))
  bad_step = int(re.search(r'at step (\d+)', str(err.value)).group(1))
  saved = [int(s) for s in os.listdir(os.path.join(tmp_path, 'checkpoints'))]
  assert saved and max(saved) < bad_step  # Only weights with a finite loss were saved.


def test_sigterm_saves_a_checkpoint_and_exits(tiny_corpus, tmp_path):
  workdir = str(tmp_path / 'run')
  cmd = [sys.executable, 'launch.py', '--experiment=pretrain_small', f'--workdir={workdir}',
         f'--config.data.path={tiny_corpus}', '--config.model.num_layers=1',
         '--config.model.d_model=32', '--config.model.num_heads=2', '--config.train.seq_len=16',
         '--config.train.batch_size=4', '--config.train.steps=100000',
         '--config.train.checkpoint_every=100000', '--config.train.log_every=1',
         '--config.data.val_fraction=0.2', '--config.train.eval_every=100000']
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith('step 3/'):
      proc.send_signal(signal.SIGTERM)
      break
  out = ''.join(lines) + proc.communicate(timeout=120)[0]
  assert proc.returncode == 143, out  # 128 + SIGTERM, as a shell reports it: requeue me.
  saved = os.listdir(os.path.join(workdir, 'checkpoints'))
  assert len(saved) == 1 and int(saved[0]) >= 3, out
  assert 'rerun the same command to resume' in out


def test_a_signal_during_eval_saves_after_the_next_step(tiny_corpus, tmp_path, monkeypatch):
  """SIGTERM while the step-2 eval runs (no checkpoint due there): the loop saves after step 3
  and stops, rather than stopping unsaved."""
  real_evaluate = loop.evaluate

  def evaluate_then_signal(*args):
    os.kill(os.getpid(), signal.SIGTERM)  # Caught by loop.Preempted: sets its flag.
    return real_evaluate(*args)

  monkeypatch.setattr(loop, 'evaluate', evaluate_then_signal)
  config = tiny_config(tiny_corpus, steps=10, eval_every=2, checkpoint_every=100)
  with pytest.raises(loop.Interrupted, match='SIGTERM after step 3') as stopped:
    pretrain.train(config, str(tmp_path))
  assert stopped.value.signum == signal.SIGTERM
  assert os.listdir(os.path.join(tmp_path, 'checkpoints')) == ['3']
  with open(tmp_path / 'summary.json') as f:
    assert not json.load(f)['finished']


@pytest.mark.parametrize('kind', ['char', 'word', 'byte', 'sentencepiece'])
def test_pretrain_runs_with_each_tokenizer(kind, tiny_corpus, tmp_path):
  config = tiny_config(tiny_corpus, steps=2, eval_every=2, checkpoint_every=2)
  config.tokenizer.update(kind=kind, vocab_size=300)  # sentencepiece: 291 <= vocab <= 317 here
  result = pretrain.train(config, str(tmp_path))
  assert np.isfinite(result.metrics['eval/loss'])
  with open(os.path.join(tmp_path, 'tokenizer', 'tokenizer.json')) as f:
    assert json.load(f)['kind'] == kind


def test_checkpointer_accepts_a_relative_directory(tmp_path, monkeypatch):
  """launch.py's default workdir (runs/NAME) is relative; Orbax alone refuses relative paths."""
  monkeypatch.chdir(tmp_path)
  ckpt = Checkpointer(os.path.join('runs', 'ckpt'))
  ckpt.save(3, {'w': np.arange(4.0)})
  ckpt.wait()
  restored = ckpt.restore(ckpt.latest_step(), {'w': np.zeros(4)})
  ckpt.close()
  np.testing.assert_array_equal(restored['w'], np.arange(4.0))
  assert os.path.isdir(tmp_path / 'runs' / 'ckpt' / '3')


FAULTS_PER_CALL = '''
import resource, sys
import jax, jax.numpy as jnp
from research import perf
if sys.argv[1] == 'tuned':
  perf.tune_cpu_runtime()
# sin(x) is materialised: a 96 MB temporary.
f = jax.jit(lambda x: jnp.cos(jax.lax.optimization_barrier(jnp.sin(x))).sum())
x = jnp.ones((4096, 6144))
faults = []
for _ in range(8):  # The fewest faults of a call: the kernel's page reclaim adds some.
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults[2:]))
'''


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='glibc malloc settings')
def test_tuned_cpu_runtime_reuses_the_memory_of_earlier_calls():
  """Untuned, each call mmaps its 96 MB temporary afresh and faults in its 24k pages again."""
  faults = {mode: int(subprocess.run([sys.executable, '-c', FAULTS_PER_CALL, mode], cwd=ROOT,
                                     capture_output=True, text=True, check=True).stdout)
            for mode in ('default', 'tuned')}
  assert faults['default'] > 20_000, faults
  assert faults['tuned'] < 1_000, faults


def test_measured_peak_is_the_fastest_run(monkeypatch):
  """A shared machine's slow runs must not lower the CPU peak MFU divides by (so inflate MFU)."""
  runs = iter([1.0, 5.0, 2.0, 3.0, 4.0])
  monkeypatch.setattr(perf, 'matmul_probe', lambda n: lambda: next(runs))
  assert perf.measure_matmul_peak(repeats=5) == 5.0


def test_prefetcher_builds_each_batch_once_the_next_in_its_thread():
  built = []

  def make(step, micro):
    built.append(((step, micro), threading.current_thread().name.startswith('prefetch')))
    if step == 9:
      raise ValueError('bad batch 9')
    return step * 10 + micro

  with Prefetcher(make, ready=((0, 0), 'first')) as batches:
    assert batches.get((0, 0), (0, 1)) == 'first'  # Given ready: not built again.
    assert batches.get((0, 1), (1, 0)) == 1
    assert batches.get((1, 0), (2, 0)) == 10
    assert batches.get((5, 0), (9, 0)) == 50  # Not the one started: built here, after it.
    with pytest.raises(ValueError, match='bad batch 9'):
      batches.get((9, 0), None)
  assert built == [((0, 1), True), ((1, 0), True), ((2, 0), True), ((5, 0), False),
                   ((9, 0), True)]


def test_metrics_jsonl_is_strict_json_when_values_diverge(tmp_path):
  """A value that is not finite is written as null (strict parsers reject Infinity and NaN) and
  read back as NaN; TensorBoard keeps the float."""
  import json
  from research import metrics as metrics_lib
  writer = metrics_lib.MetricsWriter(str(tmp_path))
  writer.write(1, {'train/loss': 2.5, 'train/grad_norm': float('inf'), 'eval/loss': float('nan')})
  writer.close()
  def strict(constant):
    raise ValueError(f'not strict JSON: {constant}')
  line = (tmp_path / 'metrics.jsonl').read_text().strip()
  assert json.loads(line, parse_constant=strict) == {
      'step': 1, 'train/loss': 2.5, 'train/grad_norm': None, 'eval/loss': None}
  (record,) = metrics_lib.read_jsonl(str(tmp_path / 'metrics.jsonl'))
  assert record['train/loss'] == 2.5 and np.isnan(record['train/grad_norm'])
