"""Sweeps (expansion, skipping, failures, the results table) and embedding analysis."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from research import sweep
from research.analysis import embeddings
from research.errors import UserError
from research.metrics import MetricsWriter


def test_product_and_zip_expand_with_fixed_overrides():
  points = sweep.product({'model.pos_encoding': ['learned', 'rope'], 'seed': [0, 1]},
                         fixed={'train.steps': 5})
  assert [p.name for p in points] == ['pos_encoding=learned,seed=0', 'pos_encoding=learned,seed=1',
                                      'pos_encoding=rope,seed=0', 'pos_encoding=rope,seed=1']
  assert points[3].overrides == {'train.steps': 5, 'model.pos_encoding': 'rope', 'seed': 1}
  assert points[3].swept == ('model.pos_encoding', 'seed')
  zipped = sweep.zip_points({'model.num_experts': [4, 8], 'model.moe_top_k': [1, 2]})
  assert [p.overrides for p in zipped] == [{'model.num_experts': 4, 'model.moe_top_k': 1},
                                           {'model.num_experts': 8, 'model.moe_top_k': 2}]
  with pytest.raises(UserError, match='one length'):
    sweep.zip_points({'a': [1, 2], 'b': [1]})
  with pytest.raises(UserError, match='repeated'):
    sweep.check_points(zipped + zipped)


def test_dry_run_prints_one_command_per_point(capsys, tmp_path):
  points = sweep.product({'model.ffn': ['relu', 'swiglu']})
  lines = sweep.dry_run('pretrain_small', points, str(tmp_path), ['--config.train.steps=3'])
  assert capsys.readouterr().out.splitlines() == lines
  assert '--config.model.ffn=swiglu' in lines[1] and lines[1].endswith('--config.train.steps=3')
  assert f'--workdir={tmp_path}/sweep/ffn=swiglu' in lines[1]
  fixed = sweep.product({'model.ffn': ['relu', 'swiglu']}, fixed={'train.steps': 250})
  lines = sweep.dry_run('pretrain_small', fixed, str(tmp_path), ['--config.train.steps=3'])
  assert all(line.endswith('--config.train.steps=3') for line in lines)  # Last one wins.


def test_an_override_of_a_swept_key_is_refused_before_anything_runs(tmp_path):
  points = sweep.product({'model.ffn': ['relu']}) + sweep.product({'seed': [0, 1]})

  def runner(cmd, workdir):
    raise AssertionError('no point should run')

  for override in ('--config.seed=7', '--config.model.ffn=gelu'):
    with pytest.raises(UserError, match=f'{override} would override the swept key'):
      sweep.dry_run('pretrain_small', points, str(tmp_path), [override])
    with pytest.raises(UserError, match='drop it, or change'):
      sweep.run('pretrain_small', points, str(tmp_path), extra_args=[override], runner=runner)
  assert not os.listdir(tmp_path)


def test_run_point_reports_this_attempts_error_not_an_earlier_ones(tmp_path):
  def attempt(code):
    return sweep.run_point([sys.executable, '-c', code], str(tmp_path))

  assert attempt("print('error: bad flag'); raise SystemExit(2)") == (False, 'error: bad flag')
  assert attempt("raise RuntimeError('out of memory')") == (False, 'RuntimeError: out of memory')
  assert attempt('raise SystemExit(3)') == (False, 'exit status 3')
  assert attempt('pass') == (True, '')
  log = open(tmp_path / 'log.txt').read()
  assert 'error: bad flag' in log and 'RuntimeError' in log  # Every attempt's output is kept.


def fake_training(workdir: str, eval_losses: list[float], finished: bool = True) -> None:
  """What a real run leaves in its workdir: metrics.jsonl (written by MetricsWriter) and
  summary.json."""
  writer = MetricsWriter(workdir)
  for i, loss in enumerate(eval_losses, 1):
    writer.write(10 * i, {'train/loss': loss + 0.1, 'train/tokens_per_sec': 1000.0 * i})
    writer.write(10 * i, {'eval/loss': loss})
  writer.close()
  with open(os.path.join(workdir, 'summary.json'), 'w') as f:
    json.dump({'finished': finished, 'params': 1234, 'step': 10 * len(eval_losses)}, f)


def test_run_skips_finished_points_reports_failures_and_builds_the_table(tmp_path, capsys):
  points = sweep.product({'model.norm': ['layernorm', 'rmsnorm'], 'seed': [0, 1]})
  root = str(tmp_path)
  calls = []

  def runner(cmd, workdir):
    calls.append(os.path.basename(workdir))
    if 'rmsnorm,seed=1' in workdir:
      return False, 'error: something impossible'
    loss = 2.0 if 'layernorm' in workdir else 1.5
    fake_training(workdir, [loss + 1.0, loss, loss + 0.2])  # Best != final.
    return True, ''

  rows = sweep.run('pretrain_small', points, root, runner=runner)
  assert calls == [p.name for p in points]  # The failure did not stop the last point.
  out = capsys.readouterr().out
  assert 'FAILED norm=rmsnorm,seed=1: error: something impossible' in out
  by_name = {r['point']: r for r in rows}
  assert by_name['norm=rmsnorm,seed=0']['final_eval_loss'] == pytest.approx(1.7)
  assert by_name['norm=rmsnorm,seed=0']['best_eval_loss'] == pytest.approx(1.5)
  assert by_name['norm=rmsnorm,seed=0']['tokens_per_sec'] == pytest.approx(2000.0)
  assert by_name['norm=rmsnorm,seed=0']['params'] == 1234
  assert by_name['norm=rmsnorm,seed=1']['status'] == 'failed'
  for name in ('results.csv', 'results.md', 'eval_curves.png', 'by_model_norm.png'):
    assert os.path.getsize(os.path.join(root, name)) > 0
  table = open(os.path.join(root, 'results.md')).read()
  assert table.count('\n') == 2 + len(points) and '| failed |' in table

  calls.clear()
  sweep.run('pretrain_small', points, root, runner=runner)
  assert calls == ['norm=rmsnorm,seed=1']  # Only the unfinished point runs again.


def test_an_interrupted_point_is_not_finished(tmp_path):
  point = sweep.product({'seed': [0]})

  def preempted(cmd, workdir):
    fake_training(workdir, [3.0], finished=False)
    return True, ''

  rows = sweep.run('pretrain_small', point, str(tmp_path), runner=preempted)
  assert rows[0]['status'] == 'failed'


# A hand-built embedding space: 'king' = royal + male, 'queen' = royal + female, and so on.
WORDS = ['king', 'queen', 'man', 'woman', 'one', 'two', 'three', 'four']


def hand_built() -> np.ndarray:
  royal, male, female, count = np.eye(8)[:4]
  noise = np.random.default_rng(0).normal(0, 0.01, (8, 8))
  rows = [royal + male, royal + female, male, female] + [count * n + np.eye(8)[4] for n in (1, 2,
                                                                                           3, 4)]
  return np.stack(rows) + noise


def test_analogy_neighbours_and_direction_on_a_known_space():
  e = hand_built()
  ids = {w: i for i, w in enumerate(WORDS)}
  best = embeddings.analogy(e, e[ids['king']], e[ids['man']], e[ids['woman']], k=1,
                            exclude=[ids['king'], ids['man'], ids['woman']])
  assert WORDS[best[0][0]] == 'queen'
  assert WORDS[embeddings.nearest(e, e[ids['man']], 1, exclude=[ids['man']])[0][0]] in (
      'king', 'woman')
  counts = embeddings.projections(e[4:], e[[5]], e[[4]])  # The "plural" direction: two - one.
  assert np.all(np.diff(counts) > 0)
  xy = embeddings.pca_2d(e)
  assert xy.shape == (8, 2)
  assert np.var(xy[:, 0]) >= np.var(xy[:, 1])
  with pytest.raises(UserError, match='zero'):
    embeddings.projections(e[:2], e[[0]], e[[0]])


class WordTokenizer:
  """A tokenizer stand-in: known words are one token, other words one token per letter."""

  def encode(self, text):
    return [WORDS.index(text)] if text in WORDS else [WORDS.index('one')] * len(text)

  def decode(self, ids):
    return ' '.join(WORDS[i] for i in ids)

  def id_to_token(self, i):
    return WORDS[i]


def test_report_names_split_words_and_writes_the_plot(tmp_path):
  vocab = embeddings.Vocabulary(WordTokenizer(), hand_built())
  path = str(tmp_path / 'pca.png')
  text = embeddings.analyze(vocab, ['king', 'queen', 'man', 'xy'], ['king,man,woman'],
                            'two/one', path)
  assert "king - man + woman: 'queen'" in text
  assert 'averaged over several tokens: xy (2)' in text
  assert os.path.getsize(path) > 0
  with pytest.raises(UserError, match='three'):
    embeddings.analyze(vocab, [], ['king,man'], '', path)


@pytest.mark.slow
def test_a_shipped_sweep_runs_end_to_end_through_launch(tiny_corpus, tmp_path):
  """ablate_norm's 4 points as real launch.py processes, shrunk by command-line overrides."""
  shrink = [f'--config.data.path={tiny_corpus}', '--config.data.val_fraction=0.2'] + [
      f'--config.{k}={v}' for k, v in (
          ('model.num_layers', 1), ('model.d_model', 32), ('model.num_heads', 2),
          ('model.max_len', 32), ('train.seq_len', 16), ('train.batch_size', 4),
          ('train.steps', 4), ('train.eval_every', 2), ('train.eval_batches', 2),
          ('train.checkpoint_every', 2), ('sampling.max_new_tokens', 4))]
  cmd = [sys.executable, sweep.LAUNCH, '--experiment=ablate_norm', '--mode=sweep',
         f'--workdir={tmp_path}', '--sweep_parallel=2'] + shrink
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  assert '4/4 points done' in out.stdout
  table = open(tmp_path / 'results.md').read()
  assert table.count('| done |') == 4 and 'norm_position=post,norm=rmsnorm' in table
