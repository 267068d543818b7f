"""optax optimiser and learning-rate schedules, built from the `train.*` config keys."""

import jax
import ml_collections
import optax

from research.errors import UserError


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
  raise UserError(f"train.schedule={cfg.schedule!r} is not one of ('cosine', 'linear', 'constant').")


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; weight decay only on matrices (not norms or biases).

  With train.grad_accum_steps = k > 1 the update is applied every k calls (optax.MultiSteps),
  each call seeing one micro-batch of train.batch_size / k examples.
  """
  tx = optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
      optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                  mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)))
  if cfg.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum_steps)
  return tx
