"""Ablation sweeps: the points an experiment's `sweep()` declares, run each in its own workdir,
then one results table (CSV + Markdown) and plots.

An experiment declares its points with `product` and `zip_points` (lists add up):

  def sweep():
    return sweep.product({'model.pos_encoding': ['learned', 'sinusoidal', 'rope'],
                          'seed': [0, 1]}, fixed={'train.steps': 250})

`python launch.py --experiment=NAME --mode=sweep` runs every point as its own `launch.py` process
in `<workdir>/sweep/<point name>`: finished points are skipped, interrupted ones resume from their
checkpoint, a failing point is reported and the others go on.
"""

import concurrent.futures
import csv
import dataclasses
import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Any, Callable, Optional, Sequence

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from research import runs
from research.errors import UserError
from research.metrics import read_jsonl

LAUNCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'launch.py')


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of a sweep: its config overrides ('section.key' -> value) and a unique name."""
  name: str
  overrides: dict[str, Any]
  swept: tuple[str, ...]  # The keys this point varies (the rest of `overrides` is fixed).


def _points(rows: Sequence[dict[str, Any]], fixed: Optional[dict[str, Any]]) -> list[Point]:
  def short(key, value):
    return f'{key.split(".")[-1]}={value}'.replace('/', '_').replace(' ', '_')
  return [Point(','.join(short(k, v) for k, v in row.items()), {**(fixed or {}), **row},
                tuple(row)) for row in rows]


def product(axes: dict[str, Sequence[Any]], fixed: Optional[dict[str, Any]] = None) -> list[Point]:
  """Every combination of the values in `axes` (key -> values), plus the `fixed` overrides."""
  keys = list(axes)
  return _points([dict(zip(keys, values)) for values in itertools.product(*axes.values())], fixed)


def zip_points(axes: dict[str, Sequence[Any]],
               fixed: Optional[dict[str, Any]] = None) -> list[Point]:
  """The i-th value of every key together (all value lists the same length)."""
  lengths = {k: len(v) for k, v in axes.items()}
  if len(set(lengths.values())) > 1:
    raise UserError(f'zip_points needs value lists of one length, got {lengths}.')
  return _points([dict(zip(axes, values)) for values in zip(*axes.values())], fixed)


def check_points(points: Sequence[Point], extra_args: Sequence[str] = ()) -> None:
  """Raises a UserError unless the points have distinct names and no `--config.KEY` in
  `extra_args` (the overrides given to every point) sets a key that the sweep varies."""
  names = [p.name for p in points]
  repeated = sorted({n for n in names if names.count(n) > 1})
  if not points or repeated:
    raise UserError(f'a sweep needs points with distinct names; got {len(points)} points, '
                    f'repeated: {repeated}.')
  swept = {k for p in points for k in p.swept}
  for arg in extra_args:
    key = arg.split('=', 1)[0].removeprefix('--config.')
    if arg.startswith('--config.') and key in swept:
      raise UserError(f'{arg} would override the swept key {key} in every point; drop it, or '
                      f'change the values of {key} in the experiment\'s sweep().')


def command(experiment: str, point: Point, root: str, extra_args: Sequence[str] = ()) -> list[str]:
  """The launch.py command line of one point (extra_args, e.g. other overrides, go last)."""
  return ([sys.executable, LAUNCH, f'--experiment={experiment}',
           f'--workdir={os.path.join(root, "sweep", point.name)}']
          + [f'--config.{k}={v}' for k, v in point.overrides.items()] + list(extra_args))


def _status(workdir: str) -> dict:
  path = os.path.join(workdir, 'status.json')
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def run_point(cmd: list[str], workdir: str) -> tuple[bool, str]:
  """Runs one point's command, its output appended to workdir/log.txt: (ok, why not).

  Why not is the last `error:` line (else the last line) of this run's output, not of earlier
  attempts' output in the same log.
  """
  path = os.path.join(workdir, 'log.txt')
  with open(path, 'ab') as log:
    start = log.tell()
    rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
  if rc == 0:
    return True, ''
  if rc in (130, 143):  # launch.py after Ctrl-C / SIGTERM: a checkpoint is saved.
    return False, f'stopped by a signal (exit status {rc}); rerun the sweep to resume'
  with open(path, 'rb') as log:
    log.seek(start)
    lines = [line.strip() for line in log.read().decode(errors='replace').splitlines()
             if line.strip()]
  errors = [line for line in lines if line.startswith('error:')]
  return False, (errors or lines or [f'exit status {rc}'])[-1][:300]


def run(experiment: str, points: Sequence[Point], root: str, parallel: int = 1,
        extra_args: Sequence[str] = (),
        runner: Callable[[list[str], str], tuple[bool, str]] = run_point) -> list[dict]:
  """Runs the unfinished points (`parallel` at a time), then writes the report. Returns its rows."""
  check_points(points, extra_args)

  def one(point: Point) -> None:
    workdir = os.path.join(root, 'sweep', point.name)
    if runs.is_done(workdir):
      print(f'[sweep] {point.name}: finished earlier, skipped', flush=True)
      return
    print(f'[sweep] {point.name}: running', flush=True)
    previous = _status(workdir).get('wall_sec', 0.0)
    os.makedirs(workdir, exist_ok=True)
    t0 = time.perf_counter()
    ok, why = runner(command(experiment, point, root, extra_args), workdir)
    status = {'status': 'done' if ok and runs.is_done(workdir) else 'failed', 'error': why,
              'wall_sec': previous + time.perf_counter() - t0}
    if ok and status['status'] == 'failed':
      status['error'] = 'the run ended before train.steps (preempted?); rerun the sweep to resume'
    with open(os.path.join(workdir, 'status.json'), 'w') as f:
      json.dump(status, f)
    print(f'[sweep] {point.name}: {status["status"]} {status["error"]}'.rstrip(), flush=True)

  with concurrent.futures.ThreadPoolExecutor(max(1, parallel)) as pool:
    list(pool.map(one, points))
  rows = report(points, root)
  failed = [r for r in rows if r['status'] != 'done']
  for r in failed:
    print(f'[sweep] FAILED {r["point"]}: {r["error"]} (log: '
          f'{os.path.join(root, "sweep", r["point"], "log.txt")})', flush=True)
  print(f'[sweep] {len(rows) - len(failed)}/{len(rows)} points done; results in '
        f'{os.path.join(root, "results.md")}', flush=True)
  return rows


def point_row(point: Point, root: str) -> dict:
  """One results-table row from a point's workdir (metrics.jsonl, summary.json, status.json)."""
  workdir = os.path.join(root, 'sweep', point.name)
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  records = read_jsonl(metrics_path) if os.path.exists(metrics_path) else []
  evals = [r['eval/loss'] for r in records if 'eval/loss' in r]
  speeds = [r['train/tokens_per_sec'] for r in records if 'train/tokens_per_sec' in r]
  summary = runs.read_summary(workdir)
  status = _status(workdir)
  return {'point': point.name,
          'overrides': ' '.join(f'{k}={v}' for k, v in point.overrides.items()),
          'final_eval_loss': evals[-1] if evals else None,
          'best_eval_loss': min(evals) if evals else None,
          'tokens_per_sec': float(np.median(speeds)) if speeds else None,
          'params': summary.get('params'),
          'wall_sec': status.get('wall_sec'),
          'status': status.get('status', 'not run'),
          'error': status.get('error', '')}


def _fmt(value: Any) -> str:
  if value is None:
    return '-'
  if isinstance(value, float):
    return f'{value:,.4f}' if abs(value) < 100 else f'{value:,.0f}'
  return f'{value:,}' if isinstance(value, int) else str(value)


def report(points: Sequence[Point], root: str) -> list[dict]:
  """Writes results.csv, results.md, eval_curves.png and by_<key>.png under `root`."""
  rows = [point_row(p, root) for p in points]
  os.makedirs(root, exist_ok=True)
  columns = list(rows[0])
  with open(os.path.join(root, 'results.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    writer.writerows(rows)
  shown = [c for c in columns if c not in ('overrides', 'error')]
  lines = ['| ' + ' | '.join(shown) + ' |', '|' + '---|' * len(shown)]
  lines += ['| ' + ' | '.join(_fmt(r[c]) for c in shown) + ' |' for r in rows]
  with open(os.path.join(root, 'results.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  _plot_curves(points, root)
  _plot_by_key(points, rows, root)
  return rows


def _plot_curves(points: Sequence[Point], root: str) -> None:
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for p in points:
    path = os.path.join(root, 'sweep', p.name, 'metrics.jsonl')
    records = [r for r in (read_jsonl(path) if os.path.exists(path) else []) if 'eval/loss' in r]
    if records:
      ax.plot([r['step'] for r in records], [r['eval/loss'] for r in records], marker='.',
              label=p.name)
  ax.set(xlabel='step', ylabel='eval loss', title='eval loss per point')
  ax.grid(alpha=0.3)
  if ax.lines:
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(root, 'eval_curves.png'), dpi=110)
  plt.close(fig)


def _plot_by_key(points: Sequence[Point], rows: Sequence[dict], root: str) -> None:
  """Final eval loss against each swept key (other than seed): mean with min-max over the rest."""
  keys = sorted({k for p in points for k in p.swept if k != 'seed'})
  for key in keys:
    groups: dict[str, list[float]] = {}
    for p, r in zip(points, rows):
      if key in p.overrides and r['final_eval_loss'] is not None:
        groups.setdefault(str(p.overrides[key]), []).append(r['final_eval_loss'])
    if not groups:
      continue
    labels = list(groups)
    means = np.array([np.mean(groups[g]) for g in labels])
    spread = np.array([[means[i] - min(groups[g]), max(groups[g]) - means[i]]
                       for i, g in enumerate(labels)]).T
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.errorbar(range(len(labels)), means, yerr=spread, fmt='o', capsize=5)
    for i, g in enumerate(labels):
      ax.scatter([i] * len(groups[g]), groups[g], s=12, color='gray', alpha=0.6)
    ax.set_xticks(range(len(labels)), labels)
    ax.set(xlabel=key, ylabel='final eval loss', title=f'final eval loss by {key} (min-max)')
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(root, f'by_{key.replace(".", "_")}.png'), dpi=110)
    plt.close(fig)


def dry_run(experiment: str, points: Sequence[Point], root: str,
            extra_args: Sequence[str] = ()) -> list[str]:
  """One shell command per point (for a cluster scheduler), printed and returned."""
  check_points(points, extra_args)
  lines = [shlex.join(command(experiment, p, root, extra_args)) for p in points]
  print('\n'.join(lines))
  return lines
