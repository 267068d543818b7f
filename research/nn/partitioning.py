"""Logical axis names for activations: the model names the axes of what it computes ('batch',
'length', 'embed', 'heads', 'kv', 'mlp', 'vocab', 'experts'), and the caller maps names to mesh
axes (research/parallel.py, ACTIVATION_RULES, set with `parallel.activation_sharding`). Without
that mapping (e.g. on one device) every constraint is a no-op."""

import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


def logical_spec(shape: Sequence[int], names: Sequence[Optional[str]]) -> Optional[P]:
  """The PartitionSpec of an array of `shape` whose axes are `names`, under the current rules and
  mesh: each name's mesh axes, minus those of size 1, already used, or not dividing the axis.
  None when no rules or mesh are set."""
  rules = dict(nn.get_logical_axis_rules())
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh.empty:
    return None
  used, dims = set(), []
  for size, name in zip(shape, names):
    axes = rules.get(name) or ()
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    keep = [a for a in axes if a not in used and mesh.shape[a] > 1]
    while keep and size % math.prod(mesh.shape[a] for a in keep):
      keep.pop()
    used.update(keep)
    dims.append(tuple(keep) if len(keep) > 1 else (keep[0] if keep else None))
  return P(*dims)


def constrain(x: jnp.ndarray, names: Sequence[Optional[str]]) -> jnp.ndarray:
  """x, with its sharding pinned to its logical axis `names` (one per axis)."""
  spec = logical_spec(x.shape, names)
  return x if spec is None else jax.lax.with_sharding_constraint(x, spec)
