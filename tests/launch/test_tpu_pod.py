"""launch/tpu_pod.sh (workstation) and launch/tpu_worker.sh (each TPU worker).

The end-to-end tests run the real scripts against fake `gcloud` workers (see conftest.py): the
ssh command really runs, in a home folder per worker, so provisioning, the detached start, the
per-worker logs, status, logs and stop are the scripts' own doing.
"""

import os
import shlex
import subprocess

import pytest

from tests.launch.conftest import (
  LAUNCH,
  PREEMPTED_EXIT_CODE,
  ROOT,
  alive,
  committed_copy,
  run_script,
  wait_for,
)

TPU_POD = os.path.join(LAUNCH, 'tpu_pod.sh')
TPU_WORKER = os.path.join(LAUNCH, 'tpu_worker.sh')
TPU_ARGS = ('--name=my-pod', '--zone=us-central2-b', '--project=proj-1')
OVERRIDES = ('--config.seed=3', "--config.data.data_dir=/data/it's here")
MAIN_ARGV = [
  '-m',
  'stop_jax.main',
  '--config=configs/vitb16.py',
  '--workdir=gs://bkt/runs/b16',
  *OVERRIDES,
]


def _commands(stdout) -> list[list[str]]:
  return [shlex.split(line) for line in stdout.splitlines() if not line.startswith('#')]


def _remote_command(ssh_argv: list[str]) -> str:
  (command,) = [a for a in ssh_argv if a.startswith('--command=')]
  return command.removeprefix('--command=')


def test_dry_run_ships_the_code_and_starts_the_worker_script_on_every_worker():
  proc = run_script(
    TPU_POD, *TPU_ARGS, '--env', 'FOO=1 2', '--dry_run', 'configs/vitb16.py', 'gs://bkt/runs/b16',
    *OVERRIDES,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr
  archive, scp, ssh = _commands(proc.stdout)
  assert archive[:3] == ['git', '-C', ROOT] and archive[-1] == 'HEAD'
  assert scp[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp']
  assert {'--worker=all', '--zone=us-central2-b', '--project=proj-1'} <= set(scp)
  assert ssh[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'my-pod']
  assert {'--worker=all', '--zone=us-central2-b', '--project=proj-1'} <= set(ssh)
  remote = shlex.split(_remote_command(ssh))
  start = remote.index('bash')
  assert remote[start:] == [
    'bash',
    'stop_jax/launch/tpu_worker.sh',
    'start',
    '--env=FOO=1 2',
    '--',
    'configs/vitb16.py',
    'gs://bkt/runs/b16',
    *OVERRIDES,
  ]
  # The comments spell out what the worker script does there, provisioning included.
  plan = proc.stdout
  assert 'python3 -m pip install --user --quiet uv' in plan
  assert 'uv venv --python 3.11 .venv' in plan
  assert '-r launch/requirements-tpu.lock -e .' in plan
  assert 'sudo lsof -t -w /dev/accel* /dev/vfio/*' in plan
  worker_line = next(line for line in plan.splitlines() if line.startswith('#   setsid nohup'))
  assert shlex.split(worker_line.removeprefix('#   '))[:6] == [
    'setsid',
    'nohup',
    'env',
    'TF_CPP_MIN_LOG_LEVEL=2',
    'FOO=1 2',
    '.venv/bin/python',
  ]
  assert '~/stop_jax_logs/b16/worker-I.log' in plan and 'gs://bkt/runs/b16/logs/' in plan


def test_dry_run_of_status_logs_and_stop_runs_the_worker_script():
  def ssh(*args):
    proc = run_script(TPU_POD, *args, '--zone=z', '--dry_run')
    assert proc.returncode == 0, proc.stderr
    (argv,) = _commands(proc.stdout)
    return argv, shlex.split(_remote_command(argv))

  argv, remote = ssh('status', '--name=n', '--run=r1', '--lines=5')
  assert '--worker=all' in argv
  assert remote == ['bash', 'stop_jax/launch/tpu_worker.sh', 'status', '--run=r1', '--lines=5']
  argv, remote = ssh('logs', '--queued_resource=qr', '--node=1', '--worker=3', '--follow')
  assert argv[:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'ssh', 'qr']
  assert {'--node=1', '--worker=3'} <= set(argv)
  assert remote == ['bash', 'stop_jax/launch/tpu_worker.sh', 'logs', '--follow']
  argv, remote = ssh('stop', '--name=n', '--grace_s=600')
  assert remote == ['bash', 'stop_jax/launch/tpu_worker.sh', 'stop', '--grace_s=600']


def _pod(fakes, tmp_path, workers=2, slices=1):
  """A committed copy of the launch scripts and the environment of a fake pod."""
  repo = committed_copy(tmp_path / 'repo')
  device = tmp_path / 'accel0'
  device.write_text('')
  env = fakes.env(
    FAKE_TPU_WORKERS=str(workers),
    FAKE_TPU_SLICES=str(slices),
    TMPDIR=str(tmp_path),
    STOP_JAX_TPU_DEVICES=str(device),
  )

  def pod(*args):
    proc = run_script(os.path.join(repo, 'launch', 'tpu_pod.sh'), *args, env=env, cwd=tmp_path)
    return proc

  return pod, env


def _supervisor_pids(fakes, homes, run, names):
  return [
    int(open(os.path.join(h, 'stop_jax_logs', run, f'{n}.pid')).read())
    for h, n in zip(homes, names, strict=True)
  ]


def _log(home, run, name) -> str:
  with open(os.path.join(home, 'stop_jax_logs', run, f'{name}.log')) as f:
    return f.read()


@pytest.mark.slow
def test_start_provisions_runs_detached_with_logs_then_status_logs_stop_and_rerun(fakes, tmp_path):
  pod, _ = _pod(fakes, tmp_path)
  target = ('--name=pod', '--zone=z')
  workdir = 'gs://bkt/runs/r1'
  args = (
    'start', *target, '--env', 'FOO=bar baz', '--env=XLA_FLAGS=--x=1', '--grace_s=20',
    'configs/tiny.py', workdir, '--config.seed=3',
  )  # fmt: skip
  dry = pod(*args[:-3], '--dry_run', *args[-3:])
  start = pod(*args)
  assert start.returncode == 0, start.stdout + start.stderr
  # It runs what --dry_run prints.
  printed = [argv for argv in _commands(dry.stdout) if argv[0] == 'gcloud']
  assert printed == [['gcloud', *c['argv']] for c in fakes.calls('gcloud')]
  homes = [fakes.home(0), fakes.home(1)]

  # Provisioning, on each worker: uv from the package index, a Python 3.11 venv, the lock file.
  for home in homes:
    calls = [(c['prog'], c['argv']) for c in fakes.calls() if c['home'] == home]
    assert ('python3', ['-m', 'pip', 'install', '--user', '--quiet', 'uv']) in calls
    assert ('uv', ['venv', '--python', '3.11', '.venv']) in calls
    assert (
      'uv',
      ['pip', 'install', '--quiet', '--python', '.venv/bin/python']
      + ['-r', 'launch/requirements-tpu.lock', '-e', '.'],
    ) in calls

  # One training process per worker, with the --env variables, started in the shipped checkout.
  wait_for(lambda: len(fakes.calls('main')) == 2, what='both runs to start')
  mains = {c['home']: c for c in fakes.calls('main')}
  assert sorted(mains) == homes
  for home, main in mains.items():
    assert main['argv'] == [
      '-m',
      'stop_jax.main',
      '--config=configs/tiny.py',
      f'--workdir={workdir}',
      '--config.seed=3',
    ]
    assert main['cwd'] == os.path.join(home, 'stop_jax')
    assert main['env']['FOO'] == 'bar baz' and main['env']['XLA_FLAGS'] == '--x=1'
    assert main['env']['TF_CPP_MIN_LOG_LEVEL'] == '2'
    assert not any(k.startswith('MEGASCALE_') for k in main['env'])

  # Detached: gcloud ssh has returned, the runs go on, in sessions of their own.
  supervisors = _supervisor_pids(fakes, homes, 'r1', ['worker-0', 'worker-1'])
  for main, supervisor in zip([mains[h] for h in homes], supervisors, strict=True):
    assert alive(main['pid'])
    assert os.getsid(main['pid']) == supervisor != os.getsid(0)
  for i, home in enumerate(homes):
    wait_for(
      lambda h=home, i=i: 'step 3\n' in _log(h, 'r1', f'worker-{i}'), what='steps in the log'
    )

  status = pod('status', *target)
  assert status.returncode == 0, status.stderr
  for i, pid in enumerate(supervisors):
    assert f'worker-{i} (' in status.stdout and f'running, pid {pid}' in status.stdout
    assert f'  worker-{i}| step ' in status.stdout

  logs = pod('logs', *target, '--worker=1', '--lines=3')
  assert logs.returncode == 0, logs.stderr
  assert len(logs.stdout.splitlines()) == 3
  assert all(line.startswith('step ') for line in logs.stdout.splitlines())
  assert fakes.calls('gcloud')[-1]['argv'][-2:-1] == ['--worker=1']

  stop = pod('stop', *target, '--grace_s=20')
  assert stop.returncode == 0, stop.stderr
  assert stop.stdout.count(f'stopped, exit code {PREEMPTED_EXIT_CODE}') == 2
  for main, supervisor in zip([mains[h] for h in homes], supervisors, strict=True):
    assert not alive(main['pid']) and not alive(supervisor)
  for i, home in enumerate(homes):
    log = _log(home, 'r1', f'worker-{i}')
    assert 'preempted: saved step' in log and f'exit code {PREEMPTED_EXIT_CODE} (preempted' in log
    # The copy in the gs:// workdir is made at exit (and every --sync_s seconds before).
    with open(fakes.gcs(f'{workdir}/logs/worker-{i}.log')) as f:
      assert f.read() == log
  status = pod('status', *target, '--lines=1')
  assert status.stdout.count(f'exited with code {PREEMPTED_EXIT_CODE}') == 2

  # A stale process holds the TPU (started by hand, outside the launcher): the rerun stops it,
  # provisions nothing again, and starts a new run that appends to the same logs.
  stale = subprocess.Popen(
    [os.path.join(homes[0], 'stop_jax', '.venv', 'bin', 'python'), '-m', 'stop_jax.main'],
    env=fakes.env(HOME=homes[0], FAKE_TPU_HOLDERS=os.path.join(homes[0], 'tpu_holders')),
    stdout=subprocess.DEVNULL,
  )
  wait_for(lambda: stale.pid in fakes.tpu_holders(homes[0]), what='the stale run to hold the TPU')
  installs_before = len(fakes.calls('uv')) + len(fakes.calls('python3'))
  again = pod('start', *target, '--grace_s=20', 'configs/tiny.py', workdir)
  assert again.returncode == 0, again.stdout + again.stderr
  assert stale.wait(timeout=10) == PREEMPTED_EXIT_CODE  # SIGTERM: it saved and exited
  assert f'SIGTERM to pid {stale.pid}' in again.stdout
  pips = [c for c in fakes.calls('python3') if 'install' in c['argv']]
  assert len(fakes.calls('uv')) + len(pips) == installs_before - 2  # two `pip --version` checks
  wait_for(lambda: len(fakes.calls('main')) == 2 + 1 + 2, what='the new runs to start')
  assert _log(homes[0], 'r1', 'worker-0').count(' worker-0 on ') == 2  # appended, not replaced
  assert pod('stop', *target, '--grace_s=20').returncode == 0


@pytest.mark.slow
def test_a_local_workdir_is_refused_on_a_multi_host_pod_and_used_on_one_host(fakes, tmp_path):
  pod, _ = _pod(fakes, tmp_path, workers=2)
  workdir = str(tmp_path / 'runs' / 'local')
  proc = pod('start', '--name=pod', '--zone=z', 'configs/tiny.py', workdir)
  assert proc.returncode == 2
  assert f"WORKDIR '{workdir}' is on this worker's own disk, but the job spans 2 hosts" in (
    proc.stdout
  )
  assert fakes.calls('main') == [] and fakes.calls('uv') == []

  one, _ = _pod(fakes, tmp_path / 'one', workers=1)
  args = ('--name=vm', '--zone=z', '--run=solo', '--sync_s=1', 'configs/tiny.py', workdir)
  proc = one('start', *args)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  copy = os.path.join(workdir, 'logs', 'worker-0.log')
  # The copy next to the run is refreshed every --sync_s seconds while it runs, and at exit.
  wait_for(lambda: os.path.exists(copy) and 'step 5\n' in open(copy).read(), what='a log copy')
  assert one('stop', '--name=vm', '--zone=z', '--grace_s=20').returncode == 0
  with open(copy) as f:
    assert f'exit code {PREEMPTED_EXIT_CODE}' in f.read()


@pytest.mark.slow
def test_multislice_creates_a_queued_resource_and_runs_on_every_node(fakes, tmp_path):
  pod, env = _pod(fakes, tmp_path, workers=2, slices=2)
  (tmp_path / 'fakes' / 'qr_states').write_text('WAITING_FOR_RESOURCES PROVISIONING ACTIVE')
  qr = ('--queued_resource=qr', '--zone=z', '--project=p')
  create = pod(
    'create', *qr, '--num_slices=2', '--accelerator_type=v4-16',
    '--runtime_version=tpu-ubuntu2204-base', '--spot', '--wait', '--poll_s=0',
  )  # fmt: skip
  assert create.returncode == 0, create.stderr
  made, *describes = fakes.calls('gcloud')
  assert made['argv'] == [
    'compute',
    'tpus',
    'queued-resources',
    'create',
    'qr',
    '--zone=z',
    '--project=p',
    '--accelerator-type=v4-16',
    '--runtime-version=tpu-ubuntu2204-base',
    '--node-count=2',
    '--node-prefix=qr',
    '--spot',
  ]
  assert len(describes) == 3 and describes[0]['argv'][3] == 'describe'

  start = pod('start', *qr, '--num_slices=2', '--grace_s=20', 'configs/tiny.py', 'gs://b/ms')
  assert start.returncode == 0, start.stdout + start.stderr
  scp, ssh = fakes.calls('gcloud')[-2:]
  for call in (scp, ssh):
    assert call['argv'][:4] == ['compute', 'tpus', 'queued-resources', call['argv'][3]]
    assert {'--node=all', '--worker=all'} <= set(call['argv'])
  wait_for(lambda: len(fakes.calls('main')) == 4, what='a run on every worker of both slices')
  mains = fakes.calls('main')
  for main in mains:
    assert main['argv'][-1] == '--config.mesh.dcn_data=2'
    # The TPU runtime sets MEGASCALE_* for multislice queued resources; the launcher does not.
    assert not any(k.startswith('MEGASCALE_') for k in main['env'])
  for node in (0, 1):
    for worker in (0, 1):
      wait_for(
        lambda n=node, w=worker: (
          'step 1\n' in _log(fakes.home(w, n), 'ms', f'slice-{n}-worker-{w}')
        ),
        what='a log per slice and worker',
      )
  stop = pod('stop', *qr, '--grace_s=20')
  assert stop.stdout.count(f'exit code {PREEMPTED_EXIT_CODE}') == 4
  assert os.path.exists(fakes.gcs('gs://b/ms/logs/slice-1-worker-1.log'))


def test_the_worker_script_reads_slices_from_the_tpu_env_metadata(fakes, tmp_path):
  # What `start` names the log and counts as hosts comes from the metadata, as JAX reads it.
  home = fakes.home(1, 1)
  os.makedirs(home)
  env = fakes.env(
    HOME=home, FAKE_TPU_WORKER='1', FAKE_TPU_SLICE='1', FAKE_TPU_WORKERS='4', FAKE_TPU_SLICES='3'
  )
  proc = run_script(TPU_WORKER, 'start', '--skip_setup', 'configs/tiny.py', '/x', env=env)
  assert proc.returncode == 2
  assert 'the job spans 12 hosts' in proc.stderr
  proc = run_script(TPU_WORKER, 'status', '--run=r', env=env)
  assert proc.stdout.startswith('slice-1-worker-1 (')


@pytest.mark.parametrize(
  'args, message',
  [
    (('--zone=z', 'configs/tiny.py', '/w'), 'missing --name=NAME'),
    (('--name=n', 'configs/tiny.py', '/w'), 'missing --zone=ZONE'),
    (('--name=n', '--queued_resource=q', '--zone=z', 'configs/tiny.py', '/w'), 'not both'),
    (('--name=n', '--zone=z', 'configs/tiny.py'), 'missing CONFIG WORKDIR'),
    (('--name=n', '--zone=z', 'configs/nope.py', '/w'), "'configs/nope.py' does not exist"),
    (('--name=n', '--zone=z', 'configs/tiny.py', 'runs/w'), 'gs://BUCKET/PATH, or an absolute'),
    (('--name=n', '--zone=z', '--config.seed=1', 'configs/tiny.py', '/w'), 'after CONFIG WORKDIR'),
    (('--name=n', '--zone=z', '--num_slices=2', 'configs/tiny.py', 'gs://b/w'), 'needs --queued'),
    (('--queued_resource=q', '--zone=z', '--num_slices=2', 'configs/tiny.py', '/w'), 'own disk'),
    (
      ('--queued_resource=q', '--zone=z', '--num_slices=2', 'configs/tiny.py', 'gs://b/w')
      + ('--config.mesh.dcn_data=4',),
      'sets --config.mesh.dcn_data=2 itself',
    ),
    (('--name=n', '--zone=z', '--env', 'no_value', 'configs/tiny.py', '/w'), 'KEY=VALUE'),
    (('create', '--name=n', '--zone=z'), 'create needs --queued_resource'),
    (('create', '--queued_resource=q', '--zone=z', '--accelerator_type=v4-8'), '--runtime_version'),
    (('status', '--name=n', '--zone=z', 'configs/tiny.py', '/w'), 'takes no CONFIG WORKDIR'),
  ],
)
def test_bad_arguments_are_refused(args, message):
  subcommand = args[:1] if args[0] in ('create', 'status') else ()
  proc = run_script(TPU_POD, *subcommand, '--dry_run', *args[len(subcommand) :])
  assert proc.returncode == 2
  assert message in proc.stderr
