"""Shared fixtures. Multi-device tests run in subprocesses that set XLA_FLAGS themselves."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Tests run on the CPU; with libtpu installed (for tests/test_compile.py) JAX would first look for
# a TPU in every process. Compiling for a TPU topology works either way.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

TINY_TEXT = ''.join(f'def f{i}(x):\n    return x * {i % 7} + {i % 5}\n\n' for i in range(400))


@pytest.fixture(scope='session')
def tiny_corpus(tmp_path_factory) -> str:
  """A small, very regular text file (~14 KB) that a tiny model learns in a few dozen steps."""
  path = tmp_path_factory.mktemp('data') / 'tiny.txt'
  path.write_text(TINY_TEXT)
  return str(path)


def tiny_config(data_path: str, **train):
  """pretrain_small shrunk to a 1-layer, 32-wide model and a few steps."""
  from experiments import pretrain_small  # pylint: disable=g-import-not-at-top
  c = pretrain_small.get_config()
  c.data.path = data_path
  c.data.val_fraction = 0.2
  c.model.update(num_layers=1, num_heads=2, d_model=32, max_len=32)
  c.train.update(dict(dict(steps=8, batch_size=4, seq_len=16, warmup_steps=2, log_every=1,
                           eval_every=4, eval_batches=2, checkpoint_every=4), **train))
  c.sampling.update(max_new_tokens=8, prompt='def ')
  return c
