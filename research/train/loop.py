"""The step loop every training stage shares: init or resume, jitted updates, eval, metrics,
checkpoints, preemption and NaN guards. A stage supplies a `Task`: its model, batches and loss."""

import collections
import dataclasses
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
from research import runs
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
    placed with the parameters' shardings, see `param_shardings`, stay where they are; their
    buffers are then donated to the first step), never captured into a compiled function.
  frozen: weights the loss (and the rollout) read but do not train, e.g. LoRA's base or PPO's
    reference: sharded like parameters and passed to loss_fn and eval_fn as `frozen=`.

  RL stages collect their data with the current weights (the rollout hook):
  rollout(params, frozen, extra, step) -> (extra, metrics), run at the start of every step, makes
    the data that train_batch(step, u, rows) then returns for the step's `updates_per_step`
    optimiser updates u (e.g. PPO's epochs x minibatches); its metrics (host floats) are logged
    beside the updates'. `extra` is the task's own state (e.g. PPO's adaptive KL coefficient):
    it starts as `init_extra` and is checkpointed with the weights, so a resumed run continues
    exactly. rows_per_update: the rows of one update's batch (0: train.batch_size /
    train.grad_accum_steps). evaluate(params) -> host metrics (e.g. exact match of generated
    replies), logged with the eval metrics of eval_batches (which may then be empty).
  batch_weight(batch) -> float32 scalar (traced, on the device): what loss_fn averages over in a
    micro-batch (e.g. its weighted target tokens), when that varies between micro-batches; with
    train.grad_accum_steps > 1 each micro-batch's gradient (of the whole loss_fn, MoE auxiliary
    losses included) and metrics then count in proportion to it, so that the update equals one
    over the whole batch. None: every micro-batch counts the same.
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
  rollout: Callable[[Params, Params, Any, int], tuple[Any, dict]] | None = None
  updates_per_step: int = 1
  rows_per_update: int = 0
  init_extra: Any = None
  evaluate: Callable[[Params], dict] | None = None

  def with_frozen(self, frozen: Params | None) -> dict[str, Params]:
    """The keyword arguments that pass `frozen` to loss_fn and eval_fn (none without)."""
    return {} if self.frozen is None else {'frozen': frozen}


@flax.struct.dataclass
class TrainState:
  params: Params
  opt_state: optax.OptState


@flax.struct.dataclass
class TaskState(TrainState):
  """The train state of a task with its own state (`Task.init_extra`), checkpointed with it."""
  extra: Any = None


def new_state(params: Params, opt_state: optax.OptState, extra: Any = None) -> TrainState:
  return TrainState(params, opt_state) if extra is None else TaskState(params, opt_state, extra)


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


def make_train_step(task: Task, tx: optax.GradientTransformation, seed: int, accum: int = 1,
                    state_sharding: Any = None, batch_sharding: Any = None,
                    flat_optimizer: bool = False, frozen_sharding: Any = None):
  """One optimiser update: loss, gradients, update. With accum > 1 the batch holds that many
  micro-batches (every array [accum, rows, ...]) whose gradients and metrics a lax.scan sums on
  the device, each weighted by task.batch_weight (equal without), then divides by the weights'
  sum: the update and metrics of the whole batch at once, with one micro-batch's activations
  alive at a time. `index` (the loop's step * updates_per_step + update) seeds dropout; micro-batch
  m uses index * accum + m. The reported grad_norm is that of the applied gradient, before
  clipping.

  flat_optimizer: `tx` was made with flat=True (see optimizer.grad_norm).

  With shardings, the state stays sharded as given (donated, updated in place), batches
  arrive sharded over the batch axes and `frozen` (task.frozen) as `frozen_sharding`.
  """
  def loss_and_grads(params, batch, key, frozen):
    loss_fn = lambda p: task.loss_fn(p, batch, key, **task.with_frozen(frozen))
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, {'loss': loss, **aux}

  def accumulated(params, batch, index, frozen):
    """The batch_weight-weighted means of the micro-batches' gradients and metrics."""
    keys = [jax.random.fold_in(jax.random.key(seed), index * accum + m) for m in range(accum)]
    weights = (jnp.ones(accum, jnp.float32) if task.batch_weight is None
               else jax.vmap(task.batch_weight)(batch).astype(jnp.float32))
    weights = weights / jnp.maximum(weights.sum(), 1e-9)  # Summed in place: no rescaling pass.

    def micro(carry, xs):
      key, w, mb = xs
      grads, metrics = loss_and_grads(params, mb, key, frozen)
      add = lambda total, x: total + w * x.astype(total.dtype)
      return (jax.tree.map(add, carry[0], grads), jax.tree.map(add, carry[1], metrics)), None

    shapes = jax.eval_shape(loss_and_grads, params, jax.tree.map(lambda x: x[0], batch), keys[0],
                            frozen)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)
    (grads, metrics), _ = jax.lax.scan(micro, zeros, (jnp.stack(keys), weights, batch))
    return jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params), metrics

  def train_step(state: TrainState, batch: Batch, index: jax.Array,
                 frozen: Params | None = None):
    if accum == 1:
      key = jax.random.fold_in(jax.random.key(seed), index)
      grads, metrics = loss_and_grads(state.params, batch, key, frozen)
    else:
      grads, metrics = accumulated(state.params, batch, index, frozen)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(params=params, opt_state=opt_state), {
        **metrics, 'grad_norm': optimizer.grad_norm(grads, flat_optimizer)}
  options = perf.compiler_options()
  if state_sharding is None:
    return jax.jit(train_step, donate_argnums=0, compiler_options=options)
  return jax.jit(train_step, donate_argnums=0,
                 in_shardings=(state_sharding, batch_sharding, None, frozen_sharding),
                 out_shardings=(state_sharding, None), compiler_options=options)


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
    trainer = Trainer(config, workdir, task, mesh)  # Init, or resume from the newest checkpoint.
    if trainer.start >= config.train.steps:
      return trainer.already_done()
    trainer.compile()
    stop = 0
    try:
      with Preempted() as preempted:
        for step in range(trainer.start, config.train.steps):
          trainer.train(step)
          stop = trainer.stop_requested(step + 1, preempted)
          trainer.end_of_step(step + 1, stop)
          if stop:
            break
    finally:  # Even on an error, finish the saves in flight: they hold finite weights.
      trainer.close()
    return trainer.finish(stop)


class Trainer:
  """The state of one `run`: the train state on the mesh, its compiled step, the checkpoints,
  the metrics of the current log interval and the divergence guard."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, task: Task,
               mesh: jax.sharding.Mesh):
    self.config, self.cfg, self.workdir, self.task, self.mesh = (
        config, config.train, workdir, task, mesh)
    cfg = self.cfg
    self.is_main = jax.process_index() == 0
    self.flat = config_lib.flat_optimizer(config)
    # Calls of the train step per loop step: one, or a rollout's updates.
    self.accum, self.calls = cfg.grad_accum_steps, task.updates_per_step
    schedule_cfg = ml_collections.ConfigDict(cfg.to_dict())  # The schedule counts updates.
    schedule_cfg.steps = cfg.steps * task.updates_per_step
    self.tx, self.schedule = make_optimizer(schedule_cfg, self.flat), make_schedule(schedule_cfg)
    rows = task.rows_per_update or config_lib.micro_batch(config)
    parallel.check_batch(rows, mesh)
    self.rows = parallel.process_slice(rows)
    self.batch_sharding = parallel.batch_sharding(mesh, stacked=self.accum > 1)
    self.key = jax.random.key(config.seed)
    self.state = self._init_state()
    self.frozen_sharding = parallel.state_shardings(task.frozen, mesh)
    self.frozen = jax.device_put(task.frozen, self.frozen_sharding)
    self.ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), cfg.keep_checkpoints)
    start, restored = self.ckpt.restore_newest(lambda s: self.ckpt.restore(s, self.state),
                                               cfg.resume_step or None)
    self.start = start or 0
    if self.start:
      self.state = restored
      print(f'resumed from the checkpoint at step {self.start}', flush=True)
    self.last_saved = self.start or None
    self.recent = collections.deque(maxlen=20)  # The latest train losses: the spike guard's.
    self.history, self.rollouts, self.last, self.pending = [], [], {}, None
    self.t_interval, self.steps_in_interval, self.data_sec = time.perf_counter(), 0, 0.0

  def _init_state(self) -> TrainState:
    task, tx = self.task, self.tx
    init = lambda key: new_state(p := task.init_params(key), tx.init(p), task.init_extra)
    self.state_sharding = parallel.state_shardings(jax.eval_shape(init, self.key), self.mesh)
    if task.start_params is None:
      return jax.jit(init, out_shardings=self.state_sharding)(self.key)  # Created sharded.
    params = jax.device_put(task.start_params, self.state_sharding.params)
    opt_state = jax.jit(tx.init, out_shardings=self.state_sharding.opt_state)(params)
    extra = getattr(self.state_sharding, 'extra', None)
    return new_state(params, opt_state, extra and jax.device_put(task.init_extra, extra))

  def already_done(self) -> RunResult:
    print(f'{self.workdir} is already trained to step {self.start} '
          f'(train.steps={self.cfg.steps})', flush=True)
    self.ckpt.close()
    return RunResult(self.state.params, {})

  def get_batch(self, step: int, call: int) -> dict[str, jax.Array]:
    """This process's rows of the batch of (step, call); with accumulation, its micro-batches
    stacked [accum, rows, ...]."""
    if self.accum == 1:
      batch = self.task.train_batch(step, call, self.rows)
    else:
      micro = [self.task.train_batch(step, m, self.rows) for m in range(self.accum)]
      batch = {k: np.stack([b[k] for b in micro]) for k in micro[0]}
    return parallel.to_global(batch, self.batch_sharding)

  def compile(self) -> None:
    """Compiles the train step (refused when it needs more memory than is free), the eval step
    and the save-time probe; prints the model's size and FLOPs."""
    task, state = self.task, self.state
    if task.rollout is not None:
      self._rollout(self.start)
    first = self.get_batch(self.start, 0)
    t0 = time.perf_counter()
    self.train_step = make_train_step(
        task, self.tx, self.config.seed, self.accum, self.state_sharding, self.batch_sharding,
        self.flat, self.frozen_sharding).lower(state, first, np.int32(0), self.frozen).compile()
    compile_sec = time.perf_counter() - t0
    device = jax.local_devices()[0]
    need, have = perf.step_memory(self.train_step), perf.free_memory(device)
    if need and have and need > have:
      self.ckpt.close()
      raise UserError(f'a train step needs {need / 2**30:.1f} GiB more than the model and '
                      f'optimiser state, but {device.platform} has {have / 2**30:.1f} GiB free; '
                      'lower train.batch_size, raise train.grad_accum_steps, or set '
                      'model.remat=full (or shard it: mesh.fsdp).')
    self.eval_step = jax.jit(lambda params, batch, frozen: task.eval_fn(
        params, batch, **task.with_frozen(frozen)))
    self.eval_batches = [parallel.to_global({k: v[self.rows] for k, v in b.items()},
                                            parallel.batch_sharding(self.mesh))
                         for b in task.eval_batches]
    first_micro = (lambda batch: batch) if self.accum == 1 else (
        lambda batch: jax.tree.map(lambda x: x[0], batch))
    self.probe = jax.jit(lambda params, batch, frozen: (
        task.loss_fn(params, first_micro(batch), self.key, **task.with_frozen(frozen))[0],
        jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))))
    self.writer = metrics_lib.MetricsWriter(self.workdir, self.start, enabled=self.is_main)
    self.progress = metrics_lib.Progress(self.start, self.cfg.steps)
    self.flops_per_token = task.flops_per_token(state.params)
    self.peak, peak_source = perf.peak_flops()
    if self.is_main:
      print(f'params {perf.param_count(state.params):,} | {self.flops_per_token / 1e6:.1f} '
            f'MFLOP/token | peak {self.peak / 1e9:.0f} GFLOP/s ({peak_source}) | compiled in '
            f'{compile_sec:.1f}s', flush=True)
    # Batches of the next call are built during this one, unless they come from a rollout.
    self.prefetch = None if task.rollout else Prefetcher(self.get_batch,
                                                         ready=((self.start, 0), first))
    self.first = first

  def _rollout(self, step: int) -> None:
    """Runs the task's rollout for `step` with the current weights (once per step)."""
    if getattr(self, 'rolled_out', None) == step:
      return
    extra, metrics = self.task.rollout(self.state.params, self.frozen,
                                       getattr(self.state, 'extra', None), step)
    if self.task.init_extra is not None:
      self.state = self.state.replace(extra=jax.device_put(extra, self.state_sharding.extra))
    self.rollouts.append(metrics)
    self.rolled_out = step

  def _batch(self, step: int, call: int) -> dict[str, jax.Array]:
    if self.prefetch is not None:
      return self.prefetch.get((step, call), self._following(step, call))
    return self.first if (step, call) == (self.start, 0) else self.get_batch(step, call)

  def _following(self, step: int, call: int) -> tuple[int, int] | None:
    """The call after (step, call); None after the last."""
    if call + 1 < self.calls:
      return step, call + 1
    return (step + 1, 0) if step + 1 < self.cfg.steps else None

  def train(self, step: int) -> None:
    """One optimiser step (or a rollout and its updates): dispatched, its metrics pulled one
    call later, so that reading them does not wait for the device."""
    if self.task.rollout is not None:
      t_data = time.perf_counter()
      self._rollout(step)
      self.data_sec += time.perf_counter() - t_data
    for call in range(self.calls):
      t_data = time.perf_counter()
      batch = self._batch(step, call)
      self.data_sec += time.perf_counter() - t_data
      self.state, out = self.train_step(self.state, batch, np.int32(step * self.calls + call),
                                        self.frozen)
      if self.pending is not None:
        self._pull(*self.pending)
      self.pending = (out, step + 1)
    self.steps_in_interval += 1

  def check_loss(self, loss: float, step: int, what: str) -> None:
    """Halts (UserError, nothing saved) when `loss` is not finite or spikes beyond
    train.spike_factor times the recent mean (at least 1)."""
    cfg, recent = self.cfg, self.recent
    limit = cfg.spike_factor * max(float(np.mean(recent)), 1.0) if recent else np.inf
    if np.isfinite(loss) and not (cfg.spike_factor and loss > limit):
      return
    why = f'{what} became {loss:.4g} at step {step}' + (
        f' (> train.spike_factor={cfg.spike_factor:g} x the recent mean {np.mean(recent):.4g})'
        if np.isfinite(loss) else '')
    raise UserError(f'{why}: training diverged, and no checkpoint holds it. '
                    + divergence_advice(cfg, self.last_saved))

  def _pull(self, pending_metrics, step) -> None:
    values = {k: float(v) for k, v in jax.device_get(pending_metrics).items()}
    self.check_loss(values['loss'], step, 'the loss')
    self.recent.append(values['loss'])
    self.history.append(values)

  def _pull_pending(self) -> None:
    if self.pending is not None:
      self._pull(*self.pending)
      self.pending = None

  def stop_requested(self, done: int, preempted: Preempted) -> int:
    """The signal to save and stop after step `done` for (SIGTERM or Ctrl-C seen), else 0.
    Several processes agree on it at log steps (the save is collective; an all-gather every
    step would stall the dispatch queue)."""
    if jax.process_count() == 1:
      return preempted.signum if preempted.requested else 0
    if done % self.cfg.log_every:
      return 0
    stop = np.any(multihost_utils.process_allgather(np.array(preempted.requested)))
    return preempted.signum if stop else 0

  def end_of_step(self, done: int, stop: int) -> None:
    """Logs, evaluates and saves after step `done` as their cadences (and a stop) say."""
    cfg = self.cfg
    is_last = done == cfg.steps
    save_now = done % cfg.checkpoint_every == 0 or is_last or stop
    # A log interval also ends at every checkpoint, so that a run resumed from one logs the
    # same means as the run that saved it.
    if done % cfg.log_every == 0 or save_now:
      self._pull_pending()
      self.log(done)
    evaluate_now = done % cfg.eval_every == 0 or is_last
    if evaluate_now:
      self._pull_pending()
    t_pause = time.perf_counter()  # Eval and checkpoints are not training time.
    if evaluate_now:
      self.evaluate(done)
    if save_now:
      self.save(done)
    self.t_interval += time.perf_counter() - t_pause
    if stop:
      self.ckpt.wait()
      print(f'saved the checkpoint at step {done}; rerun the same command to resume', flush=True)

  def log(self, done: int) -> None:
    """Writes and prints the means of the log interval that ends after step `done`."""
    elapsed = time.perf_counter() - self.t_interval
    tokens_per_sec = self.steps_in_interval * self.task.tokens_per_step / elapsed
    last = {f'train/{k}': float(np.mean([h[k] for h in self.history])) for k in self.history[0]}
    last.update({f'train/{k}': float(np.mean([r[k] for r in self.rollouts]))
                 for k in (self.rollouts[0] if self.rollouts else {})})
    last.update({'train/tokens_per_sec': tokens_per_sec,
                 'train/tokens_per_sec_per_device': tokens_per_sec / jax.device_count(),
                 'train/mfu': tokens_per_sec * self.flops_per_token / self.peak,
                 'train/data_wait_frac': self.data_sec / elapsed,  # The rollouts' time, in RL.
                 # This step's (last update's) learning rate.
                 'train/learning_rate': float(self.schedule(done * self.task.updates_per_step
                                                            - 1))})
    self.last = last
    if self.is_main:
      self.writer.write(done, last)
      shown = {'loss': last['train/loss'], 'tok/s': tokens_per_sec, 'mfu': last['train/mfu']}
      print(self.progress.line(done, shown), flush=True)
    self.history, self.rollouts, self.steps_in_interval, self.data_sec = [], [], 0, 0.0
    self.t_interval = time.perf_counter()

  def evaluate(self, done: int) -> None:
    params = self.state.params
    ev = evaluate(self.eval_step, params, self.eval_batches, self.frozen) if self.eval_batches \
        else {}
    if 'eval/loss' in ev:
      ev['eval/perplexity'] = float(np.exp(ev['eval/loss']))
    if self.task.evaluate is not None:
      ev.update({f'eval/{k}': float(v) for k, v in self.task.evaluate(params).items()})
    self.last.update(ev)
    if self.is_main:
      self.writer.write(done, ev)
      print(f'  eval at step {done}: ' + ', '.join(f'{k[5:]} {v:.4g}' for k, v in ev.items()),
            flush=True)

  def save(self, done: int) -> None:
    """Saves the state after step `done` if its weights are finite and their loss (on the next
    step's first batch; a rollout's, on this step's) neither; else halts as diverged."""
    at = done - 1 if self.task.rollout else min(done, self.cfg.steps - 1)
    loss, finite = jax.device_get(self.probe(self.state.params, self.get_batch(at, 0),
                                             self.frozen))
    self.check_loss(float(loss) if finite else float('nan'), done + 1,
                    'the loss of the weights to save' if finite else 'a weight')
    self.ckpt.save(done, self.state)
    self.last_saved = done

  def close(self) -> None:
    if self.prefetch is not None:
      self.prefetch.close()
    self.ckpt.close()
    if hasattr(self, 'writer'):
      self.writer.close()

  def finish(self, stop: int) -> RunResult:
    """Writes loss.png and summary.json; raises Interrupted after a stop."""
    done = self.last_saved
    if self.is_main:
      metrics_lib.plot_losses(self.writer.path, os.path.join(self.workdir, 'loss.png'),
                              title=os.path.basename(os.path.normpath(self.workdir)))
      runs.write_summary(self.workdir, {
          'step': done, 'finished': not stop, 'params': perf.param_count(self.state.params),
          'flops_per_token': self.flops_per_token, **self.last})
    if stop:
      raise Interrupted(stop, done)
    return RunResult(self.state.params, self.last)
