"""LoRA (Hu et al. 2021) as a transform of the parameter pytree: W -> W + (alpha / rank) A @ B.

The model code never changes: a stage trains only the adapters {A, B} of the weights whose path
matches one of the target regexes, and applies the model to `merge(base, adapters)`. Merging is
also how adapters are exported: the merged pytree is an ordinary set of model parameters.

  adapters = init(key, base, rank=8, targets=(r'attn/(query|value)/kernel$',))
  logits = model.apply({'params': merge(base, adapters, alpha=16, rank=8)}, tokens)
"""

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import traverse_util

from research.errors import UserError

Params = Any


def target_paths(params: Params, targets: Sequence[str]) -> list[tuple[str, ...]]:
  """Paths of the (at least 2-D) parameters whose '/'-joined path one of `targets` searches."""
  flat = traverse_util.flatten_dict(params)
  return [path for path, p in flat.items()
          if len(p.shape) >= 2 and any(re.search(t, '/'.join(path)) for t in targets)]


def init(key: jax.Array, params: Params, rank: int, targets: Sequence[str]) -> Params:
  """Adapters for the targeted weights of `params` (only their shapes are read).

  A kernel W [..., d_in, d_out] gets a: [..., d_in, rank] ~ N(0, 1/d_in) and b: [..., rank, d_out]
  = 0, so the merged weights start equal to the base. Returns a pytree mirroring `params` with
  {'a', 'b'} under each targeted path.
  """
  paths = target_paths(params, targets)
  if not paths:
    names = ', '.join('/'.join(p) for p in traverse_util.flatten_dict(params))
    raise UserError(f'lora.targets={tuple(targets)} match no parameter with 2+ dimensions; '
                    f'parameter paths are: {names[:300]}...; give regexes that match some.')
  flat = traverse_util.flatten_dict(params)
  adapters = {}
  for path, k in zip(paths, jax.random.split(key, len(paths))):
    shape = flat[path].shape
    adapters[path + ('a',)] = jax.random.normal(k, (*shape[:-1], rank), jnp.float32) / jnp.sqrt(
        shape[-2])
    adapters[path + ('b',)] = jnp.zeros((*shape[:-2], rank, shape[-1]), jnp.float32)
  return traverse_util.unflatten_dict(adapters)


def merge(params: Params, adapters: Params, alpha: float, rank: int) -> Params:
  """`params` with W + (alpha / rank) a @ b for every adapted weight (others unchanged)."""
  flat = traverse_util.flatten_dict(params)
  ab = traverse_util.flatten_dict(adapters)
  for path in {p[:-1] for p in ab}:
    w = flat[path]
    flat[path] = w + (alpha / rank) * (ab[path + ('a',)] @ ab[path + ('b',)]).astype(w.dtype)
  return traverse_util.unflatten_dict(flat)
