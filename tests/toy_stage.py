"""A toy stage, registered by tests/test_launch.py: what a new stage is (README, "Add a stage").

It needs a pretrain run (its workdir arrives as train.init_from), owns the config section `toy`,
and fits y = x @ w + noise by least squares on the shared loop.
"""

import os

import jax.numpy as jnp
import ml_collections
import numpy as np

from research.errors import UserError
from research.train import loop, stages


def train(config: ml_collections.ConfigDict, workdir: str) -> loop.RunResult:
  if not os.path.exists(os.path.join(config.train.init_from, 'summary.json')):
    raise UserError('the toy stage needs a finished pretrain run in train.init_from')
  rng = np.random.default_rng(config.seed)
  x = rng.normal(size=(256, 4)).astype(np.float32)
  y = x @ np.array([1.0, -2.0, 0.5, 3.0], np.float32) + config.toy.noise * rng.normal(size=256)
  rows = config.train.batch_size

  def loss_fn(params, batch, key):
    del key
    return jnp.mean((batch['x'] @ params['w'] - batch['y']) ** 2), {}

  def train_batch(step, micro, part):
    i = (step * rows) % 256
    return {'x': x[i:i + rows][part], 'y': y[i:i + rows].astype(np.float32)[part]}

  task = loop.Task(
      init_params=lambda key: {'w': jnp.zeros(4)}, loss_fn=loss_fn,
      eval_fn=lambda params, batch: {'loss': loss_fn(params, batch, None)[0]},
      train_batch=train_batch, eval_batches=[train_batch(0, 0, slice(None))],
      tokens_per_step=rows, flops_per_token=lambda params: 8.0)
  return loop.run(config, workdir, task)


def sections() -> dict[str, ml_collections.ConfigDict]:
  return {'toy': ml_collections.ConfigDict(dict(noise=0.1))}


STAGE = stages.Stage(name='toy', train=train, needs=(stages.Need('pretrain'),),
                     sections=sections)
