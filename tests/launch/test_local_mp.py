"""launch/local_mp.sh: N CPU processes of one run on this machine.

The fast tests run it with a fake training `python` ($PYTHON) that prints steps and exits with a
chosen code (75 after SIGTERM); the slow one trains the tiny config in two real processes.
"""

import json
import os
import shlex
import signal
import subprocess
import sys

import pytest

from tests.launch.conftest import LAUNCH, PREEMPTED_EXIT_CODE, ROOT, clean_env, run_script, wait_for

LOCAL_MP = os.path.join(LAUNCH, 'local_mp.sh')


def test_dry_run_prints_one_cpu_process_per_index_on_one_free_port():
  proc = run_script(
    LOCAL_MP,
    '--num_processes=3',
    '--dry_run',
    'configs/tiny.py',
    '/tmp/mp run',
    '--config.seed=1',
    env=clean_env(PYTHON=sys.executable),
  )
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines[0] == r'mkdir -p /tmp/mp\ run/logs'
  starts = [shlex.split(line) for line in lines[1:4]]
  ports = set()
  for i, argv in enumerate(starts):
    assert argv[:4] == ['env', 'JAX_PLATFORMS=cpu', 'TF_CPP_MIN_LOG_LEVEL=2', sys.executable]
    assert argv[4:10] == [
      '-m',
      'stop_jax.main',
      '--config=configs/tiny.py',
      '--workdir=/tmp/mp run',
      '--config.seed=1',
      argv[9],
    ]
    host, port = argv[9].removeprefix('--coordinator_address=').split(':')
    assert host == 'localhost' and 1024 <= int(port) < 65536
    ports.add(port)
    log = f'>/tmp/mp run/logs/process-{i}.log'
    assert argv[10:] == ['--num_processes=3', f'--process_id={i}', log, '2>&1', '&']
  assert len(ports) == 1
  assert lines[4].startswith('wait')


def _local_mp(fakes, tmp_path, *args, **env):
  return run_script(
    LOCAL_MP,
    *args,
    'configs/tiny.py',
    str(tmp_path / 'run'),
    env=fakes.env(PYTHON=os.path.join(fakes.bin, 'python'), **env),
  )


def _log(tmp_path, i) -> str:
  with open(tmp_path / 'run' / 'logs' / f'process-{i}.log') as f:
    return f.read()


def test_runs_every_process_with_the_flags_of_main_py_and_one_log_each(fakes, tmp_path):
  proc = _local_mp(fakes, tmp_path, FAKE_MAIN_STEPS='3')
  assert proc.returncode == 0, proc.stderr
  mains = sorted(fakes.calls('main'), key=lambda c: c['argv'][-1])
  assert [c['argv'][-1] for c in mains] == ['--process_id=0', '--process_id=1']
  assert len({c['argv'][-3] for c in mains}) == 1  # one coordinator address for both
  for i, main in enumerate(mains):
    assert main['env']['JAX_PLATFORMS'] == 'cpu'
    assert main['argv'][-2] == '--num_processes=2'
    assert _log(tmp_path, i).endswith('step 3\n')


@pytest.mark.parametrize(
  'codes, expected',
  [
    ('0,0', 0),
    ('0,3', 3),
    (f'{PREEMPTED_EXIT_CODE},{PREEMPTED_EXIT_CODE}', PREEMPTED_EXIT_CODE),
    (f'{PREEMPTED_EXIT_CODE},4', 4),  # a failure is worse than a preemption
    (f'0,{PREEMPTED_EXIT_CODE}', PREEMPTED_EXIT_CODE),
  ],
)
def test_the_exit_code_is_the_worst_of_the_processes(fakes, tmp_path, codes, expected):
  proc = _local_mp(fakes, tmp_path, FAKE_MAIN_STEPS='2', FAKE_MAIN_EXIT=codes)
  assert proc.returncode == expected, proc.stderr


def test_a_failed_process_stops_the_others(fakes, tmp_path):
  # Process 1 fails at step 2; process 0 would run forever, waiting for it at a collective.
  proc = _local_mp(fakes, tmp_path, FAKE_MAIN_STEPS='100000,2', FAKE_MAIN_EXIT='0,3')
  assert proc.returncode == 3, proc.stderr
  assert 'process 1 failed' in proc.stderr
  assert 'preempted: saved step' in _log(tmp_path, 0)  # it got SIGTERM


def test_sigterm_is_passed_on_to_every_process(fakes, tmp_path):
  script = subprocess.Popen(
    ['bash', LOCAL_MP, '--num_processes=3', 'configs/tiny.py', str(tmp_path / 'run')],
    cwd=ROOT,
    env=fakes.env(PYTHON=os.path.join(fakes.bin, 'python')),
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    for i in range(3):
      wait_for(
        lambda i=i: (
          os.path.exists(tmp_path / 'run' / 'logs' / f'process-{i}.log')
          and 'step 2' in _log(tmp_path, i)
        ),
        what=f'process {i} to run',
      )
    script.send_signal(signal.SIGTERM)
    _, err = script.communicate(timeout=30)
  finally:
    script.kill()
  assert script.returncode == PREEMPTED_EXIT_CODE, err
  for i in range(3):
    assert 'preempted: saved step' in _log(tmp_path, i)


@pytest.mark.slow
def test_two_cpu_processes_train_the_tiny_config(tmp_path):
  workdir = tmp_path / 'run'
  env = clean_env(PYTHON=sys.executable)
  env.pop('XLA_FLAGS', None)  # one CPU device per process
  proc = subprocess.run(
    ['bash', LOCAL_MP, 'configs/tiny.py:steps=2', str(workdir)]
    + ['--config.model.depth=1', '--config.predictor.depth=1']
    + ['--config.eval.probe=False', '--config.log_every_steps=1'],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  logs = [(workdir / 'logs' / f'process-{i}.log').read_text() for i in range(2)]
  assert proc.returncode == 0, proc.stderr + logs[0][-3000:] + logs[1][-3000:]
  assert 'process 0 of 2: 1 local devices (cpu), 2 global devices' in logs[0]
  assert 'process 1 of 2: 1 local devices (cpu), 2 global devices' in logs[1]
  with open(workdir / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f]
    # Written once, by process 0 (the other rows are the periodic health evaluator's).
    assert [r['step'] for r in rows if 'loss' in r] == [1, 2]
