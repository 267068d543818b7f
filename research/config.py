"""The default experiment config (every key any stage reads) and checks across sections.

Experiments start from `default_config()` and change what they need; `--config.a.b=value`
overrides any key from the command line with its type checked.
"""

import dataclasses
import json
import os

import ml_collections

from research import decoding
from research import hf
from research import tokenizers
from research.data import preferences
from research.data import sft as sft_data
from research.data import sources
from research.errors import UserError
from research.train import optimizer
from research.nn.config import NOT_CONFIG_KEYS, ModelConfig


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stage = 'pretrain'  # Which trainer runs the experiment (research/train/<stage>.py).

  c.data = ml_collections.ConfigDict(dict(
      path='',  # '' = the Python standard library's own sources; else a file, folder or .jsonl.
      val_fraction=0.05,
      text_field='text',  # JSONL field holding the text.
  ))
  c.tokenizer = tokenizers.default_config()
  fields = {f.name: f.default for f in dataclasses.fields(ModelConfig)
            if f.name not in NOT_CONFIG_KEYS}
  c.model = ml_collections.ConfigDict(fields)
  # The embedding's rows; 0 = the tokenizer's vocabulary (imported models may have more rows).
  c.model.vocab_size = 0
  c.train = ml_collections.ConfigDict(dict(
      steps=1000,
      batch_size=32,  # Sequences per optimiser step (over all devices and micro-batches).
      seq_len=128,
      grad_accum_steps=1,
      # > 0: the LM loss computes the float32 logits this many positions at a time (a divisor of
      # seq_len), so those of the whole batch never exist at once (large vocabularies).
      loss_chunk=0,
      learning_rate=1e-3,
      warmup_steps=100,
      schedule='cosine',  # cosine | linear | constant (after linear warmup)
      min_lr_ratio=0.1,
      weight_decay=0.1,
      b1=0.9,
      b2=0.95,
      grad_clip=1.0,
      # Clipping and Adam over all gradients as one vector (research/train/optimizer.py): faster
      # for small models. Applies when the mesh keeps parameters whole (see `flat_optimizer`).
      flatten_optimizer=False,
      log_every=50,
      eval_every=250,
      eval_batches=8,
      checkpoint_every=500,
      keep_checkpoints=3,
      # > 0: resume from this step's checkpoint, not the latest (later ones are moved aside).
      resume_step=0,
      # Halt (saving nothing) when a train loss exceeds this times the mean of the last 20 (at
      # least 1), or when the weights about to be saved give such a loss; 0 = only non-finite.
      spike_factor=10.0,
      # Another run's workdir, or hf:DIR (a Hugging Face model directory, research/hf.py, which
      # also sets model.* and tokenizer.*): start from its latest weights and its tokenizer.
      init_from='',
  ))
  # The earlier stages a stage trains first when the key that names their run is empty (e.g.
  # train.init_from -> earlier.sft): what each one's config changes from this one
  # (research/train/stages.py); set by experiments.
  c.earlier = ml_collections.ConfigDict()
  # Device mesh axis sizes (research/parallel.py); -1 = all remaining devices.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
  c.sampling = ml_collections.ConfigDict(dict(
      strategy='sample',  # greedy | sample | beam
      temperature=0.8,
      top_k=0,  # 0 = off
      top_p=1.0,  # 1.0 = off
      num_beams=4,
      length_penalty=1.0,
      max_new_tokens=200,
      prompt='',  # Prompt of the sample written to samples.txt at the end of training.
  ))
  from research.train import stages  # pylint: disable=g-import-not-at-top (they import this)
  for stage in stages.all_stages():  # Each stage's own sections (e.g. sft, lora, ppo).
    for name, section in (stage.sections() if stage.sections else {}).items():
      c[name] = section
  return c




def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
  """The ModelConfig of `config.model` for a tokenizer of `vocab_size` ids (model.vocab_size, when
  set, gives the embedding's rows instead and must hold them)."""
  fields = config.model.to_dict()
  rows = fields.pop('vocab_size', 0)
  if rows and rows < vocab_size:
    raise UserError(f'the tokenizer has {vocab_size} ids but the embedding model.vocab_size={rows} '
                    'rows; use the tokenizer the model was trained with.')
  return ModelConfig(vocab_size=rows or vocab_size, **fields)


def micro_batch(config: ml_collections.ConfigDict) -> int:
  """The rows of one micro-batch: train.batch_size / train.grad_accum_steps."""
  return config.train.batch_size // config.train.grad_accum_steps


def with_imported_model(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config`, with model.* and tokenizer.* those of the Hugging Face model that
  train.init_from='hf:DIR' names (COMPUTE_MODEL_KEYS stay as set); unchanged for other runs."""
  source = config.train.init_from
  if not hf.is_hf(source):
    return config
  config = config.copy_and_resolve_references()
  keys = hf.model_keys(hf.hf_dir(source))
  config.model.update({k: v for k, v in keys.items() if k not in COMPUTE_MODEL_KEYS})
  config.tokenizer.update(kind='hf', path=os.path.abspath(hf.hf_dir(source)))
  return config


def earlier_overrides(stage_config: ml_collections.ConfigDict,
                      base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """What `stage_config` changes from `base`: its stage, seed and whole train section and every
  other key whose value differs (an experiment's `earlier.<name>`, see research/train/stages.py).
  """
  def diff(a: dict, b: dict) -> dict:
    out = {}
    for k, v in a.items():
      if isinstance(v, dict) and isinstance(b.get(k), dict):
        sub = diff(v, b[k])
        if sub:
          out[k] = sub
      elif k not in b or b[k] != v:
        out[k] = v
    return out
  mine, theirs = stage_config.to_dict(), base.to_dict()
  for c in (mine, theirs):
    c.pop('earlier', None)
  out = diff(mine, theirs)
  out.update(stage=mine['stage'], seed=mine['seed'], train=mine['train'])
  return ml_collections.ConfigDict(out)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises UserError for settings that cannot work together (before anything is written)."""
  t = config.train
  model_config(config, vocab_size=1)  # Checks the model section.
  if t.seq_len > config.model.max_len:
    raise UserError(f'train.seq_len={t.seq_len} is longer than model.max_len='
                    f'{config.model.max_len}; lower seq_len or raise max_len.')
  for key in ('steps', 'batch_size', 'seq_len', 'grad_accum_steps', 'log_every', 'eval_every',
              'eval_batches', 'checkpoint_every', 'keep_checkpoints'):
    if t[key] < 1:
      raise UserError(f'train.{key}={t[key]} must be >= 1.')
  if t.resume_step < 0 or t.spike_factor < 0:
    raise UserError(f'train.resume_step={t.resume_step} and train.spike_factor={t.spike_factor} '
                    'must be >= 0 (0: the latest checkpoint; no spike guard).')
  if t.loss_chunk < 0 or (t.loss_chunk and t.seq_len % t.loss_chunk):
    raise UserError(f'train.loss_chunk={t.loss_chunk} must be 0 (off) or divide train.seq_len='
                    f'{t.seq_len}.')
  if t.batch_size % t.grad_accum_steps:
    raise UserError(f'train.batch_size={t.batch_size} is not divisible by train.grad_accum_steps='
                    f'{t.grad_accum_steps}; each micro-batch has batch_size/grad_accum_steps rows.')
  if t.learning_rate <= 0:
    raise UserError(f'train.learning_rate={t.learning_rate} must be > 0.')
  if t.warmup_steps < 0 or not 0 <= t.min_lr_ratio <= 1:
    raise UserError(f'train.warmup_steps={t.warmup_steps} must be >= 0 and train.min_lr_ratio='
                    f'{t.min_lr_ratio} in [0, 1].')
  if t.schedule not in optimizer.SCHEDULES:
    raise UserError(f'train.schedule={t.schedule!r} is not one of {optimizer.SCHEDULES}.')
  decoding.check_sampling(config.sampling)  # The sample at the end of training uses it.
  sources.check_path(config.data.path)
  from research.train import stages  # pylint: disable=g-import-not-at-top (they import this)
  stages.validate(config)  # Its own checks and the earlier stages' (now, not after they ran).
  check_data_files(config, stages.get(config.stage).reads)


def check_data_files(config: ml_collections.ConfigDict, reads: tuple[str, ...]) -> None:
  """Reads and checks the JSONL files the stage will need (every line): sft.path's records and
  reward.path's pairs, so that a bad file is refused before any earlier stage trains for
  minutes."""
  if 'sft' in reads and config.sft.path:
    sft_data.read_jsonl(config.sft.path)
  if 'pairs' in reads and config.reward.path:
    preferences.read_jsonl(config.reward.path)
  if {'sft', 'pairs'} <= set(reads):
    check_held_out_fractions(config)


def check_held_out_fractions(config: ml_collections.ConfigDict) -> None:
  """Raises UserError when a reward, DPO or PPO config holds out its JSONL SFT records and
  preference pairs with different fractions. Both split by the same prompt hash (`split` in
  research/data/sft.py), so the prompts between the two fractions would be trained on by one
  stage (SFT, the reward model, DPO) and held out by another (the reward model's accuracy, DPO's
  and PPO's exact match). The built-in task's splits use neither fraction."""
  s, r = config.sft, config.reward
  if s.path and r.path and s.held_out_fraction != r.held_out_fraction:
    raise UserError(f'sft.held_out_fraction={s.held_out_fraction} and reward.held_out_fraction='
                    f'{r.held_out_fraction} differ, so prompts held out by one are trained on by '
                    'another stage; set them equal.')


# Sections that fix what a workdir holds (weights, tokenizer, token caches): a rerun in the same
# workdir must keep them, and the optimizer state's layout (`flat_optimizer`); train.*, mesh.* and
# sampling.* may otherwise change between runs (e.g. more steps).
FIXED_SECTIONS = ('model', 'tokenizer', 'data')
# Model keys that change neither the shapes nor the meaning of the weights: free to differ from
# the run a run starts from (train.init_from).
COMPUTE_MODEL_KEYS = ('dropout', 'dtype', 'param_dtype', 'attention', 'remat', 'scan_layers')
# Of those, the ones that also leave a workdir's checkpoints and its training as they are: free
# to change between runs in one workdir (and absent from workdirs made before they existed).
# scan_layers and param_dtype fix the checkpoints' layout, dropout changes what the rest learns.
FREE_KEYS = tuple(('model', k) for k in COMPUTE_MODEL_KEYS
                  if k not in ('scan_layers', 'param_dtype', 'dropout'))
# Mesh axes that shard parameters (research/parallel.py).
PARAM_AXES = ('fsdp', 'tensor', 'expert')


def flat_optimizer(config) -> bool:
  """Whether the optimizer state is one flat vector: train.flatten_optimizer, and a mesh that
  keeps parameters whole (mesh.fsdp = tensor = expert = 1; a flat vector cannot follow the
  parameters' sharding). `config` may be a saved config.json (a dict, perhaps without the key)."""
  mesh = config.get('mesh', {})
  return (bool(config['train'].get('flatten_optimizer', False))
          and all(mesh.get(a, 1) == 1 for a in PARAM_AXES))


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises UserError when `workdir` holds a run made with other fixed sections (or another
  optimizer state layout). A workdir that holds nothing else (a run that stopped at a config or
  data error) takes the new config."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path) or not set(os.listdir(workdir)) - {'config.json', '.lock'}:
    return
  with open(path) as f:
    saved = json.load(f)
  current, defaults = json.loads(config.to_json()), json.loads(default_config().to_json())
  # A key the saved config lacks predates it: it held the key's default then.
  was = lambda s, k: saved.get(s, {}).get(k, defaults[s].get(k))
  diffs = [f'{s}.{k}: {was(s, k)!r} there, {v!r} now' for s in FIXED_SECTIONS
           for k, v in current[s].items() if was(s, k) != v and (s, k) not in FREE_KEYS]
  layouts = [('per parameter', 'flat')[flat_optimizer(c)] for c in (saved, current)]
  if layouts[0] != layouts[1]:  # Its checkpoints would not restore.
    diffs.append(f'optimizer state {layouts[0]} there, {layouts[1]} now (train.flatten_optimizer '
                 f'with mesh.{"/".join(PARAM_AXES)} = 1 makes it flat)')
  if diffs:
    raise UserError(f'{workdir} holds a run with another config ({"; ".join(diffs[:3])}); '
                    'use a new --workdir, or the settings it was made with.')


def save_to_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes `workdir/config.json` after `check_workdir`."""
  check_workdir(config, workdir)
  path = os.path.join(workdir, 'config.json')
  os.makedirs(workdir, exist_ok=True)
  with open(path + '.tmp', 'w') as f:
    f.write(config.to_json(indent=2))
  os.replace(path + '.tmp', path)
