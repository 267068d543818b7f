"""Everything about a workdir: its config.json, the lock that keeps two processes from training
in one (and the config.json that a failed attempt leaves as it was), summary.json (one writer,
one reader), and the latest weights of any run (`load_trained`, `init_from`: how a stage exports
them is its `stages.Stage.weights`), a reward run's model (`load_reward`).

A run holds `<workdir>/.lock` (an flock on a file naming its host and pid) while it trains; a
second process on the same workdir is refused in one line naming the holder. The kernel drops an
flock when its process dies, however it dies, so a lock left by a killed run is taken over (and
said so). Multi-host runs: process 0 holds it. Read-only modes (generate, chat, ...) take none.
"""

import contextlib
import fcntl
import json
import os
import socket
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections

from research import config as config_lib
from research import hf
from research import rl
from research import tokenizers
from research.checkpoint import Checkpointer
from research.errors import UserError
from research.nn import lora
from research.nn.transformer import DecoderLM, ScalarLM, init_decoder, to_layout
from research.train.optimizer import make_optimizer

LOCK = '.lock'


def check_writable(workdir: str) -> None:
  """Raises UserError unless `workdir` is, or can be made, a writable folder."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f'--workdir={workdir} is a file, not a folder; give a folder path.')
  parent = workdir
  while not os.path.exists(parent):
    parent = os.path.dirname(os.path.abspath(parent))
  if not os.access(parent, os.W_OK | os.X_OK):
    raise UserError(f'--workdir={workdir} cannot be written ({parent} is read-only for this '
                    'user); give a writable folder.')


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[None]:
  """Holds the workdir's lock (process 0 only) for the body; raises UserError when another live
  process holds it."""
  if jax.process_index() != 0:
    yield
    return
  check_writable(workdir)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    with os.fdopen(os.dup(fd)) as f:
      previous = f.read().strip()
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = json.loads(previous) if previous.startswith('{') else {}
      raise UserError(f'{workdir} is in use by process {holder.get("pid", "?")} on '
                      f'{holder.get("host", "?")} (since {holder.get("since", "?")}); wait for it '
                      f'to finish or stop it, or use another --workdir.') from None
    if previous:
      print(f'note: taking over the lock of a run that ended without releasing it ({previous})',
            flush=True)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({'host': socket.gethostname(), 'pid': os.getpid(),
                              'since': time.strftime('%Y-%m-%d %H:%M:%S')}).encode(), 0)
    try:
      yield
    finally:
      os.ftruncate(fd, 0)  # An empty lock file: released cleanly.
      fcntl.flock(fd, fcntl.LOCK_UN)
  finally:
    os.close(fd)


@contextlib.contextmanager
def config_kept_on_failure(workdir: str) -> Iterator[None]:
  """Restores `workdir/config.json` (or removes it, if there was none) when the body fails
  before saving a checkpoint: an attempt that trained nothing leaves the record of the run that
  did (process 0 only)."""
  path = os.path.join(workdir, 'config.json')
  previous = _read(path)

  def checkpoints() -> set[str]:
    directory = os.path.join(workdir, 'checkpoints')
    return set(os.listdir(directory)) if os.path.isdir(directory) else set()

  before = checkpoints()
  try:
    yield
  except BaseException:
    if jax.process_index() == 0 and checkpoints() <= before:
      if previous is None:
        if os.path.exists(path):
          os.remove(path)
      elif _read(path) != previous:
        with open(path + '.tmp', 'wb') as f:
          f.write(previous)
        os.replace(path + '.tmp', path)
    raise


def _read(path: str) -> bytes | None:
  if not os.path.exists(path):
    return None
  with open(path, 'rb') as f:
    return f.read()


SUMMARY = 'summary.json'


def write_summary(workdir: str, summary: dict) -> None:
  """Writes `workdir/summary.json`: how far the run got ('step', 'finished': it reached
  train.steps) and its last metrics; read by `read_summary` (later stages, sweeps)."""
  path = os.path.join(workdir, SUMMARY)
  with open(path + '.tmp', 'w') as f:
    json.dump(summary, f)
  os.replace(path + '.tmp', path)


def read_summary(workdir: str) -> dict:
  """`workdir/summary.json` ({} when the run has not ended yet)."""
  text = _read(os.path.join(workdir, SUMMARY))
  return {} if text is None else json.loads(text)


def is_done(workdir: str) -> bool:
  """Whether `workdir` holds a run that finished."""
  return bool(read_summary(workdir).get('finished'))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config.json of the run in `workdir`."""
  text = _read(os.path.join(workdir, 'config.json'))
  if text is None:
    raise UserError(f'{workdir} holds no run (no config.json); train it first or fix --workdir.')
  return ml_collections.ConfigDict(json.loads(text))


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes `workdir/config.json` (process 0) after `config.check_workdir`."""
  if jax.process_index() == 0:
    config_lib.save_to_workdir(config, workdir)


def restore_params(config: ml_collections.ConfigDict, workdir: str,
                   init_params: Callable[[jax.Array], Any]) -> tuple[Any, int]:
  """The parameters of the latest checkpoint in `workdir` and its step, on one device (for
  inference), whatever mesh the checkpoint was saved from."""
  from research.train.loop import TrainState  # pylint: disable=g-import-not-at-top
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


def load_trained(workdir: str) -> tuple[ml_collections.ConfigDict, tokenizers.Tokenizer,
                                        DecoderLM, Any]:
  """(config, tokenizer, model, params) of the latest decoder weights of a run in `workdir` (as
  its stage exports them; LoRA adapters merged into their base), or of the Hugging Face model
  'hf:DIR'."""
  if hf.is_hf(workdir):
    config = config_lib.default_config()
    config.train.init_from = workdir
    config = config_lib.with_imported_model(config)
    tok = tokenizers.load_tokenizer(hf.hf_dir(workdir))
    model = DecoderLM(config_lib.model_config(config, tok.vocab_size))
    return config, tok, model, hf.load_params(hf.hf_dir(workdir), model.cfg)
  config = read_config(workdir)
  from research.train import stages  # pylint: disable=g-import-not-at-top
  stage = stages.get(config.get('stage', 'pretrain'))
  if stage.not_generative:
    raise UserError(f'{workdir} holds {stage.not_generative}')
  if config.model.family == 'encoder':
    raise UserError(f'{workdir} holds a masked LM (model.family=encoder), which does not generate '
                    'text; use a decoder or encoder_decoder run.')
  tok = tokenizers.load_tokenizer(os.path.join(workdir, 'tokenizer'))
  model = DecoderLM(config_lib.model_config(config, tok.vocab_size))
  rank = config.get('lora', {}).get('rank', 0)
  if rank:  # The checkpoint holds LoRA adapters of train.init_from's weights.
    _, _, _, base = load_trained(config.train.init_from)
    adapters, _ = restore_params(
        config, workdir, lambda key: lora.init(key, base, rank, config.lora.targets))
    return config, tok, model, lora.merge(base, adapters, config.lora.alpha, rank)
  if stage.weights != 'checkpoints':  # The stage exports its decoder weights alone there.
    ckpt = Checkpointer(os.path.join(workdir, stage.weights))
    target = init_decoder(model, jax.random.key(0))
    step, params = ckpt.restore_newest(lambda s: ckpt.restore(s, target))
    ckpt.close()
    if step is None:
      raise UserError(f'{workdir} holds no final {stage.name} weights yet ({stage.weights}/); '
                      'run it to train.steps first.')
    return config, tok, model, params
  params, _ = restore_params(config, workdir, lambda key: init_decoder(model, key))
  return config, tok, model, params


def export_weights(workdir: str, folder: str, step: int, params: Any) -> None:
  """Saves decoder weights `params` as <workdir>/<folder> (a stage's `weights`)."""
  ckpt = Checkpointer(os.path.join(workdir, folder), 1)
  ckpt.save(step, params)
  ckpt.close()


def init_from(config: ml_collections.ConfigDict, workdir: str) -> tuple[tokenizers.Tokenizer, Any]:
  """(tokenizer, weights) of the latest checkpoint of the run in `config.train.init_from`, or of
  the Hugging Face model 'hf:DIR' (`config` from config.with_imported_model), whose weights are
  read straight into the shardings the training loop gives them.

  A run must have this config's model (but for COMPUTE_MODEL_KEYS) and tokenizer sections (a key
  its config.json lacks counts as equal: it predates the key). The tokenizer is copied into
  `workdir/tokenizer`, so this run and every later one use it.
  """
  source = config.train.init_from
  if hf.is_hf(source):
    from research.train import loop  # pylint: disable=g-import-not-at-top
    tok = tokenizers.load_tokenizer(hf.hf_dir(source))
    cfg = config_lib.model_config(config, tok.vocab_size)
    abstract = jax.eval_shape(lambda key: init_decoder(DecoderLM(cfg), key), jax.random.key(0))
    params = hf.load_params(hf.hf_dir(source), cfg, loop.param_shardings(config, abstract))
    copy_tokenizer(tok, workdir)
    return tok, params
  if not os.path.exists(os.path.join(source, 'config.json')):
    raise UserError(f'train.init_from={source!r} holds no run (no config.json); give the '
                    '--workdir of a trained run.')
  saved, tok, _, params = load_trained(source)
  saved, current = json.loads(saved.to_json()), json.loads(config.to_json())
  diffs = [f'{s}.{k}: {saved[s].get(k)!r} there, {v!r} here' for s in ('model', 'tokenizer')
           for k, v in current[s].items()
           if k not in config_lib.COMPUTE_MODEL_KEYS and saved[s].get(k, v) != v]
  if diffs:
    raise UserError(f'train.init_from={source!r} has another architecture ({"; ".join(diffs[:3])}'
                    '); set the same --config.model.* and --config.tokenizer.* as that run.')
  copy_tokenizer(tok, workdir)
  return tok, to_layout(params, config.model.scan_layers)


def copy_tokenizer(tok: tokenizers.Tokenizer, workdir: str) -> None:
  """Saves `tok` as `workdir/tokenizer` unless it is there."""
  directory = os.path.join(workdir, 'tokenizer')
  if not os.path.isdir(directory):
    tok.save(directory + '.tmp')
    os.replace(directory + '.tmp', directory)


def load_reward(workdir: str) -> tuple[tokenizers.Tokenizer, rl.RewardModel]:
  """The tokenizer and the normalised reward model of a finished reward run in `workdir`."""
  text = _read(os.path.join(workdir, 'reward_norm.json'))
  if text is None:
    raise UserError(f'{workdir} holds no finished reward model (no reward_norm.json); train one '
                    '(--experiment=reward_small) or fix ppo.reward_from.')
  config, norm = read_config(workdir), json.loads(text)
  tok = tokenizers.load_tokenizer(os.path.join(workdir, 'tokenizer'))
  model = ScalarLM(config_lib.model_config(config, tok.vocab_size))
  params, _ = restore_params(config, workdir, lambda key: model.init(
      key, jnp.zeros((1, 1), jnp.int32))['params'])
  return tok, rl.RewardModel(model, params, norm['gain'], norm['bias'])
