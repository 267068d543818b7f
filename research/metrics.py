"""Metrics: JSONL + TensorBoard writers, the progress line and the loss-curve plot."""

import json
import math
import os
import time
from typing import Mapping, Optional, Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import tensorboardX


def read_jsonl(path: str) -> list[dict]:
  """The records of a metrics.jsonl, a value written as null (not finite) read as NaN."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [{k: float('nan') if v is None else v for k, v in json.loads(line).items()}
            for line in f if line.strip()]


class MetricsWriter:
  """Appends one JSON object per logged step to `metrics.jsonl` and mirrors scalars to TensorBoard.

  On resume from `resume_step`, records of later steps (from a run that died after its last
  checkpoint) are dropped so the file reads like one uninterrupted run; TensorBoard is told to
  purge them too (its purge_step).
  """

  def __init__(self, workdir: str, resume_step: int = 0, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    if not enabled:
      return
    kept = [r for r in read_jsonl(self.path) if r['step'] <= resume_step]
    with open(self.path + '.tmp', 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in kept)
    os.replace(self.path + '.tmp', self.path)
    self.file = open(self.path, 'a')
    self.tb = tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard'),
                                         purge_step=resume_step + 1 if resume_step else None)

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    # Strict JSON: a value that is not finite (a diverging run's) is written as null.
    record = {'step': step, **{k: float(v) if math.isfinite(float(v)) else None
                               for k, v in metrics.items()}}
    self.file.write(json.dumps(record, allow_nan=False) + '\n')
    self.file.flush()
    for k, v in metrics.items():
      self.tb.add_scalar(k, float(v), step)

  def close(self) -> None:
    if self.enabled:
      self.file.close()
      self.tb.close()


def plot_losses(metrics_path: str, out_png: str, keys: tuple[str, ...] = ('train/loss', 'eval/loss'),
                title: str = '') -> None:
  """Draws the curves of `keys` from a metrics.jsonl into a PNG."""
  plot_panels(metrics_path, out_png, {'loss (nats/token)': keys}, title)


def plot_panels(metrics_path: str, out_png: str, panels: Mapping[str, Sequence[str]],
                title: str = '') -> None:
  """One panel per {y label: keys} of a metrics.jsonl, side by side, into a PNG."""
  records = read_jsonl(metrics_path)
  fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels) ** 0.75, 4.5), squeeze=False)
  for ax, (ylabel, keys) in zip(axes[0], panels.items()):
    for key in keys:
      points = [(r['step'], r[key]) for r in records if key in r]
      if points:
        ax.plot(*zip(*points), label=key, marker='o' if key.startswith('eval') else None, ms=3)
    ax.set_xlabel('step')
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(out_png, dpi=110)
  plt.close(fig)


class Progress:
  """One line per log step: step, loss, tokens/s and ETA (steps measured since the start)."""

  def __init__(self, start_step: int, total_steps: int):
    self.start_step, self.total = start_step, total_steps
    self.t0 = time.perf_counter()

  def line(self, step: int, metrics: Mapping[str, float], extra: Optional[str] = None) -> str:
    done = step - self.start_step
    elapsed = time.perf_counter() - self.t0
    eta = elapsed / max(done, 1) * (self.total - step)
    parts = [f'step {step}/{self.total}']
    parts += [f'{k} {v:.4g}' for k, v in metrics.items()]
    parts.append(f'ETA {int(eta // 60)}m{int(eta % 60):02d}s')
    if extra:
      parts.append(extra)
    return ' | '.join(parts)
