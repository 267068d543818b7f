"""The step loop every training stage shares: init or resume, jitted updates, eval, metrics,
checkpoints, preemption and NaN guards. A stage supplies a `Task`: its model, batches and loss."""

import collections
import dataclasses
import json
import os
import shlex
import signal
import sys
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from research import config as config_lib
from research import metrics as metrics_lib
from research import parallel
from research import perf
from research.checkpoint import Checkpointer
from research.data.prefetch import Prefetcher
from research.errors import UserError
from research.train import optimizer
from research.train.optimizer import make_optimizer, make_schedule

Batch = dict[str, np.ndarray]
Params = Any


@dataclasses.dataclass
class Task:
  """What a training stage gives the loop.

  init_params(key) -> params.
  loss_fn(params, batch, key) -> (scalar loss, dict of scalar metrics); key drives dropout.
  eval_fn(params, batch) -> dict of the batch's metrics: scalars (the eval averages them over
    batches) or (mean, weight) pairs (averaged in proportion to weight, e.g. the tokens a mean
    is over, so that the result is the mean over the whole eval set).
  train_batch(step, micro, rows) -> rows `rows` (this process's share) of micro-batch `micro`
    of optimiser step `step`, as numpy arrays.
  eval_batches: the fixed eval set. tokens_per_step: tokens one optimiser step consumes.
  flops_per_token(params) -> training FLOPs per token, for MFU.
  start_params: the weights to start from (e.g. train.init_from's) instead of init_params(key)
    (which then only gives their shapes): moved onto the mesh (jax.device_put; arrays already
    placed with the parameters' shardings, see `param_shardings`, stay where they are), never
    captured into a compiled function.
  batch_weight(batch) -> float: what loss_fn averages over in a batch of numpy rows (e.g. the
    weighted target tokens), when it varies between batches; with train.grad_accum_steps > 1 each
    micro-batch's gradient (of the whole loss_fn, MoE auxiliary losses included) then counts in
    proportion to it, so the step equals one over the whole batch (`micro_scales`), and so does
    the logged train loss. None: every micro-batch counts the same (right when all hold as many
    of the loss's units).
  """
  init_params: Callable[[jax.Array], Params]
  loss_fn: Callable[[Params, Batch, jax.Array], tuple[jax.Array, dict]]
  eval_fn: Callable[[Params, Batch], dict]
  train_batch: Callable[[int, int, slice], Batch]
  eval_batches: list[Batch]
  tokens_per_step: int
  flops_per_token: Callable[[Params], float]
  batch_weight: Callable[[Batch], float] | None = None
  frozen: Params | None = None
  start_params: Params | None = None

  def with_frozen(self, frozen: Params | None) -> dict[str, Params]:
    """The keyword arguments that pass `frozen` to loss_fn and eval_fn (none without)."""
    return {} if self.frozen is None else {'frozen': frozen}


@flax.struct.dataclass
class TrainState:
  params: Params
  opt_state: optax.OptState


class Interrupted(Exception):
  """Raised by `run` after SIGTERM or Ctrl-C, once the checkpoint of the last step is saved:
  stages after it do not run; launch.py exits with 128 + the signal's number (143 for SIGTERM,
  130 for Ctrl-C), as a shell does, so that a scheduler can tell it from a finished run (0) and
  from an error (2) and requeue it."""

  def __init__(self, signum: int, step: int):
    super().__init__(f'stopped by {signal.Signals(signum).name} after step {step}, whose '
                     'checkpoint is saved; rerun the same command to resume')
    self.signum, self.step = signum, step


class Preempted:
  """Turns SIGTERM and Ctrl-C into a flag the loop checks between steps (then saves and exits)."""

  def __init__(self):
    self.requested = False
    self.signum = signal.SIGTERM
    self.previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self.previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.requested, self.signum = True, signum
    print(f'\nreceived {signal.Signals(signum).name}: saving a checkpoint after this step',
          flush=True)

  def __exit__(self, *exc):
    for sig, handler in self.previous.items():
      signal.signal(sig, handler)


def make_train_step(task: Task, tx: optax.GradientTransformation, seed: int,
                    state_sharding: Any = None, batch_sharding: Any = None,
                    flat_optimizer: bool = False, frozen_sharding: Any = None):
  """One micro-step: loss, grads, optimiser update. `index` = step * accum + micro seeds dropout;
  the gradient is multiplied by `grad_scale` (float32 scalar, see `micro_scales`; 1 without
  accumulation), the reported loss is not. The reported grad_norm is that of the gradient the
  optimiser step applies (before clipping): with accumulation (optax.MultiSteps), of the mean of
  the step's micro-batch gradients so far, the whole step's at its last micro-batch.

  flat_optimizer: `tx` was made with flat=True (see optimizer.grad_norm).

  With shardings, the state stays sharded as given (donated, updated in place), batches
  arrive sharded over the batch axes and `frozen` (task.frozen) as `frozen_sharding`.
  """
  def scaled_loss(params, batch, key, grad_scale, frozen):
    loss, aux = task.loss_fn(params, batch, key, **task.with_frozen(frozen))
    return loss * grad_scale, (loss, aux)

  def train_step(state: TrainState, batch: Batch, index: jax.Array, grad_scale: jax.Array,
                 frozen: Params | None = None):
    key = jax.random.fold_in(jax.random.key(seed), index)
    (_, (loss, aux)), grads = jax.value_and_grad(scaled_loss, has_aux=True)(
        state.params, batch, key, grad_scale, frozen)
    step_grads = grads
    if isinstance(state.opt_state, optax.MultiStepsState):  # MultiSteps' running mean.
      n = state.opt_state.mini_step
      step_grads = jax.tree.map(lambda acc, g: acc + (g - acc) / (n + 1),
                                state.opt_state.acc_grads, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(params, opt_state), {
        'loss': loss, 'grad_norm': optimizer.grad_norm(step_grads, flat_optimizer), **aux}
  options = perf.compiler_options()
  if state_sharding is None:
    return jax.jit(train_step, donate_argnums=0, compiler_options=options)
  return jax.jit(train_step, donate_argnums=0,
                 in_shardings=(state_sharding, batch_sharding, None, None, frozen_sharding),
                 out_shardings=(state_sharding, None), compiler_options=options)


def micro_scales(weights: list[float]) -> np.ndarray:
  """float32 [k]: gradient scales of a step's k micro-batches whose losses are means over
  `weights` units each (e.g. target tokens). optax.MultiSteps averages the k gradients; scaled by
  k * w_i / sum(w), their average is the gradient of the mean over all the step's units, as one
  batch would give (equal micro-batch means would over-weight the units of a small micro-batch).
  """
  w = np.asarray(weights, np.float64)
  if w.sum() <= 0:
    return np.ones(len(w), np.float32)
  return (len(w) * w / w.sum()).astype(np.float32)


def evaluate(eval_step, params: Params, batches: list[Batch], *args) -> dict[str, float]:
  """{'eval/<metric>': its average over `batches`} (see `Task.eval_fn`) of
  eval_step(params, batch, *args)."""
  results = jax.device_get([eval_step(params, b, *args) for b in batches])
  averages = {}
  for k in results[0]:
    values = [r[k] for r in results]
    if isinstance(values[0], tuple):
      means, weights = np.array([v[0] for v in values]), np.array([v[1] for v in values])
      averages[f'eval/{k}'] = float(np.average(means, weights=weights) if weights.sum() > 0
                                    else np.mean(means))
    else:
      averages[f'eval/{k}'] = float(np.mean(values))
  return averages


@dataclasses.dataclass
class RunResult:
  params: Params
  metrics: dict[str, float]  # The last logged train/ and eval/ metrics.


def restore_state(ckpt: Checkpointer, step: int, state: TrainState) -> TrainState:
  """The checkpoint at `step`, in the layout (and shardings) of `state`. train.grad_accum_steps
  may change between 1 and k > 1 on resume: the optimiser state is then wrapped in or taken out
  of optax.MultiSteps' (a checkpoint falls between steps, so its accumulator is empty)."""
  saved_multi = 'acc_grads' in ckpt.saved_tree(step)['opt_state']
  multi = isinstance(state.opt_state, optax.MultiStepsState)
  if saved_multi == multi:
    return ckpt.restore(step, state)
  if multi:
    plain = ckpt.restore(step, TrainState(state.params, state.opt_state.inner_opt_state))
    return TrainState(plain.params, state.opt_state._replace(inner_opt_state=plain.opt_state))
  # MultiSteps' step counters: int32 scalars, placed like the optimiser's own (Adam's count).
  count = next(x for x in jax.tree.leaves(state.opt_state) if x.ndim == 0)
  saved = ckpt.restore(step, TrainState(state.params, optax.MultiStepsState(
      mini_step=count, gradient_step=count, inner_opt_state=state.opt_state,
      acc_grads=state.params, skip_state=())))
  return TrainState(saved.params, saved.opt_state.inner_opt_state)


def restore_params(config: ml_collections.ConfigDict, workdir: str,
                   init_params: Callable[[jax.Array], Params]) -> tuple[Params, int]:
  """The parameters of the latest checkpoint in `workdir` and its step, on one device (for
  inference), whatever mesh the checkpoint was saved from."""
  tx = make_optimizer(config.train, config_lib.flat_optimizer(config))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
      jax.eval_shape(lambda key: TrainState(p := init_params(key), tx.init(p)), jax.random.key(0)))
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'))
  step, state = ckpt.restore_newest(lambda s: ckpt.restore(s, abstract))
  ckpt.close()
  if step is None:
    raise UserError(f'{workdir} holds no checkpoint; train first (same --experiment and '
                    '--workdir, --mode=train) or point --workdir at a trained run.')
  return state.params, step


def divergence_advice(cfg: ml_collections.ConfigDict, last_saved: int | None) -> str:
  """What to run after a divergence: resume from the last checkpoint (train.resume_step) with a
  lower learning rate, as a command line when launch.py runs."""
  lower = f'--config.train.learning_rate={cfg.learning_rate / 10:g}'
  if last_saved is None:
    return (f'No checkpoint was saved before it: start again with a lower learning rate ({lower}) '
            'or a longer warmup (train.warmup_steps).')
  resume = [f'--config.train.resume_step={last_saved}', lower]
  if os.path.basename(sys.argv[0]) == 'launch.py':
    args = [a for a in sys.argv[1:]
            if not a.startswith(('--config.train.resume_step', '--config.train.learning_rate'))]
    how = shlex.join(['python', 'launch.py', *args, *resume])
  else:
    how = 'the same command with ' + ' '.join(resume)
  return (f'The last good checkpoint is step {last_saved}; resume from it with a lower learning '
          f'rate (or a longer warmup): {how}')


def param_shardings(config: ml_collections.ConfigDict, abstract_params: Params) -> Params:
  """The shardings `run` gives parameters of these shapes on config.mesh (for loading weights
  straight into them, see Task.start_params)."""
  return parallel.state_shardings(abstract_params, parallel.make_mesh(config.mesh))


def run(config: ml_collections.ConfigDict, workdir: str, task: Task) -> RunResult:
  """Trains `task` to config.train.steps in `workdir`, resuming from its latest checkpoint."""
  mesh = parallel.make_mesh(config.mesh)
  with parallel.activation_sharding(mesh):  # Every function traced below pins activations.
    return _train(config, workdir, task, mesh)


def _train(config: ml_collections.ConfigDict, workdir: str, task: Task,
           mesh: jax.sharding.Mesh) -> RunResult:
  cfg = config.train
  is_main = jax.process_index() == 0
  flat = config_lib.flat_optimizer(config)
  tx = make_optimizer(cfg, flat)
  micro_batch = cfg.batch_size // cfg.grad_accum_steps
  parallel.check_batch(micro_batch, mesh)
  rows, batch_sharding = parallel.process_slice(micro_batch), parallel.batch_sharding(mesh)

  def get_batch(step: int, micro: int) -> dict[str, jax.Array]:
    return parallel.to_global(task.train_batch(step, micro, rows), batch_sharding)

  def init(key):
    params = task.init_params(key)
    return TrainState(params, tx.init(params))

  key = jax.random.key(config.seed)
  state_sharding = parallel.state_shardings(jax.eval_shape(init, key), mesh)
  if task.start_params is None:
    state = jax.jit(init, out_shardings=state_sharding)(key)  # Created already sharded.
  else:
    params = jax.device_put(task.start_params, state_sharding.params)
    state = TrainState(params, jax.jit(tx.init, out_shardings=state_sharding.opt_state)(params))
  frozen_sharding = parallel.state_shardings(task.frozen, mesh)
  frozen = jax.device_put(task.frozen, frozen_sharding)
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), cfg.keep_checkpoints)
  start, restored = ckpt.restore_newest(lambda s: restore_state(ckpt, s, state),
                                        cfg.resume_step or None)
  start = start or 0
  if start:
    state = restored
    print(f'resumed from the checkpoint at step {start}', flush=True)
  if start >= cfg.steps:
    print(f'{workdir} is already trained to step {start} (train.steps={cfg.steps})', flush=True)
    ckpt.close()
    return RunResult(state.params, {})

  accum = cfg.grad_accum_steps
  schedule = make_schedule(cfg)
  first = get_batch(start, 0)
  t0 = time.perf_counter()
  train_step = make_train_step(task, tx, config.seed, state_sharding, batch_sharding, flat,
                               frozen_sharding).lower(state, first, np.int32(0), np.float32(1),
                                                      frozen).compile()
  weigh = task.batch_weight is not None and accum > 1
  compile_sec = time.perf_counter() - t0
  need, have = perf.step_memory(train_step), perf.free_memory(jax.local_devices()[0])
  if need and have and need > have:
    ckpt.close()
    raise UserError(f'a train step needs {need / 2**30:.1f} GiB more than the model and optimiser '
                    f'state, but {jax.local_devices()[0].platform} has {have / 2**30:.1f} GiB free; '
                    'lower train.batch_size, raise train.grad_accum_steps, or set model.remat=full '
                    '(or shard it: mesh.fsdp).')
  writer = metrics_lib.MetricsWriter(workdir, start, enabled=is_main)
  eval_step = jax.jit(lambda params, batch, frozen: task.eval_fn(
      params, batch, **task.with_frozen(frozen)))
  eval_batches = [parallel.to_global({k: v[rows] for k, v in b.items()}, batch_sharding)
                  for b in task.eval_batches]
  flops_per_token = task.flops_per_token(state.params)
  peak, peak_source = perf.peak_flops()
  if is_main:
    print(f'params {perf.param_count(state.params):,} | {flops_per_token / 1e6:.1f} MFLOP/token '
          f'| peak {peak / 1e9:.0f} GFLOP/s ({peak_source}) | compiled in {compile_sec:.1f}s',
          flush=True)
  progress = metrics_lib.Progress(start, cfg.steps)
  history, last = [], {}
  pending = None  # Metrics of the previous micro-step, read after the next one is dispatched.
  t_interval, steps_in_interval, data_sec = time.perf_counter(), 0, 0.0

  recent = collections.deque(maxlen=20)  # The latest train losses: the spike guard's baseline.
  last_saved = [start or None]

  def check_loss(loss: float, step: int, what: str) -> None:
    """Halts (UserError, nothing saved) when `loss` is not finite or spikes beyond
    train.spike_factor times the recent mean (at least 1)."""
    limit = cfg.spike_factor * max(float(np.mean(recent)), 1.0) if recent else np.inf
    if np.isfinite(loss) and not (cfg.spike_factor and loss > limit):
      return
    why = f'{what} became {loss:.4g} at step {step}' + (
        f' (> train.spike_factor={cfg.spike_factor:g} x the recent mean {np.mean(recent):.4g})'
        if np.isfinite(loss) else '')
    raise UserError(f'{why}: training diverged, and no checkpoint holds it. '
                    + divergence_advice(cfg, last_saved[0]))

  def pull(pending_metrics, step, weight, last_micro):
    values = {k: float(v) for k, v in jax.device_get(pending_metrics).items()}
    check_loss(values['loss'], step, 'the loss')
    recent.append(values['loss'])
    history.append((values, weight, last_micro))

  probe = jax.jit(lambda params, batch, frozen: (
      task.loss_fn(params, batch, key, **task.with_frozen(frozen))[0],
      jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))))

  def save(step: int) -> None:
    """Saves the state after `step` if its weights are finite and their loss (on the next
    step's first micro-batch) neither; else halts as diverged."""
    loss, finite = jax.device_get(probe(state.params, get_batch(min(step, cfg.steps - 1), 0),
                                        frozen))
    check_loss(float(loss) if finite else float('nan'), step + 1,
               'the loss of the weights to save' if finite else 'a weight')
    ckpt.save(step, state)
    last_saved[0] = step

  def interval_mean(k: str) -> float:
    """Metric k over the log interval: the micro-steps' values weighted as their gradients
    (see micro_scales); grad_norm, the optimiser steps' (their last micro-steps)."""
    if k == 'grad_norm':
      return float(np.mean([h[k] for h, _, last_micro in history if last_micro]))
    return float(np.average([h[k] for h, _, _ in history], weights=[w for _, w, _ in history]))

  def stop_requested(done: int) -> bool:
    """Whether to save and stop after step `done` (SIGTERM or Ctrl-C seen). Several processes
    agree on it at log steps (the save is collective; an all-gather every step would stall the
    dispatch queue)."""
    if jax.process_count() == 1:
      return preempted.requested
    if done % cfg.log_every:
      return False
    return bool(np.any(multihost_utils.process_allgather(np.array(preempted.requested))))

  def step_batches(step: int) -> tuple[list[Batch], np.ndarray]:
    """This process's host rows of the step's micro-batches and their gradient scales."""
    host = [task.train_batch(step, m, rows) for m in range(accum)]
    weights = np.array([task.batch_weight(b) for b in host], np.float64)
    if jax.process_count() > 1:  # Each process holds its rows: the weights are their sums.
      weights = np.asarray(multihost_utils.process_allgather(weights)).sum(axis=0)
    return host, micro_scales(weights)

  def following(step: int, micro: int) -> tuple[int, int] | None:
    """The micro-batch after (step, micro); None after the last."""
    if micro + 1 < accum:
      return step, micro + 1
    return (step + 1, 0) if step + 1 < cfg.steps else None

  batches = Prefetcher(get_batch, ready=((start, 0), first))
  stop = False
  try:
    with Preempted() as preempted:
      for step in range(start, cfg.steps):
        t_data = time.perf_counter()
        host, scales = step_batches(step) if weigh else (None, np.ones(accum, np.float32))
        data_sec += time.perf_counter() - t_data
        for micro in range(accum):
          t_data = time.perf_counter()
          if host:
            batch = parallel.to_global(host[micro], batch_sharding)
          else:
            batch = batches.get((step, micro), following(step, micro))
          data_sec += time.perf_counter() - t_data
          state, out = train_step(state, batch, np.int32(step * accum + micro), scales[micro],
                                  frozen)
          if pending is not None:
            pull(*pending)
          pending = (out, step + 1, scales[micro], micro == accum - 1)
        steps_in_interval += 1
        done = step + 1
        is_last = done == cfg.steps
        stop = stop_requested(done)  # Read once: a signal during eval or a save waits a step.
        save_now = done % cfg.checkpoint_every == 0 or is_last or stop
        # A log interval also ends at every checkpoint, so that a run resumed from one logs the
        # same means as the run that saved it.
        if done % cfg.log_every == 0 or save_now:
          pull(*pending)
          pending = None
          elapsed = time.perf_counter() - t_interval
          tokens_per_sec = steps_in_interval * task.tokens_per_step / elapsed
          last = {f'train/{k}': interval_mean(k) for k in history[0][0]}
          last.update({'train/tokens_per_sec': tokens_per_sec,
                       'train/tokens_per_sec_per_device': tokens_per_sec / jax.device_count(),
                       'train/mfu': tokens_per_sec * flops_per_token / peak,
                       'train/data_wait_frac': data_sec / elapsed,
                       'train/learning_rate': float(schedule(done - 1))})  # This update's.
          if is_main:
            writer.write(done, last)
            print(progress.line(done, {'loss': last['train/loss'],
                                       'tok/s': tokens_per_sec, 'mfu': last['train/mfu']}),
                  flush=True)
          history, steps_in_interval, data_sec = [], 0, 0.0
          t_interval = time.perf_counter()
        evaluate_now = done % cfg.eval_every == 0 or is_last
        if evaluate_now and pending is not None:
          pull(*pending)
          pending = None
        t_pause = time.perf_counter()  # Eval and checkpoints are not training time.
        if evaluate_now:
          ev = evaluate(eval_step, state.params, eval_batches, frozen)
          ev['eval/perplexity'] = float(np.exp(ev['eval/loss']))
          last.update(ev)
          if is_main:
            writer.write(done, ev)
            print(f'  eval at step {done}: ' + ', '.join(f'{k[5:]} {v:.4g}' for k, v in ev.items()),
                  flush=True)
        if save_now:
          save(done)
        t_interval += time.perf_counter() - t_pause
        if stop:
          ckpt.wait()
          print(f'saved the checkpoint at step {done}; rerun the same command to resume',
                flush=True)
          stop = preempted.signum
          break
  finally:  # Even on an error, finish the saves in flight: they hold finite weights.
    batches.close()
    ckpt.close()
    writer.close()
  if is_main:
    metrics_lib.plot_losses(writer.path, os.path.join(workdir, 'loss.png'),
                            title=os.path.basename(os.path.normpath(workdir)))
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:  # Read by sweeps.
      json.dump({'step': done, 'finished': not stop,
                 'params': perf.param_count(state.params), 'flops_per_token': flops_per_token}, f)
  if stop:
    raise Interrupted(stop, done)
  return RunResult(state.params, last)
