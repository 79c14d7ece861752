"""python -m stop_jax.sweep: variants x seeds, skip / resume, launchers, aggregation."""

import json
import os
import shlex
import subprocess
import sys

import pytest

from stop_jax import sweep
from stop_jax.tools import sweep_results
from tests.launch.conftest import clean_env, run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABLATION = os.path.join(ROOT, 'configs', 'ablation.py')


def _sweep(*args, timeout=600):
  return subprocess.run(
    [sys.executable, '-m', 'stop_jax.sweep', *args],
    cwd=ROOT, capture_output=True, text=True, timeout=timeout,
  )  # fmt: skip


def test_runs_are_variants_times_seeds_with_user_overrides_last(tmp_path):
  runs = sweep.plan_runs(
    'configs/tiny.py', ['table7', 'stop@0.5'], ['0', '1'], str(tmp_path), ['--config.stop.mode=off']
  )
  assert [(r['variant'], r['seed']) for r in runs] == [
    ('stop', 0), ('stop', 1), ('context', 0), ('context', 1), ('both', 0), ('both', 1),
    ('stop@0.5', 0), ('stop@0.5', 1),
  ]  # fmt: skip
  ctx = runs[2]
  assert ctx['workdir'] == os.path.join(str(tmp_path), 'context', 'seed0')
  assert ctx['argv'] == [
    '--config=configs/tiny.py', f'--workdir={ctx["workdir"]}', '--config.stop.mode=context',
    '--config.seed=0', '--config.stop.mode=off',
  ]  # fmt: skip
  assert '--config.stop.sigma=0.5' in runs[-1]['argv']


def test_bad_variants_and_seeds_fail_with_what_is_allowed(tmp_path):
  from stop_jax import config as config_lib

  with pytest.raises(config_lib.ConfigError, match="variant='stpo' is not allowed"):
    sweep.plan_runs('configs/tiny.py', ['stpo'], ['0'], str(tmp_path), [])
  with pytest.raises(config_lib.ConfigError, match='\'x\' after "@" is not a number'):
    sweep.plan_runs('configs/tiny.py', ['stop@x'], ['0'], str(tmp_path), [])
  with pytest.raises(config_lib.ConfigError, match='--seeds=a is not allowed'):
    sweep.plan_runs('configs/tiny.py', ['stop'], ['a'], str(tmp_path), [])


def _finished(run_dir, accuracy, evals=None):
  os.makedirs(os.path.join(run_dir, 'eval'), exist_ok=True)
  summary = {
    'steps': 3,
    'final_metrics': {'loss': 0.1},
    'probe': {'pretrained': {'accuracy': accuracy}},
  }
  with open(os.path.join(run_dir, 'summary.json'), 'w') as f:
    json.dump(summary, f)
  for name, value in (evals or {}).items():
    with open(os.path.join(run_dir, 'eval', f'{name}.json'), 'w') as f:
      json.dump(value, f)


def test_aggregate_gives_mean_and_std_over_seeds_per_variant_and_metric(tmp_path):
  runs = sweep.plan_runs('configs/tiny.py', ['stop', 'sincos'], ['0', '1', '2'], str(tmp_path), [])
  accuracies = {'stop': [0.9, 0.8, 0.7], 'sincos': [0.5, 0.6]}  # sincos seed 2 unfinished
  for r in runs:
    values = accuracies[r['variant']]
    if r['seed'] < len(values):
      logreg = {'last': {'accuracy': values[r['seed']] - 0.1}, 'note': 'text is skipped'}
      _finished(r['workdir'], values[r['seed']], {'logreg_digits': logreg})
  result = sweep_results.aggregate(runs, str(tmp_path))
  stop = result['summary']['stop']['probe/pretrained/accuracy']
  assert stop['mean'] == pytest.approx(0.8) and stop['std'] == pytest.approx(0.1) and stop['n'] == 3
  sincos = result['summary']['sincos']['logreg_digits/last/accuracy']
  assert sincos['mean'] == pytest.approx(0.45) and sincos['n'] == 2
  assert result['missing'] == ['sincos/seed2']
  md = open(tmp_path / 'results.md').read()
  assert '| stop | 70.00 +- 10.00 (3) | 80.00 +- 10.00 (3) |' in md
  assert 'Not finished (no results yet): sincos/seed2' in md
  assert json.load(open(tmp_path / 'results.json'))['summary']['stop']
  assert open(tmp_path / 'results.png', 'rb').read(8) == b'\x89PNG\r\n\x1a\n'


def test_dry_runs_skip_finished_runs_and_print_each_launcher(tmp_path):
  _finished(os.path.join(tmp_path, 'stop', 'seed0'), 0.9)
  common = [
    '--config=configs/tiny.py',
    '--variants=stop,sincos',
    '--seeds=0,1',
    f'--workdir={tmp_path}',
  ]
  local = _sweep(*common, '--dry_run', '--config.total_steps=5')
  assert local.returncode == 0, local.stderr
  lines = local.stdout.strip().splitlines()
  assert len(lines) == 3  # stop/seed0 is finished
  assert lines[0].endswith(
    f'--workdir={tmp_path}/stop/seed1 --config.seed=1 --config.total_steps=5'
  )
  slurm = _sweep(*common, '--dry_run', '--launcher=slurm', '--launcher_args=--nodes=1')
  assert slurm.returncode == 0, slurm.stderr
  assert (
    f'sbatch --array=0-2 --nodes=1 {ROOT}/launch/slurm.sbatch --commands_file={tmp_path}/sweep_commands.txt'
    in slurm.stdout
  )
  tpu = _sweep(*common, '--dry_run', '--launcher=tpu', '--launcher_args=--name=pod --zone=z')
  assert tpu.stdout.count('launch/tpu_pod.sh start --name=pod --zone=z configs/tiny.py') == 3


def test_evaluations_run_after_each_run_that_lacks_their_result(tmp_path):
  _finished(os.path.join(tmp_path, 'stop', 'seed0'), 0.9, {'shapes_count': {'results': {}}})
  args = [
    '--config=configs/tiny.py', '--variants=stop', '--seeds=0,1', f'--workdir={tmp_path}',
    '--evaluate=configs/eval/shapes_count.py,configs/eval/shapes_count.py:task=dist',
    '--eval_args=--config.eval.max_train_examples=50', '--dry_run',
  ]  # fmt: skip
  proc = _sweep(*args)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  # seed0: trained and counted already, only dist is missing; seed1: everything.
  evaluate = f'{sys.executable} -m stop_jax.evaluate --config=configs/eval/shapes_count.py'
  assert lines == [
    f'{evaluate}:task=dist --config.eval.max_train_examples=50 --workdir={tmp_path}/stop/seed0',
    f'{sys.executable} -m stop_jax.main --config=configs/tiny.py --workdir={tmp_path}/stop/seed1 --config.seed=1',
    f'{evaluate} --config.eval.max_train_examples=50 --workdir={tmp_path}/stop/seed1',
    f'{evaluate}:task=dist --config.eval.max_train_examples=50 --workdir={tmp_path}/stop/seed1',
  ]  # fmt: skip
  bad = _sweep(*args[:4], '--evaluate=configs/eval/shapes_count.py:task=colour', '--dry_run')
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1] == (
    "error: shapes task='colour' is not allowed: one of ('count', 'dist', 'shape')."
  )


def test_results_md_shows_the_scores_of_evaluation_records_not_their_metadata(tmp_path):
  runs = sweep.plan_runs('configs/tiny.py', ['stop'], ['0'], str(tmp_path), [])
  record = {
    'name': 'shapes_dist',
    'model': {'width': 64},
    'results': {'last': {'accuracy': 0.25, 'top1': 0.25, 'l2': 1e-4, 'num_train': 2000}},
  }
  _finished(runs[0]['workdir'], 0.5, {'shapes_dist': record})
  result = sweep_results.aggregate(runs, str(tmp_path))
  assert result['summary']['stop']['shapes_dist/last/num_train']['mean'] == 2000
  assert 'shapes_dist/model/width' not in result['summary']['stop']
  md = open(tmp_path / 'results.md').read().splitlines()
  assert md[0] == '| variant | probe/pretrained/accuracy | shapes_dist/last/accuracy |'
  assert md[2] == '| stop | 50.00 +- 0.00 (1) | 25.00 +- 0.00 (1) |'


def test_a_slurm_array_task_runs_its_line_of_the_commands_file(tmp_path):
  commands = tmp_path / 'sweep_commands.txt'
  lines = [['configs/tiny.py', '/shared/s/stop/seed0', '--config.seed=0'],
           ['configs/tiny.py', '/shared/s/sincos/seed0', '--config.stop.mode=off', '--config.seed=0']]  # fmt: skip
  commands.write_text(''.join(shlex.join(line) + '\n' for line in lines))
  env = clean_env(SLURM_JOB_ID='77', SLURM_ARRAY_TASK_ID='1', SLURM_NTASKS='1',
                  SLURM_JOB_NUM_NODES='1', SLURM_JOB_NODELIST='n1')  # fmt: skip
  slurm = os.path.join(ROOT, 'launch', 'slurm.sbatch')
  proc = run_script(slurm, '--dry_run', f'--commands_file={commands}', env=env)
  assert proc.returncode == 0, proc.stderr
  assert '--workdir=/shared/s/sincos/seed0 --config.stop.mode=off --config.seed=0' in proc.stdout
  env['SLURM_ARRAY_TASK_ID'] = '2'
  proc = run_script(slurm, '--dry_run', f'--commands_file={commands}', env=env)
  assert proc.returncode == 2 and 'no line 3' in proc.stderr


@pytest.mark.slow
def test_a_local_sweep_runs_skips_finished_runs_and_aggregates(tmp_path):
  args = [
    '--config=configs/tiny.py:steps=3', '--variants=stop,sincos', '--seeds=0', f'--workdir={tmp_path}',
    '--config.eval.probe_random_init=False', '--config.eval.probe_max_examples=300',
    '--config.log_every_steps=1',
  ]  # fmt: skip
  first = _sweep(*args)
  assert first.returncode == 0, first.stderr[-3000:]
  result = json.load(open(tmp_path / 'results.json'))
  assert set(result['summary']) == {'stop', 'sincos'} and not result['missing']
  for variant in ('stop', 'sincos'):
    config = json.load(open(tmp_path / variant / 'seed0' / 'config.json'))
    assert config['stop']['mode'] == ('masked' if variant == 'stop' else 'off')
  again = _sweep(*args)
  assert again.returncode == 0 and 'finished, skipped' in again.stderr
  assert again.stderr.count('finished, skipped') == 2


def test_a_sigterm_to_the_sweep_reaches_the_running_child(tmp_path):
  import signal
  import threading
  import time

  marker = tmp_path / 'child_got_sigterm'
  child = (
    'import signal, sys, time\n'
    f'signal.signal(signal.SIGTERM, lambda *a: (open({str(marker)!r}, "w").close(), sys.exit(75)))\n'
    'time.sleep(60)\n'
  )
  started = tmp_path / 'started'
  cmd = [sys.executable, '-c', f'open({str(started)!r}, "w").close()\n' + child]

  def stop_the_sweep():
    while not started.exists():
      time.sleep(0.05)
    time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGTERM)

  threading.Thread(target=stop_the_sweep, daemon=True).start()
  t0 = time.monotonic()
  assert sweep._call(cmd, 'a run') == 75
  assert marker.exists() and time.monotonic() - t0 < 30
  assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is back
