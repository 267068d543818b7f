"""The group-relative losses of research/rl.py (GRPO, Dr. GRPO, DAPO, RLOO) against hand
computations."""

import jax.numpy as jnp
import numpy as np
import pytest

from research import rl


def test_group_advantages_by_hand():
  rewards = jnp.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])  # Mean .5, std .5; all equal.
  for kind in ('grpo', 'dapo'):
    np.testing.assert_allclose(rl.group_advantages(rewards, kind), [[1, -1, -1, 1], [0] * 4],
                               atol=1e-5)
  np.testing.assert_allclose(rl.group_advantages(rewards, 'dr_grpo'),
                             [[.5, -.5, -.5, .5], [0] * 4], atol=1e-6)
  # Leave-one-out: 1 - (0 + 0 + 1) / 3 and 0 - (1 + 0 + 1) / 3.
  np.testing.assert_allclose(rl.group_advantages(rewards, 'rloo'),
                             [[2 / 3, -2 / 3, -2 / 3, 2 / 3], [0] * 4], atol=1e-6)
  with pytest.raises(ValueError, match='unknown group loss'):
    rl.group_advantages(rewards, 'ppo')


def test_length_normalisation_of_each_variant_with_unequal_lengths():
  """Replies of 1 and 3 tokens (of 4 positions), advantages 2 and 1, ratio 1: token losses -2 and
  -1, -1, -1. GRPO/RLOO: mean of the replies' means; DAPO: mean over the 4 tokens; Dr. GRPO: each
  reply's sum over the 4 positions, then the mean."""
  mask = jnp.array([[1, 0, 0, 0], [1, 1, 1, 0]], jnp.float32)
  logp = jnp.zeros((2, 4))
  adv = jnp.array([2.0, 1.0])
  expected = {'grpo': (-2 - 1) / 2, 'rloo': (-2 - 1) / 2, 'dapo': -(2 + 3) / 4,
              'dr_grpo': (-2 / 4 - 3 / 4) / 2}
  for kind, want in expected.items():
    loss, metrics = rl.group_policy_loss(logp, logp, adv, mask, kind, 0.2, 0.2)
    np.testing.assert_allclose(loss, want, rtol=1e-6, err_msg=kind)
    assert float(metrics['clip_frac']) == 0 and abs(float(metrics['approx_kl'])) < 1e-7


def test_clip_higher_is_asymmetric():
  """Ratio 1.5 on a positive advantage is clipped at 1 + clip_high; ratio 0.5 on a negative one
  at 1 - clip_low (the pessimistic side of each)."""
  mask = jnp.ones((2, 1))
  old = jnp.zeros((2, 1))
  logp = jnp.log(jnp.array([[1.5], [0.5]]))
  adv = jnp.array([1.0, -1.0])
  loss, metrics = rl.group_policy_loss(logp, old, adv, mask, 'dapo', clip_low=0.2, clip_high=0.28)
  np.testing.assert_allclose(loss, (-1.28 + 0.8) / 2, rtol=1e-5)
  assert float(metrics['clip_frac']) == 1.0
  symmetric, _ = rl.group_policy_loss(logp, old, adv, mask, 'dapo', 0.2, 0.2)
  np.testing.assert_allclose(symmetric, (-1.2 + 0.8) / 2, rtol=1e-5)


def test_dynamic_sampling_and_overlong_shaping():
  keep = rl.keep_informative_groups(np.array([[1, 1, 1], [0, 1, 0], [0, 0, 0]]))
  assert keep.tolist() == [False, True, False]
  np.testing.assert_allclose(rl.overlong_penalty([10, 12, 14, 16], max_len=16, buffer=4),
                             [0, 0, -0.5, -1])
