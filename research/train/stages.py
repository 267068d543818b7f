"""The stage registry: every training stage by name, what it needs from earlier stages, and
running a stage after the earlier ones it needs (pretrain -> sft -> reward -> ppo ...), each in
its own workdir, skipped when already done there.

A stage module (research/train/<name>.py) defines `STAGE = Stage(...)`: its train function
(which builds a `loop.Task` and calls `loop.run`), the earlier runs it needs and the config key
each one fills, its config section's defaults and its checks. Its line in `MODULES` registers it.

Earlier stages are flat: `config.earlier.<name>` holds only what that stage's config changes
from this one (see `config.earlier_overrides`); it runs in <root>/<name>, and every stage of the
pipeline that needs <name> links to that one run. An earlier stage's key is overridden as
--config.earlier.<name>.train.steps=....
"""

import dataclasses
import importlib
import os
import time
from typing import Any, Callable

import ml_collections

from research import config as config_lib
from research import runs
from research.errors import UserError

MODULES = {
    'pretrain': 'research.train.pretrain',
    'mlm': 'research.train.mlm',
    'seq2seq': 'research.train.seq2seq',
    'sft': 'research.train.sft',
    'reward': 'research.train.reward',
    'dpo': 'research.train.dpo',
    'ppo': 'research.train.ppo',
    'grpo': 'research.train.grpo',
    'rlhf': 'research.train.rlhf',
}


@dataclasses.dataclass(frozen=True)
class Need:
  """An earlier run a stage needs: stage `stage`'s workdir goes into the config key `key`
  ('section.name') when that key is empty and `when(config)` holds ('' = no key: the stage
  finds it in <root>/<stage>)."""
  stage: str
  key: str = 'train.init_from'
  when: Callable[[ml_collections.ConfigDict], bool] = lambda config: True


@dataclasses.dataclass(frozen=True)
class Stage:
  """A training stage.

  train(config, workdir): trains in `workdir` (config.json written, needs filled in), returns
    the loop's RunResult (or the stage's results).
  sections() -> {section name: its default keys}: the config sections the stage owns.
  check(config): raises UserError for settings of its section that cannot work.
  step_spec(config, model_cfg) -> (Task, one batch): its train step on placeholder data, for
    research/compile.py (None: the stage has no step of its own).
  weights: the folder under the workdir holding its decoder weights ('checkpoints': the train
    state's params; else a checkpoint of the decoder params alone, e.g. PPO's 'policy').
  not_generative: why its weights do not generate text ('' = they do).
  reads: the data files its config names that are read (and checked) up front: 'sft', 'pairs'.
  """
  name: str
  train: Callable[[ml_collections.ConfigDict, str], Any]
  needs: tuple[Need, ...] = ()
  family: str = 'decoder'
  sections: Callable[[], dict[str, ml_collections.ConfigDict]] | None = None
  check: Callable[[ml_collections.ConfigDict], None] | None = None
  step_spec: Callable | None = None
  weights: str = 'checkpoints'
  not_generative: str = ''
  reads: tuple[str, ...] = ()


def get(name: str) -> Stage:
  """The registered stage `name`."""
  if name not in MODULES:
    raise UserError(f'stage={name!r} is not one of {sorted(MODULES)}; set --config.stage to one '
                    'of them.')
  return importlib.import_module(MODULES[name]).STAGE


def all_stages() -> list[Stage]:
  return [get(name) for name in MODULES]


def earlier_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """The config of the earlier stage `name`: `config` with `config.earlier[name]` applied."""
  if name not in config.earlier:
    raise UserError(f'this stage needs a {name} run: set the key that names one (e.g. '
                    f'--config.train.init_from) to its workdir, or give the experiment an '
                    f'earlier.{name} config to train one.')
  out = config.copy_and_resolve_references()

  def apply(target: ml_collections.ConfigDict, overrides: ml_collections.ConfigDict, path: str):
    for k, v in overrides.items():
      if k not in target:
        raise UserError(f'earlier.{name}.{path}{k} is not a config key; see research/config.py.')
      if isinstance(v, ml_collections.ConfigDict) and k != 'earlier':
        apply(target[k], v, f'{path}{k}.')
      else:
        target[k] = v
  with out.unlocked():
    apply(out, config.earlier[name], '')
  return out


def validate(config: ml_collections.ConfigDict) -> None:
  """The stage's own checks, and every earlier stage's config (before anything runs)."""
  stage = get(config.stage)
  if config.model.family != stage.family:
    raise UserError(f'model.family={config.model.family!r} cannot train in stage='
                    f'{config.stage!r}, which trains a {stage.family!r} model; set '
                    f'--config.model.family={stage.family} (or another stage).')
  if stage.check is not None:
    stage.check(config)
  for name in config.earlier:
    earlier = earlier_config(config, name)
    earlier.earlier = ml_collections.ConfigDict()  # Its own links are this config's: checked here.
    try:
      config_lib.validate(earlier)
    except UserError as e:
      raise UserError(f'earlier.{name}: {e}') from None


def link_earlier(config: ml_collections.ConfigDict, root: str) -> ml_collections.ConfigDict:
  """`config` with each empty key of a needed earlier run set to that run's workdir, after
  running it (in <root>/<name>) unless it is done there."""
  config = config.copy_and_resolve_references()
  for need in get(config.stage).needs:
    section, key = need.key.split('.') if need.key else ('', '')
    if need.when(config) and not (key and config[section][key]):
      workdir = run_stage(earlier_config(config, need.stage), os.path.join(root, need.stage), root)
      if key:
        config[section][key] = workdir
  return config


def train(config: ml_collections.ConfigDict, workdir: str, root: str | None = None) -> Any:
  """Trains `config` in `workdir` (resuming) after the earlier runs it needs (in <root>/<name>,
  default <workdir>/<name>); the caller holds the workdir's lock."""
  runs.write_config(config, workdir)
  config = link_earlier(config, root or workdir)
  runs.write_config(config, workdir)  # With the earlier runs' workdirs.
  return get(config.stage).train(config, workdir)


def run_stage(config: ml_collections.ConfigDict, workdir: str, root: str | None = None) -> str:
  """Trains `config` (of any stage) in `workdir` unless a finished run is there (an unfinished
  one resumes). Returns the absolute workdir, for a later stage's config."""
  workdir = os.path.abspath(workdir)
  config = config_lib.with_imported_model(config)
  if runs.is_done(workdir):
    print(f'stage {config.stage}: done in {workdir}', flush=True)
    return workdir
  config_lib.validate(config)
  config_lib.check_workdir(config, workdir)
  with runs.lock(workdir), runs.config_kept_on_failure(workdir):
    print(f'stage {config.stage}: training in {workdir}', flush=True)
    start = time.perf_counter()
    train(config, workdir, root)
  minutes, seconds = divmod(int(time.perf_counter() - start), 60)
  print(f'stage {config.stage}: finished in {minutes} min {seconds:02d} s', flush=True)
  return workdir
