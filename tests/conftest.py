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


def tiny_sft_config(corpus):
  """A tiny SFT run on sorting questions: the policy the RL tests (PPO, GRPO) start from."""
  c = tiny_config(corpus, steps=4, seq_len=48, batch_size=4, eval_every=4, checkpoint_every=4)
  c.stage = 'sft'
  c.model.max_len = 64
  c.sft.update(num_train=64, num_held_out=16, max_new_tokens=4, kinds=('sort',))
  return c


@pytest.fixture(scope='session')
def sft_run(tiny_corpus, tmp_path_factory):
  from research import runs  # pylint: disable=g-import-not-at-top
  from research.train import sft  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp('sft'))
  c = tiny_sft_config(tiny_corpus)
  runs.write_config(c, workdir)
  sft.train(c, workdir)
  return workdir
