"""Ahead-of-time compilation of an experiment's train step for a TPU slice, on this host.

libtpu compiles for a named topology without TPUs (`jax.experimental.topologies`): the step that
`launch.py --mode=train` would run there (the stage's loss, the optimiser, the mesh and its
shardings) is lowered onto the slice's devices and compiled, and the compiled program says what
each chip holds and does. The report gives, per chip: parameters and optimiser state, XLA's
temporaries and the total against the chip's HBM, an analytic floor beside it; compiled FLOPs
against the model's (6N + attention); the step time and MFU projected at the chip's bf16 peak;
and the collectives in the program. A configuration that does not fit is refused in one line.

  python launch.py --experiment=gpt2_124m --mode=compile --topology=v5e-16
"""

import copy
import dataclasses
import importlib.util
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from research import config as config_lib
from research import parallel
from research import perf
from research.errors import UserError
from research.nn.config import ModelConfig
from research.train import loop, stages
from research.train.optimizer import make_optimizer

GIB = 2**30
# name -> (topology dimensions, TensorCores per chip counted in the slice name 'v4-8', ...).
GENERATIONS = {'v4': (3, 2), 'v5p': (3, 2), 'v5e': (2, 1), 'v6e': (2, 1)}
COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')


def topology_shape(generation: str, chips: int) -> str:
  """The chip grid of a slice of `chips` chips: '4x4' for a v5e-16, '4x4x4' for 64 v5p chips."""
  dims, _ = GENERATIONS[generation]
  grid = [1] * dims
  while math.prod(grid) < chips:
    grid[grid.index(min(grid))] *= 2
  grid.sort()
  if dims == 3 and grid[0] == 1:  # Slices of one host: 2x2x1.
    grid = grid[1:] + [1]
  if math.prod(grid) != chips:
    raise UserError(f'{generation} slices have a power of two chips, not {chips}.')
  return 'x'.join(map(str, grid))


def topology_devices(topology: str, num_slices: int = 1) -> tuple[list[Any], int]:
  """(devices, chips) of a TPU slice (`num_slices` of them over the data-centre network), named
  as Cloud TPU names them ('v5e-16', 'v4-8', 'v5p-128': the number counts TensorCores on v4 and
  v5p, chips on v5e and v6e) or by chip grid ('v5e:4x4', 'v5p:4x4x4')."""
  m = re.fullmatch(r'(v4|v5p|v5e|v6e)(?:-(\d+)|:(\d+(?:x\d+){1,2}))', topology)
  if not m:
    raise UserError(f'--topology={topology!r} is not a TPU slice name; give e.g. v5e-16, v4-8, '
                    'v5p-128, v6e-64 or a chip grid such as v5e:4x4 or v5p:4x4x4.')
  generation, count, grid = m.groups()
  if count:
    cores = GENERATIONS[generation][1]
    if int(count) % cores:
      raise UserError(f'{topology} counts TensorCores, {cores} per chip: give a multiple of '
                      f'{cores}.')
    grid = topology_shape(generation, int(count) // cores)
  if importlib.util.find_spec('libtpu') is None:
    raise UserError('compiling for a TPU needs libtpu (it compiles without a TPU): '
                    'pip install -r requirements-tpu.txt')
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  # Compiling touches no TPU, so several processes may load libtpu at once (sweeps, tests).
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  try:
    desc = topologies.get_topology_desc(
        platform='tpu', topology_name=f'{generation}:{grid}', num_slices=num_slices,
        chips_per_host_bounds=(*(min(int(d), 2) for d in grid.split('x')[:2]), 1))
  except Exception as e:  # pylint: disable=broad-except (libtpu raises several kinds)
    raise UserError(f'libtpu cannot describe {generation}:{grid} x {num_slices} slices: '
                    f'{str(e).splitlines()[0][:200]}') from None
  chips = math.prod(int(d) for d in grid.split('x')) * num_slices
  return list(desc.devices), chips


def _bytes_per_device(tree: Any) -> int:
  """Bytes each device holds of an abstract pytree with shardings (the largest shard)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shard = x.sharding.shard_shape(x.shape)
    total += math.prod(shard) * jnp.dtype(x.dtype).itemsize
  return total


def collectives(hlo: str) -> dict[str, tuple[int, int]]:
  """{collective: (count, bytes of their results)} in a compiled module's text. Asynchronous
  pairs count once (their -start); a tuple result counts its largest element."""
  out = {}
  hlo = re.sub(r'/\*.*?\*/', '', hlo)  # Comments such as /*index=5*/ in tuple shapes.
  pattern = re.compile(r'=\s*(\(?[^=]*?\)?)\s+(' + '|'.join(COLLECTIVES) + r')(-start)?\(')
  for shape_text, name, _ in pattern.findall(hlo):
    sizes = [math.prod(int(d) for d in dims.split(',') if d) * max(int(bits or 8) // 8, 1)
             for bits, dims in re.findall(r'\b[a-z]+?(\d*)(?:e\d+m\d+\w*)?\[([\d,]*)\]',
                                          shape_text)]
    count, total = out.get(name, (0, 0))
    out[name] = (count + 1, total + max(sizes, default=0))
  return out


def saved_activation_bytes(m: ModelConfig, rows: int, seq: int, tensor: int) -> float:
  """Bytes per chip that the backward pass keeps of the forward, under model.remat: 'full' keeps
  each block's input [rows, seq, d_model]; 'dots' also the projections' outputs (q, k, v and the
  attention's output projection, the FFN's hidden layer(s) and output; the head and hidden axes
  split over `tensor`); 'none' is given the same floor as 'dots'."""
  itemsize = jnp.dtype(m.dtype).itemsize
  per_token = m.d_model
  if m.remat != 'full':
    hidden = m.ffn_dim * (2 if m.ffn == 'swiglu' else 1)
    per_token += (m.num_heads + 2 * m.kv_heads) * m.head_dim / tensor + m.d_model
    per_token += hidden / tensor + m.d_model
  return float(m.num_layers * rows * seq * per_token * itemsize)


def activation_floor(m: ModelConfig, train: ml_collections.ConfigDict, mesh: Any,
                     rows: int) -> float:
  """Bytes per chip of the activations a micro-batch of `rows` sequences must keep: those the
  remat policy saves (`saved_activation_bytes`) and one chunk of float32 logits and their
  gradient (train.loss_chunk positions, or the whole sequence)."""
  rows_per_chip = rows // (mesh.shape['data'] * mesh.shape['fsdp'])
  chunk = train.loss_chunk or train.seq_len
  logits = 2 * rows_per_chip * chunk * math.ceil(m.vocab_size / mesh.shape['tensor']) * 4
  return saved_activation_bytes(m, rows_per_chip, train.seq_len, mesh.shape['tensor']) + logits


@dataclasses.dataclass
class Report:
  """What one chip of the slice holds and does per micro-step (sizes in bytes)."""
  topology: str
  device_kind: str
  chips: int
  mesh: dict[str, int]
  params: int
  opt_state: int
  temporaries: int
  total: int
  hbm: float
  floor: float
  compiled_flops: float
  flops_counted: str  # How compiled_flops and bytes_accessed were counted (see `compile_step`).
  bytes_accessed: float  # HBM traffic by XLA's cost model.
  model_flops: float
  peak: float
  bandwidth: float  # HBM bytes/s.
  collectives: dict[str, tuple[int, int]]
  compile_seconds: float

  @property
  def step_seconds(self) -> float:
    """Projected time of a micro-step by the roofline: its FLOPs (the compiled count, or the
    model's where larger: XLA does not see inside Pallas kernels such as splash attention) at the
    chip's bf16 peak, or its HBM traffic at the chip's bandwidth, whichever takes longer. A lower
    bound: collectives are given no time."""
    flops = max(self.compiled_flops, self.model_flops)
    return max(flops / self.peak, self.bytes_accessed / self.bandwidth)

  @property
  def mfu(self) -> float:
    return self.model_flops / (self.step_seconds * self.peak)

  @property
  def fits(self) -> bool:
    return self.total <= self.hbm

  def table(self) -> str:
    mesh = ' '.join(f'{k}={v}' for k, v in self.mesh.items())
    rows = [f'compiled for {self.topology}: {self.chips} x {self.device_kind} '
            f'({self.hbm / GIB:.1f} GiB HBM each), mesh {mesh}, in {self.compile_seconds:.1f} s',
            '| per chip | GiB |', '| --- | --- |',
            f'| parameters | {self.params / GIB:.3f} |',
            f'| optimizer state | {self.opt_state / GIB:.3f} |',
            f'| temporaries | {self.temporaries / GIB:.3f} |',
            f'| total | {self.total / GIB:.3f} ({self.total / self.hbm:.0%} of HBM) |',
            f'| analytic floor | {self.floor / GIB:.3f} (total / floor {self.total / self.floor:.2f}) |',
            f'FLOPs per chip per step: compiled {self.compiled_flops:.3g} '
            f'({self.flops_counted}), model (6N + attention) {self.model_flops:.3g}',
            (f'projected step >= {self.step_seconds * 1e3:.1f} ms (roofline at '
             f'{self.peak / 1e12:.0f} TFLOP/s bf16 and {self.bandwidth / 1e9:.0f} GB/s HBM; '
             f'{self.bytes_accessed / GIB:.1f} GiB accessed): MFU <= {self.mfu:.1%}'
             if self.flops_counted != LOOPS_ONCE else
             'projected step time and MFU: add --count_flops (the count misses loop trips)'),
            'collectives' + (' (each loop body once)' if self.flops_counted != 'no loops' else '')
            + ': ' + (', '.join(f'{k} {n} ({b / GIB:.3f} GiB)'
                                for k, (n, b) in sorted(self.collectives.items())) or 'none')]
    return '\n'.join(rows)


# XLA's cost analysis counts a loop's body once: the scanned layers, and the windowed einsums
# (collective matmuls) XLA:TPU builds for sharded matmuls. These options turn the latter off.
LOOPS_ONCE = 'loop bodies once; --count_flops counts every trip'
NO_WINDOWED_EINSUMS = {'xla_tpu_enable_windowed_einsum_for_all_gather': False,
                       'xla_tpu_enable_windowed_einsum_for_reduce_scatter': False}


def compile_step(config: ml_collections.ConfigDict, topology: str, num_slices: int = 1,
                 count_flops: bool = False) -> Report:
  """Compiles config's train step (its stage's `step_spec`) for `topology`; returns the report.
  Raises UserError when the mesh does not match the slice or the step does not fit in HBM.

  The program's FLOPs as XLA counts them miss all but one trip of each loop (scanned layers,
  windowed einsums, the scan over train.grad_accum_steps micro-batches). With `count_flops`, they
  are counted on a second compile of one micro-batch's step with its layers unrolled and windowed
  einsums off (the same work, no loops), times the micro-batches."""
  report = _compile(config, topology, num_slices)
  if count_flops and report.flops_counted != 'no loops':
    unrolled = copy.deepcopy(config)
    unrolled.model.scan_layers = False
    accum = config.train.grad_accum_steps
    unrolled.train.update(batch_size=config.train.batch_size // accum, grad_accum_steps=1)
    counted = _compile(unrolled, topology, num_slices, NO_WINDOWED_EINSUMS)
    report.compiled_flops = counted.compiled_flops * accum
    report.bytes_accessed = counted.bytes_accessed * accum
    report.flops_counted = 'counted unrolled, windowed einsums off'
  return report


def _compile(config: ml_collections.ConfigDict, topology: str, num_slices: int,
             options: dict[str, Any] | None = None) -> Report:
  devices, chips = topology_devices(topology, num_slices)
  kind = devices[0].device_kind
  per_chip = len(devices) / chips  # libtpu describes a v4 chip as 2 devices.
  (hbm, bandwidth), peak = perf.chip_hbm(kind), perf.datasheet_peak(kind)
  hbm, bandwidth, peak = hbm / per_chip, bandwidth / per_chip, peak / per_chip
  try:
    mesh = parallel.make_mesh(config.mesh, devices)
  except UserError as e:
    raise UserError(f'{topology} x {num_slices}: {e}') from None
  vocab = 266 if config.tokenizer.kind == 'byte' else config.tokenizer.vocab_size
  model_cfg = dataclasses.replace(config_lib.model_config(config, vocab), backend='tpu')
  stage = stages.get(config.stage)
  if stage.step_spec is None:
    raise UserError(f'stage={config.stage!r} runs other stages in turn and has no step of its '
                    'own; compile the experiments of those stages.')
  task, batch = stage.step_spec(config, model_cfg)
  t = config.train
  rows = len(next(iter(batch.values())))  # The micro-batch (PPO: ppo.minibatch_size).
  parallel.check_batch(rows, mesh)
  flat = config_lib.flat_optimizer(config)
  tx = make_optimizer(t, flat)
  key = jax.random.key(config.seed)

  def init(key):
    params = task.init_params(key)
    return loop.TrainState(params, tx.init(params))

  def placed(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)

  with parallel.activation_sharding(mesh):
    abstract = jax.eval_shape(init, key)
    state_sharding = parallel.state_shardings(abstract, mesh)
    state = placed(abstract, state_sharding)
    frozen_sharding = parallel.state_shardings(task.frozen, mesh)
    frozen = placed(task.frozen, frozen_sharding) if task.frozen is not None else None
    accum = t.grad_accum_steps  # The step scans over its micro-batches.
    batch_sharding = parallel.batch_sharding(mesh, stacked=accum > 1)
    batch = {k: jax.ShapeDtypeStruct(((accum,) if accum > 1 else ()) + v.shape, v.dtype,
                                     sharding=batch_sharding) for k, v in batch.items()}
    start = time.perf_counter()
    step = loop.make_train_step(task, tx, config.seed, accum, state_sharding, batch_sharding,
                                flat, frozen_sharding)
    try:
      compiled = step.lower(state, batch, np.int32(0), frozen).compile(options)
    except jax.errors.JaxRuntimeError as e:
      if 'RESOURCE_EXHAUSTED' not in str(e):
        raise
      raise UserError(f'the step does not fit in the HBM of a {kind} ({hbm / GIB:.1f} GiB): '
                      f'{_first_line(e)}; set --config.model.remat=full (or dots), lower the '
                      'per-chip batch (train.grad_accum_steps up), or shard more (mesh.fsdp, '
                      'mesh.tensor).') from None
    seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  params = _bytes_per_device(state.params) + (_bytes_per_device(frozen) if frozen else 0)
  opt_state = _bytes_per_device(state.opt_state)
  total = (memory.argument_size_in_bytes + memory.output_size_in_bytes
           - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  grads = _bytes_per_device(state.params) * (2 if accum > 1 else 1)  # + the float32 accumulator.
  floor = params + grads + opt_state + activation_floor(model_cfg, t, mesh, rows)
  tokens = task.tokens_per_step
  model_flops = task.flops_per_token(abstract.params) * tokens / len(devices)
  hlo = compiled.as_text()
  loops = ' while(' in hlo
  return Report(
      topology=topology + (f' x {num_slices} slices' if num_slices > 1 else ''), device_kind=kind,
      chips=len(devices), mesh=dict(mesh.shape), params=params, opt_state=opt_state,
      temporaries=memory.temp_size_in_bytes, total=total, hbm=hbm, floor=floor,
      compiled_flops=float(cost.get('flops', 0.0)),
      bytes_accessed=float(cost.get('bytes accessed', 0.0)), bandwidth=bandwidth,
      flops_counted=LOOPS_ONCE if loops else 'no loops',
      model_flops=model_flops, peak=peak, collectives=collectives(hlo), compile_seconds=seconds)


def _first_line(e: Exception) -> str:
  return str(e).strip().splitlines()[0][:300]


def compile_main(config: ml_collections.ConfigDict, topology: str, num_slices: int = 1,
                 count_flops: bool = False) -> Report:
  """--mode=compile: prints the report; raises UserError (one line) when it does not fit."""
  report = compile_step(config, topology, num_slices, count_flops)
  print(report.table(), flush=True)
  if not report.fits:
    raise UserError(
        f'the step needs {report.total / GIB:.1f} GiB per chip, more than the '
        f'{report.hbm / GIB:.1f} GiB of a {report.device_kind} (parameters + optimizer state '
        f'{(report.params + report.opt_state) / GIB:.1f}, temporaries '
        f'{report.temporaries / GIB:.1f}): set --config.model.remat=full (or dots), lower the '
        'per-chip batch (train.grad_accum_steps up), or shard more (mesh.fsdp, mesh.tensor).')
  return report
