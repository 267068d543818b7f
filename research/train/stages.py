"""Stages by name, and running an earlier stage a later one needs (pretrain -> sft -> reward ->
ppo), each in its own workdir, skipped when already done there."""

import importlib
import json
import os
import pathlib
import re
import time
from types import ModuleType

import jax
import ml_collections

from research import config as config_lib
from research import runs
from research.errors import UserError


def stage_module(stage: str) -> ModuleType:
  """research/train/<stage>.py, the trainer of config.stage (any module there with a
  train_and_evaluate(config, workdir))."""
  stages = sorted(p.stem for p in pathlib.Path(__file__).parent.glob('*.py')
                  if re.search(r'^def train_and_evaluate\(', p.read_text(), re.M))
  if stage not in stages:
    raise UserError(f'stage={stage!r} is not one of {stages}; set --config.stage to one of them.')
  return importlib.import_module(f'research.train.{stage}')


def is_done(workdir: str) -> bool:
  """Whether `workdir` holds a run that finished (its summary.json says so)."""
  path = os.path.join(workdir, 'summary.json')
  if not os.path.exists(path):
    return False
  with open(path) as f:
    return bool(json.load(f).get('finished'))


def run_stage(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Trains `config` (of any stage) in `workdir` unless a finished run is there (an unfinished
  one resumes). Returns the absolute workdir, for a later stage's train.init_from."""
  workdir = os.path.abspath(workdir)
  config = config_lib.with_imported_model(config)
  if is_done(workdir):
    print(f'stage {config.stage}: done in {workdir}', flush=True)
    return workdir
  config_lib.validate(config)
  config_lib.check_workdir(config, workdir)
  with runs.lock(workdir), runs.config_kept_on_failure(workdir):
    if jax.process_index() == 0:
      config_lib.save_to_workdir(config, workdir)
    print(f'stage {config.stage}: training in {workdir}', flush=True)
    start = time.perf_counter()
    stage_module(config.stage).train_and_evaluate(config, workdir)
  minutes, seconds = divmod(int(time.perf_counter() - start), 60)
  print(f'stage {config.stage}: finished in {minutes} min {seconds:02d} s', flush=True)
  return workdir
