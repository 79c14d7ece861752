r"""The paper's ablations as one command: variants x seeds, run, resumed, aggregated.

  python -m stop_jax.sweep --config=configs/ablation.py --variants=stop,sincos,learned_pos \
    --seeds=0,1,2 --workdir=DIR [--config.key=value ...] [--launcher=local|slurm|tpu] [--dry_run]

Every run is `python -m stop_jax.main --config=CONFIG --workdir=DIR/<variant>/seed<k>` with the
variant's overrides (the table `VARIANTS` of configs/ablation.py; `NAME@SIGMA` changes the noise
std; group names such as `table6`, `table7`, `fig3`, `fig4` expand to their variants), then
`--config.seed=k`, then your own `--config.*` overrides, which therefore win. Any config file
works (`--config=configs/tiny.py` runs the variants at tiny scale).

- local (default): the runs go one after another in this machine's processes. A finished run
  (its summary.json has final metrics) is skipped; an interrupted one resumes from its last
  checkpoint (every run is resumable). A run preempted by SIGTERM stops the sweep with exit 75,
  like `stop_jax.main`; rerunning the same command continues.
- slurm / tpu: writes DIR/sweep_commands.txt (one run per line) and submits them through
  `launch/`: a SLURM job array over `launch/slurm.sbatch`, or one `launch/tpu_pod.sh start` per
  run; `--dry_run` prints the commands instead (--launcher_args are passed to the launcher).

`--evaluate=configs/eval/shapes_count.py,configs/eval/shapes_dist.py` (local launcher) runs
those evaluations (`python -m stop_jax.evaluate`, plus `--eval_args`) on every finished run that
lacks their result; after remote runs, a local sweep with the same arguments only evaluates.

After the runs (and on `--aggregate_only`), every finished run's probe results are gathered into
DIR/results.json and DIR/results.md (mean +- std over seeds per variant and headline metric) and
a bar plot DIR/results.png: the training probe (`summary.json`: `probe.pretrained.accuracy`) and
every evaluation in `<run>/eval/*.json` (per feature type).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys

from absl import app, flags, logging

from stop_jax import config as config_lib
from stop_jax.eval import load
from stop_jax.runtime import cli, distributed, fileio
from stop_jax.tools import sweep_results

_CONFIG = flags.DEFINE_string('config', None, 'Config file (configs/*.py[:arg]); e.g. ablation.py.')
_VARIANTS = flags.DEFINE_list('variants', ['stop', 'sincos'], 'Variants or groups (ablation.py).')
_SEEDS = flags.DEFINE_list('seeds', ['0'], 'Seeds (config.seed) for every variant.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Sweep directory: one run directory per run.')
_LAUNCHER = flags.DEFINE_enum('launcher', 'local', ['local', 'slurm', 'tpu'], 'Where runs go.')
_LAUNCHER_ARGS = flags.DEFINE_string(
  'launcher_args', '', 'Extra arguments for launch/slurm.sbatch (sbatch) or launch/tpu_pod.sh.'
)
_EVALUATE = flags.DEFINE_list(
  'evaluate',
  [],
  'Eval configs (configs/eval/*.py[:arg]) run on every finished run with stop_jax.evaluate.',
)
_EVAL_ARGS = flags.DEFINE_string(
  'eval_args', '', 'Extra flags for every evaluation, e.g. "--config.eval.max_train_examples=2000".'
)
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Print the runs / submissions, run nothing.')
_AGGREGATE_ONLY = flags.DEFINE_bool('aggregate_only', False, 'Only gather the results.')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ablation_table():
  """The variants table: configs/ablation.py, loaded as the config loader loads config files."""
  import importlib.util  # noqa: PLC0415

  path = config_lib.find_config_file('ablation.py')
  spec = importlib.util.spec_from_file_location('_stop_jax_ablation', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def plan_runs(config_arg: str, variants, seeds, workdir: str, overrides) -> list[dict]:
  """[{'variant', 'seed', 'workdir', 'argv'}] for every (variant, seed), in that order."""
  table = _ablation_table()
  names = table.expand(variants)
  try:
    seed_values = [int(s) for s in seeds]
  except ValueError:
    raise config_lib.ConfigError(f'--seeds={",".join(seeds)} is not allowed: integers.') from None
  runs = []
  for name in names:
    flags_for_variant = [
      f'--config.{key}={value}' for key, value in table.variant_overrides(name).items()
    ]
    for seed in seed_values:
      run_dir = os.path.join(workdir, name, f'seed{seed}')
      argv = [
        f'--config={config_arg}',
        f'--workdir={run_dir}',
        *flags_for_variant,
        f'--config.seed={seed}',
        *overrides,
      ]
      runs.append({'variant': name, 'seed': seed, 'workdir': run_dir, 'argv': argv})
  return runs


def is_finished(run_dir: str) -> bool:
  """A run whose summary.json holds final metrics (a preempted run's does not)."""
  path = os.path.join(run_dir, 'summary.json')
  if not fileio.exists(path):
    return False
  try:
    return bool(fileio.read_json(path).get('final_metrics'))
  except (ValueError, OSError):
    return False


def evaluations(specs, eval_args: str) -> list[tuple[str, list[str]]]:
  """[(result name, the `stop_jax.evaluate` flags before --workdir)] of each eval config.

  The name (eval.name, as `stop_jax.evaluate` names WORKDIR/eval/<name>.json) says whether a
  run already has the result; a bad config file or argument fails here, before any run.
  """
  out = []
  extra = shlex.split(eval_args)
  for spec in specs:
    name, _, arg = spec.partition(':')
    config = config_lib.load_config_file(name, arg or None)
    for flag in extra:  # an override of eval.name renames the result
      if flag.startswith('--config.eval.name='):
        config.eval.name = flag.partition('=')[2]
    out.append((load.result_name(config), [f'--config={spec}', *extra]))
  return out


def _call(cmd, what: str) -> int:
  """Runs one child; 0 or the preemption code, else the sweep stops with what failed.

  A SIGTERM to the sweep goes to the child too (a run saves its state and exits 75), so
  stopping the sweep never leaves a run going on alone; the sweep then exits 75.
  """
  child = subprocess.Popen(cmd)
  stopped = []

  def forward(signum, _frame):
    stopped.append(signum)
    child.send_signal(signum)

  previous = signal.signal(signal.SIGTERM, forward)
  try:
    code = child.wait()
  finally:
    signal.signal(signal.SIGTERM, previous)
  if stopped or code == distributed.PREEMPTED_EXIT_CODE:
    logging.warning('preempted during %s: rerun the same sweep command to continue', what)
    return distributed.PREEMPTED_EXIT_CODE
  if code != 0:
    raise SystemExit(f'error: {what} failed with exit code {code}')
  return 0


def run_local(runs, dry_run: bool, evals=()) -> int:
  """Runs each unfinished run with `python -m stop_jax.main`, then each missing evaluation
  (`evaluations`) with `python -m stop_jax.evaluate`; stops at a preemption (75)."""
  for i, r in enumerate(runs):
    where = f'[{i + 1}/{len(runs)}] {r["variant"]} seed {r["seed"]}'
    cmd = [sys.executable, '-m', 'stop_jax.main', *r['argv']]
    todo = [cmd] if not is_finished(r['workdir']) else []
    if not todo:
      logging.info('%s: finished, skipped', where)
    for name, flags_before in evals:
      if not fileio.exists(os.path.join(r['workdir'], 'eval', f'{name}.json')):
        evaluate = [sys.executable, '-m', 'stop_jax.evaluate', *flags_before]
        todo.append([*evaluate, f'--workdir={r["workdir"]}'])
    for c in todo:
      if dry_run:
        print(shlex.join(c))
        continue
      logging.info('%s: %s', where, shlex.join(c[2:4]))
      if _call(c, f'{shlex.join(c[2:3])} of {r["workdir"]}'):
        return distributed.PREEMPTED_EXIT_CODE
  return 0


def submit(runs, launcher: str, workdir: str, launcher_args: str, dry_run: bool) -> int:
  """A SLURM job array over launch/slurm.sbatch, or one detached start per run (tpu).

  The SLURM tasks read their line of the commands file with `sed`, so it is written beside the
  sweep on a local / shared path, or under ./logs for a gs:// sweep directory.
  """
  todo = [r for r in runs if not is_finished(r['workdir'])]
  lines = ''.join(shlex.join(_positional(r['argv'])) + '\n' for r in todo)
  where = os.path.abspath('logs') if fileio.is_remote(workdir) else workdir
  commands = os.path.join(where, 'sweep_commands.txt')
  extra = shlex.split(launcher_args)
  if launcher == 'slurm':
    script = os.path.join(REPO, 'launch', 'slurm.sbatch')
    array = f'--array=0-{len(todo) - 1}'
    submits = [['sbatch', array, *extra, script, f'--commands_file={commands}']] if todo else []
  else:
    script = os.path.join(REPO, 'launch', 'tpu_pod.sh')
    submits = [[script, 'start', *extra, *_positional(r['argv'])] for r in todo]
  if dry_run:
    print(f'# {commands}:\n{lines}', end='')
    for cmd in submits:
      print(shlex.join(cmd))
    return 0
  fileio.write_text(commands, lines)
  for cmd in submits:
    code = subprocess.call(cmd)
    if code != 0:
      raise SystemExit(f'error: {shlex.join(cmd)} failed with exit code {code}')
  return 0


def _positional(argv):
  """main.py flags -> the launchers' form: CONFIG WORKDIR [--config.* ...]."""
  config = argv[0].removeprefix('--config=')
  workdir = argv[1].removeprefix('--workdir=')
  return [config, workdir, *argv[2:]]


def main(argv):
  overrides = [a for a in argv[1:] if a.startswith('--config.')]
  unknown = [a for a in argv[1:] if not a.startswith('--config.')]
  if unknown:
    raise app.UsageError(f'unexpected arguments {unknown}: only --config.KEY=VALUE overrides.')
  if not _CONFIG.value or not _WORKDIR.value:
    raise app.UsageError('--config and --workdir are required.')
  workdir = fileio.resolve(_WORKDIR.value)
  try:
    runs = plan_runs(_CONFIG.value, _VARIANTS.value, _SEEDS.value, workdir, overrides)
    evals = evaluations(_EVALUATE.value, _EVAL_ARGS.value)
  except (config_lib.ConfigError, FileNotFoundError) as e:
    cli.fail(e, verbose=cli.verbose_requested(sys.argv))  # one line, exit 2
  code = 0
  if not _AGGREGATE_ONLY.value:
    if _LAUNCHER.value == 'local':
      code = run_local(runs, _DRY_RUN.value, evals)
    else:
      code = submit(runs, _LAUNCHER.value, workdir, _LAUNCHER_ARGS.value, _DRY_RUN.value)
  if not _DRY_RUN.value:
    results = sweep_results.aggregate(runs, workdir)
    print(
      sweep_results.markdown(
        results['summary'], list(dict.fromkeys(r['variant'] for r in runs)), results['missing']
      ),
      end='',
    )
    print(f'results: {os.path.join(workdir, "results.md")} (and results.json, results.png)')
  return code


def _parse_flags(argv):
  """absl parses the sweep's own flags; `--config.*` overrides pass through to every run."""
  overrides = [a for a in argv[1:] if a.startswith('--config.')]
  rest = flags.FLAGS([a for a in argv if not a.startswith('--config.')])
  return rest + overrides


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
