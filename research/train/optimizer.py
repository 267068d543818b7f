"""optax optimiser and learning-rate schedules, built from the `train.*` config keys."""

import jax
import jax.numpy as jnp
import ml_collections
import optax

from research.errors import UserError


SCHEDULES = ('cosine', 'linear', 'constant')


def make_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then `cosine` or `linear` decay to lr * min_lr_ratio
  at `steps` (or `constant`). Counted in optimiser steps."""
  peak, warmup, steps = cfg.learning_rate, cfg.warmup_steps, cfg.steps
  end = peak * cfg.min_lr_ratio
  if cfg.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(steps, warmup + 1), end)
  if cfg.schedule == 'linear':
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup),
         optax.linear_schedule(peak, end, max(steps - warmup, 1))], [warmup])
  if cfg.schedule == 'constant':
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup),
                                 optax.constant_schedule(peak)], [warmup])
  raise UserError(f'train.schedule={cfg.schedule!r} is not one of {SCHEDULES}.')


def make_optimizer(cfg: ml_collections.ConfigDict,
                   flat: bool = False) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; weight decay only on matrices (not norms or biases).

  With `flat` (config.flat_optimizer: train.flatten_optimizer on a mesh that keeps parameters
  whole), clipping and Adam's moments run over all gradients concatenated into one vector
  (optax.flatten): a few large operations instead of several per parameter (878 -> 569 operations
  in a 4-layer train step; bench/train_throughput.py's (a) -3%). The same maths; the moments are
  then one vector, which the sharding rules cannot split.
  """
  clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity()
  schedule = make_schedule(cfg)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  if flat:
    # optax.adamw is this chain, with its Adam part (and the clipping) flattened.
    tx = optax.chain(optax.flatten(optax.chain(clip, optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2))),
                     optax.add_decayed_weights(cfg.weight_decay, decay_mask),
                     optax.scale_by_learning_rate(schedule))
  else:
    tx = optax.chain(clip, optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2,
                                       weight_decay=cfg.weight_decay, mask=decay_mask))
  return tx


def grad_norm(grads, flat: bool) -> jax.Array:
  """The global L2 norm of `grads`. With `flat` (train.flatten_optimizer) it is taken over the
  same concatenation as the optimizer's clipping, which XLA then computes once for both."""
  if flat:
    grads = jnp.concatenate([jnp.reshape(g, [-1]) for g in jax.tree.leaves(grads)])
  return optax.tree.norm(grads)
