"""Where one train step's time goes: a jax.profiler trace of the project's real train step (the
workloads of train_throughput.py), its XLA operations grouped by what they compute.

  python bench/profile_step.py --workload=b --steps=3

Groups: matmuls of the dense layers (projections, FFN, unembedding), the attention matmuls (scores
and the weighted sum of values), and the rest by the operations fused (elementwise, reductions,
transposes). 'idle' is the step time no operation covers (scheduling between operations). On CPU,
XLA runs independent operations concurrently, so a matmul that shares the cores with another
shows a longer time than it would alone; the total can exceed the step time. The train step runs
its matmuls as Eigen tasks on CPU (perf.compiler_options): the trace records their launch, not
their work, so 'idle' there holds the time of most matmuls. `--ynn` profiles the step compiled
with XLA's default YNNPACK fusions instead, whose matmul operations are timed.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from bench import train_throughput  # pylint: disable=g-import-not-at-top
from research import perf


def op_groups(hlo: str) -> dict[str, str]:
  """{instruction name: group} for the instructions of the compiled module's text."""
  groups = {}
  bodies = dict(re.findall(r'\n(?:ENTRY )?%?([\w.\-]+) \([^\n]*\{\n(.*?)\n\}', hlo, re.S))
  for line in hlo.split('\n'):
    m = re.match(r'\s+(?:ROOT )?%?([\w.\-]+) = \S+ ([\w\-]+)\(', line)
    if not m:
      continue
    name, op = m.groups()
    body = line
    if op == 'fusion':
      called = re.search(r'calls=%?([\w.\-]+)', line)
      body = bodies.get(called.group(1), '') if called else ''
    meta = re.search(r'op_name="([^"]+)"', line)
    where = meta.group(1) if meta else ''
    if re.search(r'= \S+ dot\(', body) or op == 'dot':
      attention = re.search(r'attn/(?!(query|key|value|out)/)', where)  # Not a projection.
      groups[name] = 'attention matmuls' if attention else 'dense matmuls'
    else:
      ops = set(re.findall(r'= \S+ ([a-z\-]+)\(', body)) - {'parameter', 'constant', 'bitcast',
                                                            'broadcast', 'reshape'}
      kind = ('transposes/copies' if ops and ops <= {'copy', 'transpose'} else
              'reductions' if ops & {'reduce', 'reduce-window'} else 'elementwise')
      groups[name] = kind
  return groups


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workload', default='a', choices=['a', 'b', 'c', 'd'])
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--ynn', action='store_true',
                      help="XLA:CPU's default YNNPACK fusions (matmul operations in the trace)")
  args = parser.parse_args()
  perf.tune_cpu_runtime()  # As launch.py does.
  config, vocab = train_throughput.workload(args.workload)
  if args.ynn:
    perf.compiler_options = lambda: None
  task, state, step_fn, _ = train_throughput.setup(config, vocab)
  groups = op_groups(step_fn.as_text())
  batch = task.train_batch(0, 0, slice(None))
  for i in range(3):  # Warm-up.
    state, out = step_fn(state, batch, np.int32(i), train_throughput.ONE)
  jax.block_until_ready(out)
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      t0 = time.perf_counter()
      for i in range(args.steps):
        state, out = step_fn(state, batch, np.int32(i), train_throughput.ONE)
        jax.block_until_ready(out)
      step_ms = (time.perf_counter() - t0) / args.steps * 1e3
    [path] = glob.glob(os.path.join(tmp, '**', '*.trace.json.gz'), recursive=True)
    with gzip.open(path) as f:
      events = [e for e in json.load(f)['traceEvents']
                if e.get('ph') == 'X' and e.get('name') in groups]
  total = collections.Counter()
  for e in events:
    total[groups[e['name']]] += e['dur'] / 1e3 / args.steps
  spans = sorted((e['ts'], e['ts'] + e['dur']) for e in events)
  covered, end = 0.0, -np.inf
  for start, stop in spans:  # The union of the operations' intervals.
    covered += max(0.0, stop - max(start, end))
    end = max(end, stop)
  total['idle'] = max(0.0, step_ms - covered / 1e3 / args.steps)
  print(f'workload {args.workload}: {step_ms:.1f} ms/step (under the profiler), '
        f'{len(set(e["name"] for e in events))} operations per step')
  print(f'{"group":20} {"ms/step":>9} {"share":>7}')
  for name, ms in total.most_common():
    print(f'{name:20} {ms:9.1f} {ms / step_ms:7.1%}')


if __name__ == '__main__':
  main()
