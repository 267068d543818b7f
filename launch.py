"""The one entry point: python launch.py --experiment=NAME [--config.a.b=value ...] [--mode=...]

Loads experiments/NAME.py:get_config(), applies command-line overrides (type-checked by
ml_collections), and runs the experiment's stage in --workdir (default runs/NAME). Rerunning with
the same workdir resumes from its latest checkpoint.
"""

import importlib
import os
import pathlib
import signal
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

EXPERIMENTS = pathlib.Path(__file__).resolve().parent / 'experiments'

flags.DEFINE_string('experiment', None, 'Experiment name: a file experiments/NAME.py.')
flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics and samples go '
                    '(default runs/NAME).')
flags.DEFINE_enum('mode', 'train', ['train', 'generate', 'chat', 'tokenize', 'sweep',
                                    'sweep_report', 'analyze_embeddings', 'compile', 'export_hf'],
                  'train (or resume); generate from --prompt or chat (reads stdin lines) with the '
                  'latest checkpoint; tokenize: a tokenizer report on the val split; sweep: run '
                  'the experiment\'s sweep() points in WORKDIR/sweep/ and report; sweep_report: '
                  'the table and plots of the points so far; analyze_embeddings: see --words; '
                  'compile: compile the train step for --topology (a TPU slice) on this host and '
                  'report memory, FLOPs and collectives per chip (needs libtpu, not a TPU); '
                  'export_hf: write the run in --workdir (LoRA merged) as a Hugging Face model '
                  'directory --out. --workdir=hf:DIR reads a Hugging Face model directory.')
flags.DEFINE_string('out', None, 'export_hf: the directory to write (must not exist).')
flags.DEFINE_string('topology', 'v5e-16', 'compile: the TPU slice, e.g. v5e-16, v4-8, v5p-128, '
                    'v6e-64, or a chip grid (v5e:4x4).')
flags.DEFINE_integer('num_slices', 1, 'compile: slices joined over the data-centre network.')
flags.DEFINE_bool('count_flops', False, 'compile: count the FLOPs of every loop trip (a second '
                  'compile, layers unrolled), not only of each loop body as XLA does.')
flags.DEFINE_string('prompt', None, 'Prompt for --mode=generate.')
flags.DEFINE_integer('sweep_parallel', 1, 'Points of a sweep run at once (processes).')
flags.DEFINE_bool('sweep_dry_run', False, 'Print one launch.py command per sweep point, run none.')
flags.DEFINE_list('words', [], 'analyze_embeddings: tokens/words to show neighbours of and plot.')
flags.DEFINE_multi_string('analogy', [], 'analyze_embeddings: a,b,c for a - b + c (repeatable).')
flags.DEFINE_string('direction', '', 'analyze_embeddings: A1,A2/B1,B2 projects --words on '
                    'mean(A) - mean(B).')
flags.DEFINE_bool('multihost', False, 'Join JAX\'s multi-controller runtime (one process per '
                  'host): cluster settings are detected (TPU, SLURM, MPI) or given below.')
flags.DEFINE_string('coordinator_address', '', 'host:port of process 0 (with --multihost).')
flags.DEFINE_integer('num_processes', 0, 'Number of processes (with --coordinator_address).')
flags.DEFINE_integer('process_id', -1, 'This process\'s index (with --coordinator_address).')
config_flags.DEFINE_config_file('config', None, 'Set by --experiment; override keys with '
                                '--config.section.key=value.', lock_config=True)
FLAGS = flags.FLAGS


def fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def known_experiments() -> list[str]:
  return sorted(p.stem for p in EXPERIMENTS.glob('*.py') if not p.stem.startswith('_'))


def with_config_file(argv: list[str]) -> list[str]:
  """Turns --experiment=NAME into --config=experiments/NAME.py, placed before any override."""
  name = None
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith('--experiment='):
      name = arg.split('=', 1)[1]
    elif arg == '--experiment' and i + 1 < len(argv):
      name = argv[i + 1]
    elif arg == '--config' or arg.startswith('--config='):
      fail('--config takes no file: name an experiment with --experiment=NAME (a file '
           'experiments/NAME.py) and override its keys with --config.section.key=value.')
  if name is None:
    if any(a.startswith('--help') or a == '-h' for a in argv):
      return argv
    fail(f'give --experiment=NAME; known experiments: {", ".join(known_experiments())}')
  if name not in known_experiments():  # Names only: no paths, no experiments/__init__.py.
    fail(f'unknown experiment {name!r}; known experiments: {", ".join(known_experiments())}')
  return [argv[0], f'--config={EXPERIMENTS / name}.py'] + argv[1:]


def parse_flags(argv: list[str]) -> list[str]:
  try:
    return FLAGS(with_config_file(argv))
  except flags.Error as e:
    fail(f'{str(e).splitlines()[0]} (see python launch.py --helpfull)')
  except (AttributeError, KeyError) as e:  # ml_collections: a --config.* key the config lacks.
    hint = ' '.join(str(e).strip('"\'').replace('\\n', ' ').replace("\\'", '').split())
    fail(f'unknown config key {hint}; python launch.py --experiment=NAME --helpfull lists them')


def run_sweep(workdir: str) -> None:
  """--mode=sweep / sweep_report: the points of experiments/NAME.py:sweep()."""
  from research import sweep  # pylint: disable=g-import-not-at-top
  from research.errors import UserError  # pylint: disable=g-import-not-at-top
  module = importlib.import_module(f'experiments.{FLAGS.experiment}')
  if not hasattr(module, 'sweep'):
    raise UserError(f'experiments/{FLAGS.experiment}.py defines no sweep(); sweeps are in: '
                    + ', '.join(n for n in known_experiments()
                                if 'def sweep(' in (EXPERIMENTS / f'{n}.py').read_text()))
  points = module.sweep()
  overrides = [a for a in sys.argv[1:] if a.startswith('--config.')]  # Apply to every point.
  spaced = [a for a in overrides if '=' not in a]
  if spaced:  # Its value is the next argument, which would not reach the points' commands.
    raise UserError(f'write sweep overrides as {spaced[0]}=VALUE (with "="): each point\'s '
                    'command gets the --config.* arguments as they are given.')
  if FLAGS.sweep_dry_run:
    sweep.dry_run(FLAGS.experiment, points, workdir, overrides)
  elif FLAGS.mode == 'sweep_report':
    sweep.check_points(points)
    sweep.report(points, workdir)
    print(open(os.path.join(workdir, 'results.md')).read())
  else:
    sweep.run(FLAGS.experiment, points, workdir, FLAGS.sweep_parallel, overrides)
    print(open(os.path.join(workdir, 'results.md')).read())


def main(argv: list[str]) -> None:
  del argv
  if FLAGS.mode == 'compile':  # For a TPU, on this host's CPU: libtpu need not find a TPU.
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  # Imported here so that flag errors come back fast, before jax loads.
  from research import config as config_lib  # pylint: disable=g-import-not-at-top
  from research import generate  # pylint: disable=g-import-not-at-top
  from research import parallel  # pylint: disable=g-import-not-at-top
  from research import perf  # pylint: disable=g-import-not-at-top
  from research import runs  # pylint: disable=g-import-not-at-top
  from research.checkpoint import describe  # pylint: disable=g-import-not-at-top
  from research.errors import UserError  # pylint: disable=g-import-not-at-top
  from research.train import pretrain  # pylint: disable=g-import-not-at-top
  from research.train import loop  # pylint: disable=g-import-not-at-top
  from research.train import stages  # pylint: disable=g-import-not-at-top

  if not FLAGS['verbosity'].present:  # absl turns INFO on under app.run; Orbax's INFO lines
    logging.set_verbosity(logging.WARNING)  # would bury the progress lines (-v 0 brings them back).
  config = FLAGS.config
  workdir = FLAGS.workdir or os.path.join('runs', FLAGS.experiment)
  cluster = [f'--{n}' for n in ('coordinator_address', 'num_processes', 'process_id')
             if FLAGS[n].present]
  if cluster and not FLAGS.multihost:
    fail(f'{", ".join(cluster)} only apply with --multihost; add --multihost or drop them.')
  if FLAGS.multihost:
    try:
      parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                      FLAGS.process_id)
    except Exception as e:  # pylint: disable=broad-except (JAX raises several kinds)
      fail(f'--multihost could not join a cluster ({describe(e)}); run it on every host of a '
           'TPU slice or SLURM/MPI job, or give --coordinator_address, --num_processes and '
           '--process_id.')
  perf.tune_cpu_runtime()

  def train():
    parallel.check_fits(config)  # Before anything is written.
    runs.check_writable(workdir)
    config_lib.check_workdir(config, workdir)
    with runs.lock(workdir), runs.config_kept_on_failure(workdir):
      stages.train(config, workdir)

  def sweep():
    with runs.lock(workdir):
      run_sweep(workdir)

  def analyze_embeddings():
    from research.analysis import embeddings  # pylint: disable=g-import-not-at-top
    print(embeddings.analyze_workdir(workdir, FLAGS.words, FLAGS.analogy, FLAGS.direction))

  def export_hf():
    from research import hf  # pylint: disable=g-import-not-at-top
    if not FLAGS.out:
      raise UserError('--mode=export_hf needs --out=DIR, a new directory to write the model to.')
    _, tok, model, params = runs.load_trained(workdir)
    model_type = hf.save(FLAGS.out, model.cfg, params, tok)
    print(f'wrote {FLAGS.out} ({model_type}); load it with transformers: '
          f'AutoModelForCausalLM.from_pretrained({FLAGS.out!r})')

  def compile_step():
    from research import compile as compile_lib  # pylint: disable=g-import-not-at-top
    compile_lib.compile_main(config, FLAGS.topology, FLAGS.num_slices, FLAGS.count_flops)

  modes = {
      'train': train,
      'generate': lambda: generate.generate_main(workdir, FLAGS.prompt, config.sampling,
                                                 seed=config.seed),
      'chat': lambda: generate.chat_main(workdir, config.sampling, sys.stdin, sys.stdout,
                                         seed=config.seed),
      'tokenize': lambda: print(pretrain.tokenizer_report(config, workdir)),
      'sweep': sweep,
      'sweep_report': lambda: run_sweep(workdir),
      'analyze_embeddings': analyze_embeddings,
      'compile': compile_step,
      'export_hf': export_hf,
  }
  try:
    config = config_lib.with_imported_model(config)
    config_lib.validate(config)
    modes[FLAGS.mode]()
  except UserError as e:
    fail(str(e))
  except loop.Interrupted as e:  # A checkpoint is saved: 128 + the signal, as a shell reports.
    print(str(e), file=sys.stderr, flush=True)
    sys.exit(128 + e.signum)


def interrupted_at_startup(signum, frame) -> None:
  """Ctrl-C outside a training loop (which installs its own handler, and saves first): stop at
  once, in one line, with exit status 130 as a shell reports it; a run resumes from its last
  checkpoint."""
  del signum, frame
  print('\ninterrupted', file=sys.stderr, flush=True)
  os._exit(130)  # Not sys.exit: JAX's threads may be starting, and tearing them down can crash.


if __name__ == '__main__':
  signal.signal(signal.SIGINT, interrupted_at_startup)
  app.run(main, flags_parser=parse_flags)
