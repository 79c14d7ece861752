"""Stand-ins for the machines the launch scripts drive, and helpers to run the scripts.

Every fake command is a small Python script on PATH that appends its argv (and environment) to
`calls.jsonl` and then acts like the real one where the scripts depend on it:
- `gcloud ... tpu-vm|queued-resources ssh --command=CMD` runs CMD with bash on every selected
  worker, in parallel, each in its own home folder (`hosts/node-K-worker-I`), and waits for its
  output to close, as ssh does; `scp` copies into those homes; `storage cp` into `gcs/`.
- `curl` answers the TPU VM metadata queries of the worker it runs on (worker number, the
  slice's endpoints, `tpu-env` with the MEGASCALE_* lines of a multislice queued resource).
- `python3 -m pip install --user uv` installs a fake `uv`, whose `venv` makes a `.venv` holding
  a fake training `python`: it prints a step every 0.1 s, holds the "TPU" (its pid goes to the
  file `lsof` reads) and exits with 75 after SIGTERM, like a run that saved.
- `srun` waits for SIGTERM (or exits at once) with a chosen code; `scontrol` only records.
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = os.path.join(ROOT, 'launch')
PREEMPTED_EXIT_CODE = 75

_HEADER = f"""#!{sys.executable} -S
import json, os, shutil, signal, subprocess, sys, time
REAL_PYTHON = {sys.executable!r}

def record(prog, **extra):
  entry = {{'prog': prog, 'argv': sys.argv[1:], 'cwd': os.getcwd(), 'home': os.environ.get('HOME'),
           'pid': os.getpid(), **extra}}
  with open(os.path.join(os.environ['FAKE_ROOT'], 'calls.jsonl'), 'a') as f:
    f.write(json.dumps(entry) + '\\n')

"""

_GCLOUD = """
args = sys.argv[1:]
record('gcloud')
flags = dict(a[2:].split('=', 1) for a in args if a.startswith('--') and '=' in a)
pos = [a for a in args if not a.startswith('--')]
root = os.environ['FAKE_ROOT']
if pos[:2] == ['storage', 'cp']:
  dest = os.path.join(root, 'gcs', pos[3].removeprefix('gs://'))
  os.makedirs(os.path.dirname(dest), exist_ok=True)
  shutil.copyfile(pos[2], dest)
  sys.exit(0)
kind, verb = pos[2], pos[3]
if verb == 'create':
  sys.exit(0)
if verb == 'describe':
  with open(os.path.join(root, 'qr_states')) as f:
    states = f.read().split()
  with open(os.path.join(root, 'qr_states'), 'w') as f:
    f.write(' '.join(states[1:] or states))
  print(states[0])
  sys.exit(0)
workers, slices = int(os.environ['FAKE_TPU_WORKERS']), int(os.environ['FAKE_TPU_SLICES'])
if kind == 'tpu-vm':
  slices = 1
  nodes = [0]
else:
  nodes = range(slices) if flags.get('node', '0') == 'all' else [int(flags.get('node', '0'))]
selected = range(workers) if flags.get('worker', '0') == 'all' else [int(flags.get('worker', '0'))]
hosts = [(k, i, os.path.join(root, 'hosts', f'node-{k}-worker-{i}')) for k in nodes for i in selected]
if verb == 'scp':
  for k, i, home in hosts:
    os.makedirs(home, exist_ok=True)
    shutil.copyfile(pos[4], os.path.join(home, pos[5].split(':', 1)[1]))
  sys.exit(0)
assert verb == 'ssh', args
procs = []
for k, i, home in hosts:
  os.makedirs(home, exist_ok=True)
  # Each worker has its own TPU: the holders `lsof` lists are those of this worker.
  env = dict(os.environ, HOME=home, FAKE_TPU_WORKER=str(i), FAKE_TPU_SLICE=str(k),
             FAKE_TPU_SLICES=str(slices), FAKE_TPU_HOLDERS=os.path.join(home, 'tpu_holders'))
  procs.append(subprocess.Popen(['bash', '-c', flags['command']], cwd=home, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
rc = 0
for p in procs:
  # Like ssh: returns when the remote command exits and its output is closed.
  out, _ = p.communicate(timeout=float(os.environ.get('FAKE_SSH_TIMEOUT', '60')))
  sys.stdout.write(out)
  rc = max(rc, p.returncode)
sys.exit(rc)
"""

_CURL = """
key = sys.argv[-1].rsplit('/', 1)[1]
if 'FAKE_TPU_WORKER' not in os.environ or 'Metadata-Flavor: Google' not in sys.argv:
  sys.exit(7)  # could not connect: not on a TPU VM
worker, slice_id = os.environ['FAKE_TPU_WORKER'], os.environ['FAKE_TPU_SLICE']
workers, slices = int(os.environ['FAKE_TPU_WORKERS']), int(os.environ['FAKE_TPU_SLICES'])
if key == 'agent-worker-number':
  print(worker, end='')
elif key == 'worker-network-endpoints':
  print(','.join(f'unknown:unknown:10.0.{slice_id}.{j}' for j in range(workers)), end='')
elif key == 'tpu-env':
  lines = ["ACCELERATOR_TYPE: 'v4-16'", "WORKER_ID: '" + worker + "'"]
  if slices > 1:
    lines += [f"MEGASCALE_NUM_SLICES: '{slices}'", f"MEGASCALE_SLICE_ID: '{slice_id}'",
              "MEGASCALE_COORDINATOR_ADDRESS: '10.0.0.0:8080'"]
  print('\\n'.join(lines))
else:
  sys.exit(22)  # HTTP 404 under -f
"""

_LSOF = """
record('lsof')
try:
  with open(os.environ['FAKE_TPU_HOLDERS']) as f:
    pids = {int(line) for line in f if line.strip()}
except FileNotFoundError:
  pids = set()
alive = []
for pid in sorted(pids):
  try:
    with open(f'/proc/{pid}/stat') as f:
      if f.read().split(')')[-1].split()[0] != 'Z':
        alive.append(pid)
  except OSError:
    pass
print('\\n'.join(map(str, alive)))
sys.exit(0 if alive else 1)
"""

_SYSTEM_PYTHON3 = """
if sys.argv[1:3] == ['-m', 'pip']:
  record('python3')
  if '--version' in sys.argv:
    print('pip 22.0.2 from /usr/lib/python3/dist-packages/pip (python 3.10)')
  elif 'install' in sys.argv and 'uv' in sys.argv:
    uv = os.path.join(os.environ['HOME'], '.local', 'bin', 'uv')
    os.makedirs(os.path.dirname(uv), exist_ok=True)
    shutil.copyfile(os.path.join(os.environ['FAKE_ROOT'], 'templates', 'uv'), uv)
    os.chmod(uv, 0o755)
  sys.exit(0)
os.execv(REAL_PYTHON, [REAL_PYTHON] + sys.argv[1:])
"""

_UV = """
record('uv')
args = sys.argv[1:]
if args[0] == 'venv':
  assert args[1:3] == ['--python', '3.11'], args
  python = os.path.join(args[3], 'bin', 'python')
  os.makedirs(os.path.dirname(python), exist_ok=True)
  shutil.copyfile(os.path.join(os.environ['FAKE_ROOT'], 'templates', 'python'), python)
  os.chmod(python, 0o755)
elif args[:2] == ['pip', 'install']:
  assert os.path.isfile(args[args.index('-r') + 1]), args
else:
  sys.exit(f'fake uv: {args}')
"""

# The training process: `python -m stop_jax.main ...` (also what $PYTHON runs in local_mp.sh).
_TRAINING_PYTHON = """
if sys.argv[1] == '-c':
  os.execv(REAL_PYTHON, [REAL_PYTHON] + sys.argv[1:])
assert sys.argv[1:3] == ['-m', 'stop_jax.main'], sys.argv
record('main', env=dict(os.environ))
holders = os.environ.get('FAKE_TPU_HOLDERS')
if holders:
  with open(holders, 'a') as f:
    f.write(f'{os.getpid()}\\n')
process = next((a.split('=')[1] for a in sys.argv if a.startswith('--process_id=')), '0')
step = 0

def on_term(signum, frame):
  print(f'preempted: saved step {step}', flush=True)
  sys.exit(75)

signal.signal(signal.SIGTERM, on_term)
def pick(name, default):
  values = os.environ.get(name, default).split(',')
  return int(values[int(process) % len(values)])

steps = pick('FAKE_MAIN_STEPS', '100000')
while step < steps:
  step += 1
  print(f'step {step}', flush=True)
  time.sleep(0.1)
sys.exit(pick('FAKE_MAIN_EXIT', '0'))
"""

_SRUN = """
record('srun', env=dict(os.environ))
if os.environ.get('FAKE_SRUN_WAIT_TERM') == '1':
  def on_term(signum, frame):
    record('srun-got-sigterm')
    sys.exit(int(os.environ['FAKE_SRUN_EXIT']))
  signal.signal(signal.SIGTERM, on_term)
  while True:
    time.sleep(0.05)
sys.exit(int(os.environ['FAKE_SRUN_EXIT']))
"""

_RECORD_ONLY = """
name = os.path.basename(sys.argv[0])
record(name)
sys.exit(int(os.environ.get(f'FAKE_{name.upper()}_EXIT', '0')))
"""

_NVIDIA_SMI = """
print('GPU 0: NVIDIA H100 (UUID: GPU-0)')
"""


def write_fake(path, body):
  with open(path, 'w') as f:
    f.write(_HEADER + body)
  os.chmod(path, 0o755)


def clean_env(**extra) -> dict:
  """This environment without any cluster variables, plus `extra`."""
  env = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(('SLURM_', 'SRUN_', 'OMPI_', 'JAX_', 'XLA_', 'TPU_', 'MEGASCALE_'))
  }
  for name in ('TF_CPP_MIN_LOG_LEVEL', 'STOP_JAX_DIR', 'VENV', 'LOG_DIR', 'PYTHON'):
    env.pop(name, None)
  env.update(extra)
  return env


def run_script(script, *args, env=None, cwd=ROOT, timeout=120):
  return subprocess.run(
    ['bash', script, *args],
    cwd=cwd,
    capture_output=True,
    text=True,
    env=env or clean_env(),
    timeout=timeout,
  )


class Fakes:
  """A folder of fake commands and the records of their calls (see the module docstring)."""

  def __init__(self, root):
    self.root = str(root)
    self.bin = os.path.join(self.root, 'bin')
    self.templates = os.path.join(self.root, 'templates')
    self.holders = os.path.join(self.root, 'tpu_holders')
    for folder in (self.bin, self.templates, os.path.join(self.root, 'gcs')):
      os.makedirs(folder, exist_ok=True)
    open(self.holders, 'w').close()
    open(os.path.join(self.root, 'calls.jsonl'), 'w').close()
    for name, body in {
      'gcloud': _GCLOUD,
      'curl': _CURL,
      'lsof': _LSOF,
      'python3': _SYSTEM_PYTHON3,
      'srun': _SRUN,
      'scontrol': _RECORD_ONLY,
      'nvidia-smi': _NVIDIA_SMI,
      'python': _TRAINING_PYTHON,
    }.items():
      write_fake(os.path.join(self.bin, name), body)
    write_fake(os.path.join(self.templates, 'uv'), _UV)
    write_fake(os.path.join(self.templates, 'python'), _TRAINING_PYTHON)

  def env(self, **extra) -> dict:
    base = {
      'PATH': f'{self.bin}:{os.environ["PATH"]}',
      'FAKE_ROOT': self.root,
      'FAKE_TPU_HOLDERS': self.holders,
    }
    return clean_env(**{**base, **extra})

  def calls(self, prog=None) -> list[dict]:
    with open(os.path.join(self.root, 'calls.jsonl')) as f:
      calls = [json.loads(line) for line in f if line.strip()]
    return [c for c in calls if prog is None or c['prog'] == prog]

  def home(self, worker, node=0) -> str:
    return os.path.join(self.root, 'hosts', f'node-{node}-worker-{worker}')

  def gcs(self, path) -> str:
    return os.path.join(self.root, 'gcs', path.removeprefix('gs://'))

  def tpu_holders(self, home=None) -> list[int]:
    """The pids that opened the TPU: on the worker of `home`, else anywhere."""
    files = [os.path.join(home, 'tpu_holders')] if home else [self.holders]
    if home is None:
      files += glob.glob(os.path.join(self.root, 'hosts', '*', 'tpu_holders'))
    pids = []
    for name in files:
      if os.path.exists(name):
        with open(name) as f:
          pids += [int(line) for line in f if line.strip()]
    return pids

  def kill_all(self):
    """Kills what the tests left running: fake runs and their supervisors (our own pids only)."""
    pids = set(self.tpu_holders())
    for folder, _, files in os.walk(os.path.join(self.root, 'hosts')):
      pids.update(int(open(os.path.join(folder, f)).read()) for f in files if f.endswith('.pid'))
    for pid in pids:
      for target in (-pid, pid):
        try:
          os.kill(target, signal.SIGKILL)
        except OSError:
          pass


@pytest.fixture
def fakes(tmp_path):
  made = Fakes(tmp_path / 'fakes')
  yield made
  made.kill_all()


def alive(pid) -> bool:
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().split(')')[-1].split()[0] != 'Z'
  except OSError:
    return False


def wait_for(predicate, timeout=30.0, what='condition'):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return
    time.sleep(0.05)
  raise AssertionError(f'timed out waiting for {what}')


def committed_copy(dest) -> str:
  """A git repository holding this checkout's launch/, configs/ and setup.cfg as its HEAD.

  tpu_pod.sh ships HEAD; the copy makes the tests ship the launch scripts of the working tree.
  """
  os.makedirs(dest)
  for folder in ('launch', 'configs'):
    shutil.copytree(os.path.join(ROOT, folder), os.path.join(dest, folder))
  shutil.copy(os.path.join(ROOT, 'setup.cfg'), dest)
  git = ['git', '-c', 'user.name=t', '-c', 'user.email=t@t', '-C', str(dest)]
  for argv in (['init', '-q'], ['add', '-A'], ['commit', '-q', '-m', 'copy']):
    subprocess.run(git + argv, check=True, capture_output=True)
  return str(dest)
