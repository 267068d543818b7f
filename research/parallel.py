"""Device mesh, partition rules and multi-host helpers.

One mesh with axes (data, fsdp, tensor, expert). Parameters are sharded by regex rules over their
path in the train-state pytree (so Adam's moments follow their parameters), batches over
data x fsdp, and activations by the logical axis names the model gives them
(nn/partitioning.py) through ACTIVATION_RULES. The same code runs on 1 CPU, 8 GPUs or a TPU pod
slice: only `mesh.*` changes.
"""

import contextlib
import re
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from research.errors import UserError

AXES = ('data', 'fsdp', 'tensor', 'expert')
BATCH_AXES = ('data', 'fsdp')

# (regex searched in the '/'-joined path, spec per dimension). First match wins; no match means
# replicated. A dimension whose size the mesh axes do not divide stays unsharded.
RULES = (
    (r'attn/(query|key|value)/kernel$', P('fsdp', 'tensor')),  # [d_model, heads * head_dim]
    (r'attn/out/kernel$', P('tensor', 'fsdp')),  # [heads * head_dim, d_model]
    (r'ffn/(wi|wg)/kernel$', P('fsdp', 'tensor')),  # [d_model, hidden]
    (r'ffn/wo/kernel$', P('tensor', 'fsdp')),  # [hidden, d_model]
    (r'experts/(wi|wg)/kernel$', P('expert', 'fsdp', 'tensor')),  # [experts, d_model, hidden]
    (r'experts/wo/kernel$', P('expert', 'tensor', 'fsdp')),  # [experts, hidden, d_model]
    (r'(^|/)embed/embedding$', P('tensor', 'fsdp')),  # [vocab, d_model]
    (r'pos_embed/embedding$', P(None, 'fsdp')),  # [max_len, d_model]
    (r'unembed/kernel$', P('fsdp', 'tensor')),  # [d_model, vocab]
)
# Scanned layers (model.scan_layers) stack a block's parameters on a leading layer axis, which
# stays whole: the rules above then apply to the other axes.
SCANNED = re.compile(r'(^|/)blocks/')

# Logical axes of activations (the names the model gives them, nn/partitioning.py) -> mesh axes.
# The residual stream ('embed') is replicated over 'tensor' and gathered per layer from 'fsdp'.
ACTIVATION_RULES = (
    ('batch', BATCH_AXES),
    ('length', None),
    ('embed', None),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('mlp', 'tensor'),
    ('vocab', ('tensor', 'fsdp')),
    ('experts', 'expert'),
)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh):
  """Within it, functions traced for `mesh` pin their activations by ACTIVATION_RULES (a no-op
  on one device)."""
  if mesh.size == 1:
    yield
    return
  with jax.set_mesh(mesh), nn.logical_axis_rules(ACTIVATION_RULES):
    yield


def make_mesh(cfg: ml_collections.ConfigDict, devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A mesh over all devices (or `devices`, e.g. a TPU topology's to compile for) with the
  `mesh.*` axis sizes; one size may be -1 (the rest). Devices in several TPU slices (multislice,
  joined by the data-centre network) split `data` across the slices and the rest within each."""
  sizes = [cfg[a] for a in AXES]
  devices = jax.devices() if devices is None else list(devices)
  n = len(devices)
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise UserError(f'mesh sizes {dict(zip(AXES, sizes))} must be >= 1, with at most one -1.')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if n % known:
      raise UserError(f'{n} devices cannot be split into mesh {dict(zip(AXES, sizes))}; '
                      f'make the fixed sizes divide {n}.')
    sizes[sizes.index(-1)] = n // known
  if int(np.prod(sizes)) != n:
    raise UserError(f'mesh {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices but '
                    f'{n} are present; make the product of mesh.* equal {n} (or use -1).')
  # Auto axes: XLA propagates shardings through the model; params, batches and the activations
  # the model names (ACTIVATION_RULES) are pinned.
  auto = (jax.sharding.AxisType.Auto,) * len(AXES)
  slices = len({getattr(d, 'slice_index', 0) for d in devices})
  if slices == 1:
    return jax.make_mesh(tuple(sizes), AXES, axis_types=auto, devices=devices)
  if sizes[0] % slices:
    raise UserError(f'{slices} TPU slices need mesh.data={sizes[0]} to be a multiple of {slices} '
                    '(data parallelism runs across slices); set mesh.data accordingly.')
  grid = mesh_utils.create_hybrid_device_mesh(
      (sizes[0] // slices, *sizes[1:]), (slices,) + (1,) * (len(AXES) - 1), devices)
  return Mesh(grid, AXES, axis_types=auto)


def path_str(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh) -> P:
  """The PartitionSpec of one array: the first matching rule, minus axes that do not divide."""
  for pattern, spec in RULES:
    if re.search(pattern, path) and len(shape) == len(spec) + 1 and SCANNED.search(path):
      spec = P(None, *spec)
    if re.search(pattern, path) and len(spec) == len(shape):
      dims = []
      for size, axis in zip(shape, spec):
        dims.append(axis if axis is not None and size % mesh.shape[axis] == 0 else None)
      return P(*dims)
  return P()


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
  """NamedShardings for every leaf of a (abstract) train state, by the rules above."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, spec_for(path_str(path), x.shape, mesh)),
      abstract_state)


def batch_sharding(mesh: Mesh, stacked: bool = False) -> NamedSharding:
  """Batches: the example dimension split over data x fsdp; it is the leading one, or with
  `stacked` (micro-batches [accum, rows, ...]) the second."""
  return NamedSharding(mesh, P(None, BATCH_AXES) if stacked else P(BATCH_AXES))


def check_batch(global_batch: int, mesh: Mesh) -> None:
  """Every micro-batch must split evenly over the batch axes and over the processes."""
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  if global_batch % shards or global_batch % jax.process_count():
    raise UserError(f'the micro-batch of {global_batch} rows does not split over data x fsdp = '
                    f'{shards} devices and {jax.process_count()} processes; make train.batch_size / '
                    'train.grad_accum_steps a multiple of both.')


def check_fits(config: ml_collections.ConfigDict) -> None:
  """Raises UserError unless config.mesh fits the devices and each micro-batch splits over its
  batch axes: checked before a run writes anything."""
  check_batch(config.train.batch_size // config.train.grad_accum_steps,
              make_mesh(config.mesh))


def process_slice(global_batch: int) -> slice:
  """The rows of each global batch this process reads (all of them on one host)."""
  per = global_batch // jax.process_count()
  return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles this process's rows of a batch into global arrays sharded as `sharding`."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def to_host(tree: Any) -> Any:
  """Numpy copies of a tree of (global) arrays, whole on every process (gathered across
  processes when there are several)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def initialize_distributed(coordinator_address: str = '', num_processes: int = 0,
                           process_id: int = -1) -> None:
  """Joins JAX's multi-controller runtime (one process per host).

  With no arguments JAX detects the cluster itself (Cloud TPU, SLURM, Open MPI, Kubernetes);
  else give all three (e.g. several local CPU processes). CPU processes talk through gloo.
  """
  if jax.config.jax_platforms in (None, '', 'cpu') or 'cpu' in str(jax.config.jax_platforms):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if coordinator_address:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    jax.distributed.initialize()
