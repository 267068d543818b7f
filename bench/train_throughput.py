"""Training throughput of the project's real train step: ms/step, tokens/s and MFU.

  python bench/train_throughput.py                 # workloads a, b, c, d
  python bench/train_throughput.py --workloads=a --steps=20 --json

MFU = tokens/s * (6N + 12 L d T) / peak, N = parameters in matrix multiplies (the tied
embedding counts once, as the unembedding; of the experts only the top-k active ones), L layers,
d width, T sequence length (attention counted as if not causal, as in PaLM). On known
accelerators the peak is the data sheet's bf16 figure. On CPU it is measured: a large jitted
float32 matmul, timed after every window of steps (the best of 3 runs), because a shared
machine's speed drifts by 2x within a minute; MFU is the median over windows of (the window's
FLOP/s / the matmul's FLOP/s next to it), with its p10-p90 spread; windows are timed for at
least --steps steps and --min-seconds seconds (a fast workload gets more of them). Token ids are
random (speed does not depend on them) but batches go through the real batching code, built
ahead in a thread as the training loop builds them, so the data-wait share is real.
"""

import argparse
import importlib
import json
import os
import resource
import sys
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from research import config as config_lib
from research import perf
from research.data.prefetch import Prefetcher
from research.nn.transformer import DecoderLM
from research.train import loop, pretrain
from research.train.optimizer import make_optimizer

CHAR_VOCAB = 65  # nanoGPT's Shakespeare characters.


def workload(name: str):
  """(config, vocab size) of a named workload."""
  c = importlib.import_module('experiments.pretrain_small').get_config()
  if name == 'c':
    return c, 232  # pretrain_small as shipped (char vocabulary of the stdlib corpus).
  shapes = {'a': (4, 4, 128, 64, 12), 'b': (6, 6, 384, 256, 16), 'd': (6, 6, 384, 256, 16)}
  layers, heads, width, seq, batch = shapes[name]
  c.model.update(num_layers=layers, num_heads=heads, d_model=width, max_len=seq, dropout=0.0)
  c.train.update(seq_len=seq, batch_size=batch, grad_accum_steps=1)
  if name == 'd':  # (b) with every FFN an MoE of 4 experts, top-2, each half as wide: the
    # active FFN width per token equals (b)'s.
    c.model.update(moe_every=1, num_experts=4, moe_top_k=2,
                   ffn_multiplier=c.model.ffn_multiplier / 2)
  return c, CHAR_VOCAB


def setup(config, vocab: int):
  """(task, initial state, compiled train step, compile seconds) of the project's pretraining
  step for `config`, on random token ids."""
  model = DecoderLM(config_lib.model_config(config, vocab))
  tokens = np.random.default_rng(0).integers(0, vocab, 200_000).astype(np.uint16)
  task = pretrain.make_task(config, model, tokens, tokens)
  flat = config_lib.flat_optimizer(config)
  tx = make_optimizer(config.train, flat)
  state = jax.jit(lambda k: loop.TrainState(p := task.init_params(k), tx.init(p)))(
      jax.random.key(0))
  t0 = time.perf_counter()
  step_fn = loop.make_train_step(task, tx, 0, flat_optimizer=flat).lower(
      state, task.train_batch(0, 0, slice(None)), np.int32(0)).compile()
  return task, state, step_fn, time.perf_counter() - t0


def bench(config, vocab: int, steps: int, warmup: int, window: int,
          peak: Optional[float], min_seconds: float = 0.0) -> dict:
  """Times at least `steps` train steps after `warmup`, in windows of `window` steps dispatched
  back to back (the training loop, too, dispatches step n+1 before it reads step n's loss), and
  more windows until `min_seconds` have passed (so that a fast workload's median is over enough
  windows). peak: the hardware's FLOP/s, or None to measure it with a large matmul after every
  window (see the module docstring)."""
  t = config.train
  task, state, step_fn, compile_sec = setup(config, vocab)
  tokens = t.batch_size * t.seq_len
  flops_per_step = task.flops_per_token(state.params) * tokens
  probe = perf.matmul_probe() if peak is None else lambda: peak
  for i in range(warmup):
    state, out = step_fn(state, task.train_batch(i, 0, slice(None)), np.int32(i))
  jax.block_until_ready(state)
  times, peaks, data_sec = [], [], 0.0
  start, began = warmup, time.perf_counter()
  with Prefetcher(lambda i: task.train_batch(i, 0, slice(None))) as batches:  # As loop.run.
    while start < warmup + steps or time.perf_counter() - began < min_seconds:
      t0 = time.perf_counter()
      for i in range(start, start + window):
        t1 = time.perf_counter()
        batch = batches.get((i,), (i + 1,))
        data_sec += time.perf_counter() - t1
        state, out = step_fn(state, batch, np.int32(i))
      jax.block_until_ready((state, out))
      times.append((time.perf_counter() - t0) / window)
      peaks.append(max(probe() for _ in range(3)))  # The first run is slow after a long step.
      start += window
  times, peaks = np.array(times), np.array(peaks)
  mfu = flops_per_step / times / peaks
  return dict(params=perf.param_count(state.params), steps=len(times) * window,
              ms_median=float(np.median(times) * 1e3),
              ms_p10=float(np.percentile(times, 10) * 1e3),
              ms_p90=float(np.percentile(times, 90) * 1e3),
              tokens_per_sec=float(tokens / np.median(times)),
              flops_per_token=flops_per_step / tokens,
              peak=float(np.median(peaks)), mfu=float(np.median(mfu)),
              mfu_p10=float(np.percentile(mfu, 10)), mfu_p90=float(np.percentile(mfu, 90)),
              compile_sec=compile_sec, data_frac=float(data_sec / np.sum(times * window)),
              final_loss=float(out['loss']))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workloads', default='a,b,c,d')
  parser.add_argument('--steps', type=int, default=20, help='timed steps, at least')
  parser.add_argument('--min-seconds', type=float, default=10.0,
                      help='keep timing windows until this long has passed (fast workloads)')
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--window', type=int, default=4,
                      help='steps per timing window (the MFU and ms/step spreads are over windows)')
  parser.add_argument('--json', action='store_true', help='print one JSON object per workload')
  args = parser.parse_args()
  perf.tune_cpu_runtime()  # As launch.py does.
  source = jax.devices()[0].device_kind
  peak = perf.datasheet_peak(source)  # One device's (the benchmark runs on one).
  source += ', bf16 data sheet' if peak else ', measured fp32 matmul next to each window'
  rows = []
  for name in args.workloads.split(','):
    config, vocab = workload(name)
    r = dict(workload=name, **bench(config, vocab, args.steps, args.warmup, args.window, peak,
                                    args.min_seconds))
    rows.append(r)
    if args.json:
      print(json.dumps(r), flush=True)
  if args.json:
    return
  print(f'peak: {source}; MFU = tokens/s * (6N + 12*L*d*T) / peak')
  print(f'{"workload":8} {"params":>10} {"steps":>5} {"ms/step":>9} {"p10-p90":>13} '
        f'{"tokens/s":>10} {"peak GF/s":>9} {"MFU":>6} {"p10-p90":>11} {"compile s":>9} '
        f'{"data":>6}')
  for r in rows:
    print(f'{r["workload"]:8} {r["params"]:>10,} {r["steps"]:>5} {r["ms_median"]:>9.1f} '
          f'{r["ms_p10"]:>6.1f}-{r["ms_p90"]:<6.1f} {r["tokens_per_sec"]:>10,.0f} '
          f'{r["peak"] / 1e9:>9.1f} {r["mfu"]:>6.1%} {r["mfu_p10"]:>5.1%}-{r["mfu_p90"]:<5.1%} '
          f'{r["compile_sec"]:>9.1f} {r["data_frac"]:>6.2%}')
  rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(f'peak memory (max RSS): {rss_mb:.0f} MB')


if __name__ == '__main__':
  main()
