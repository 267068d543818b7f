"""launch.py on bad input: one clear line, exit code 2, nothing in the workdir lost."""

import ast
import importlib
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from research import config as config_lib
from research.config import default_config
from research.errors import UserError
from research.train import stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--config.model.num_layers=1', '--config.model.d_model=32', '--config.model.num_heads=2',
        '--config.train.seq_len=16', '--config.train.batch_size=4', '--config.train.steps=2',
        '--config.train.eval_batches=1', '--config.data.val_fraction=0.2',
        '--config.sampling.max_new_tokens=4']


def launch(*args, workdir=None):
  cmd = [sys.executable, 'launch.py', *args]
  if workdir:
    cmd.append(f'--workdir={workdir}')
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc, *words):
  assert proc.returncode == 2, proc.stdout + proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
  assert len(lines) == 1 and 'Traceback' not in proc.stderr, proc.stderr
  for w in words:
    assert w in lines[0], lines[0]


EXPERIMENTS = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, 'experiments'))
                     if f.endswith('.py') and f != '__init__.py')


@pytest.mark.parametrize('name', EXPERIMENTS)
def test_each_experiment_is_valid_and_generates_within_max_len(name):
  """Every shipped config passes validation, and --mode=generate with its defaults fits the model:
  a one-token prompt (an encoder-decoder's BOS) + sampling.max_new_tokens <= model.max_len
  (encoders do not generate)."""
  config = importlib.import_module(f'experiments.{name}').get_config()
  config_lib.validate(config)
  if config.model.family != 'encoder':
    assert 1 + config.sampling.max_new_tokens <= config.model.max_len


@pytest.mark.parametrize('section, key, value, words', [
    ('earlier.reward.train', 'warmup_steps', -5, 'earlier.reward: train.warmup_steps=-5'),
    ('train', 'min_lr_ratio', 1.5, 'min_lr_ratio=1.5 in [0, 1]'),
    ('earlier.sft.train', 'schedule', 'cosin', "earlier.sft: train.schedule='cosin' is not one"),
])
def test_validate_checks_schedules_and_the_earlier_stages_up_front(section, key, value, words):
  """An experiment's earlier stages (ppo_small: SFT, then the reward model) are checked before
  the first trains, so a bad setting of the last does not surface after the others ran."""
  config = importlib.import_module('experiments.ppo_small').get_config()
  config_lib.validate(config)
  target = config
  for part in section.split('.'):
    target = target[part]
  target[key] = value
  with pytest.raises(UserError, match=re.escape(words)):
    config_lib.validate(config)


@pytest.mark.parametrize('args, words', [
    (['--experiment=pretrain_smal'], ['unknown experiment', 'pretrain_small']),
    (['--experiment=../launch'], ['unknown experiment', "'../launch'"]),
    (['--experiment=__init__'], ['unknown experiment', 'pretrain_small']),
    (['--experiment=pretrain_small', '--config=launch.py'], ['--config takes no file']),
    (['--experiment=pretrain_small', '--config.train.stepz=3'], ['stepz', 'steps']),
    (['--experiment=pretrain_small', '--config.train.steps=ten'], ['train.steps', 'ten']),
    (['--experiment=pretrain_small', '--config.model.num_heads=5'], ['not divisible', 'num_heads']),
    (['--experiment=pretrain_small', '--config.train.seq_len=4096'], ['seq_len', 'max_len']),
    (['--experiment=pretrain_small', '--config.data.path=/no/such/file.txt'], ['does not exist']),
    (['--experiment=pretrain_small', '--mode=fly'], ['mode']),
    (['--experiment=pretrain_small', '--num_processes=2'], ['--num_processes', '--multihost']),
    (['--experiment=pretrain_small', '--mode=sweep', '--sweep_dry_run', '--config.seed', '7'],
     ['--config.seed=VALUE']),
])
def test_bad_flags_and_configs(args, words, tmp_path):
  assert_one_line_error(launch(*args, workdir=str(tmp_path / 'w')), *words)
  assert not os.path.exists(tmp_path / 'w' / 'checkpoints')


def test_bad_data(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  (empty / 'blank.txt').write_text('  \n')
  assert_one_line_error(launch('--experiment=pretrain_small', f'--config.data.path={empty}',
                               workdir=str(tmp_path / 'w1')), 'holds no text')
  binary = tmp_path / 'bin'
  binary.mkdir()
  (binary / 'ok.txt').write_text('hello ' * 100)
  (binary / 'bad.dat').write_bytes(b'abc\xff\xfe\x00def')
  assert_one_line_error(launch('--experiment=pretrain_small', f'--config.data.path={binary}',
                               workdir=str(tmp_path / 'w2')), 'bad.dat', 'UTF-8')
  jsonl = tmp_path / 'data.jsonl'
  jsonl.write_text('{"text": "fine"}\n{"txt": "no field"}\n')
  assert_one_line_error(launch('--experiment=pretrain_small', f'--config.data.path={jsonl}',
                               workdir=str(tmp_path / 'w3')), 'data.jsonl:2', 'text')


def test_workdir_of_another_model_is_refused_and_kept(tiny_corpus, tmp_path):
  workdir = str(tmp_path / 'run')
  first = launch('--experiment=pretrain_small', f'--config.data.path={tiny_corpus}', *TINY,
                 workdir=workdir)
  assert first.returncode == 0, first.stderr[-2000:]
  before = {f: os.path.getmtime(os.path.join(dp, f)) for dp, _, fs in os.walk(workdir) for f in fs}
  with open(os.path.join(workdir, 'config.json')) as f:
    config_before = f.read()
  proc = launch('--experiment=pretrain_small', f'--config.data.path={tiny_corpus}', *TINY,
                '--config.model.d_model=64', workdir=workdir)
  assert_one_line_error(proc, 'model.d_model', '--workdir')
  after = {f: os.path.getmtime(os.path.join(dp, f)) for dp, _, fs in os.walk(workdir) for f in fs}
  assert after == before
  with open(os.path.join(workdir, 'config.json')) as f:
    assert f.read() == config_before


def test_optimizer_layout_is_fixed_in_a_workdir(tmp_path):
  """A workdir's checkpoints hold a flat or a per-parameter optimizer state (flat_optimizer):
  made before train.flatten_optimizer existed, it resumes per parameter and refuses flat; made
  flat, it resumes on another data-parallel mesh but not on one that shards parameters."""
  config = default_config()
  saved = json.loads(config.to_json())
  del saved['train']['flatten_optimizer']
  (tmp_path / 'old' / 'checkpoints').mkdir(parents=True)
  (tmp_path / 'old' / 'config.json').write_text(json.dumps(saved))
  config_lib.save_to_workdir(config, str(tmp_path / 'old'))
  config.train.flatten_optimizer = True
  with pytest.raises(UserError, match='optimizer state per parameter there, flat now'):
    config_lib.save_to_workdir(config, str(tmp_path / 'old'))
  config_lib.save_to_workdir(config, str(tmp_path / 'new'))
  (tmp_path / 'new' / 'checkpoints').mkdir()
  config.mesh.data, config.train.steps = 4, 5
  config_lib.save_to_workdir(config, str(tmp_path / 'new'))
  config.mesh.fsdp = 2
  with pytest.raises(UserError, match='optimizer state flat there, per parameter now'):
    config_lib.save_to_workdir(config, str(tmp_path / 'new'))


def test_a_workdir_holding_only_its_config_takes_a_corrected_one(tmp_path):
  """A run that stopped at a data error (a mistyped data.path) wrote only config.json: the rerun
  with the right path is accepted; once the workdir holds its tokenizer, it is fixed."""
  config = default_config()
  config.data.path = '/no/such/file.txt'
  config_lib.save_to_workdir(config, str(tmp_path))
  config.data.path = '/the/right/file.txt'
  config_lib.save_to_workdir(config, str(tmp_path))
  (tmp_path / 'tokenizer').mkdir()
  config.data.path = '/another/file.txt'
  with pytest.raises(UserError, match='data.path'):
    config_lib.save_to_workdir(config, str(tmp_path))


def test_attention_kernel_may_change_in_a_workdir(tmp_path):
  """model.attention says how to compute, not what: a workdir made before the key existed, or
  with another kernel, is resumed; another width is refused."""
  config = default_config()
  config.model.attention = 'xla'
  saved = json.loads(config.to_json())
  del saved['model']['attention']
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  (tmp_path / 'checkpoints').mkdir()
  config_lib.save_to_workdir(config, str(tmp_path))
  config.model.d_model = 64
  with pytest.raises(UserError, match='model.d_model'):
    config_lib.save_to_workdir(config, str(tmp_path))


def test_stages_are_the_registered_ones():
  with pytest.raises(UserError) as err:
    stages.get('stages')
  listed = re.search(r'not one of \[(.*)\]', str(err.value)).group(1)
  assert listed == "'dpo', 'grpo', 'mlm', 'ppo', 'pretrain', 'reward', 'rlhf', 'seq2seq', 'sft'"
  assert [s.name for s in stages.all_stages()] == list(stages.MODULES)
  needs = {s.name: [n.stage for n in s.needs] for s in stages.all_stages()}
  assert needs['ppo'] == ['sft', 'reward'] and needs['dpo'] == ['sft'] and needs['pretrain'] == []


def imported_modules(path: pathlib.Path) -> set[str]:
  """The research.* modules a file imports (`from research.train import a, b` counts a and b)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      found |= {node.module} | {f'{node.module}.{a.name}' for a in node.names}
  return {m for m in found if m.startswith('research.')}


def test_no_stage_module_imports_another_and_no_function_is_long():
  """Shared needs live in runs.py, data/, rl.py or research/train's shared modules (lm, loop,
  optimizer, stages), not in another stage; no function under research/ exceeds 80 lines."""
  root = pathlib.Path(stages.__file__).parent
  stage_modules = set(stages.MODULES.values())
  for name, module in stages.MODULES.items():
    others = imported_modules(root / f'{name}.py') & (stage_modules - {module})
    assert not others, f'{module} imports {others}'
  long = []
  for path in root.parent.rglob('*.py'):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        if node.end_lineno - node.lineno + 1 > 80:
          long.append(f'{path.name}:{node.name}')
  assert not long


def test_a_workdir_keeps_its_layer_layout_and_may_change_remat_and_dtype(tmp_path):
  """Checkpoints hold the blocks unrolled or scanned: resuming with the other layout is refused in
  one line (train.init_from converts, see test_model); remat and compute dtype may change."""
  config = default_config()
  (tmp_path / 'config.json').write_text(config.to_json())
  (tmp_path / 'checkpoints').mkdir()
  config.model.update(remat='full', dtype='bfloat16')
  config_lib.save_to_workdir(config, str(tmp_path))
  config.model.scan_layers = True
  with pytest.raises(UserError, match='model.scan_layers: False there, True now') as err:
    config_lib.save_to_workdir(config, str(tmp_path))
  assert '\n' not in str(err.value)


def test_rlhf_pipeline_is_flat_and_an_earlier_stage_is_overridden_by_name():
  """rlhf_small's config holds each earlier stage's changes only (44,525 characters of nested
  configs before), and --config.earlier.sft.train.steps reaches the SFT stage alone."""
  from experiments import rlhf_small  # pylint: disable=g-import-not-at-top
  config = rlhf_small.get_config()
  assert len(config.to_json(indent=2)) < 44525 / 3
  assert sorted(config.earlier) == ['dpo', 'ppo', 'reward', 'sft']
  proc = subprocess.run(
      [sys.executable, '-c', 'import sys, launch; from absl import flags; '
       'launch.parse_flags(sys.argv); print(flags.FLAGS.config.earlier.sft.train.steps)',
       '--experiment=rlhf_small', '--config.earlier.sft.train.steps=7'],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True,
      text=True, timeout=120)
  assert proc.stdout.strip().splitlines()[-1] == '7', proc.stderr[-2000:]
  config.earlier.sft.train.steps = 7
  sft = stages.earlier_config(config, 'sft')
  assert (sft.stage, sft.train.steps, sft.train.learning_rate) == ('sft', 7, 2e-3)
  ppo = stages.earlier_config(config, 'ppo')
  assert (ppo.train.steps, ppo.ppo.epochs, ppo.sft.kinds) == (300, 2, ('sort',))
  assert stages.earlier_config(config, 'reward').reward.policy_pairs == 48000


def test_a_new_stage_is_one_module_and_one_registry_line(tiny_corpus, tmp_path, monkeypatch):
  """tests/toy_stage.py, registered by one line: its config section joins the defaults, the
  pretrain run it needs is trained first in <workdir>/pretrain and linked as train.init_from,
  and it trains on the shared loop (metrics, checkpoints, summary.json)."""
  from research import runs  # pylint: disable=g-import-not-at-top
  from tests.conftest import tiny_config  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(stages.MODULES, 'toy', 'tests.toy_stage')
  config = tiny_config(tiny_corpus, steps=150, batch_size=16, learning_rate=0.05, log_every=50,
                      eval_every=150, checkpoint_every=150)
  assert config.toy.noise == 0.1
  config.stage = 'toy'
  config.earlier.pretrain = config_lib.earlier_overrides(tiny_config(tiny_corpus, steps=2), config)
  config_lib.validate(config)
  workdir = str(tmp_path)
  result = stages.train(config, workdir)
  assert runs.read_config(workdir).train.init_from == os.path.join(workdir, 'pretrain')
  assert runs.is_done(os.path.join(workdir, 'pretrain')) and runs.is_done(workdir)
  assert result.metrics['eval/loss'] < 0.1  # The noise's variance is 0.01.
