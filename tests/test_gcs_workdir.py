"""A run whose workdir is gs://, on a real GCS emulator server: train, kill -9, resume, evaluate,
export, all as the command-line programs a user runs; then a converted checkpoint on gs://.

Every storage layer writes to the emulator (README, "Workdirs on GCS"): our files through
`runtime/fileio.py` (etils.epath -> gcsfs), orbax's through epath and TensorStore. The objects
are listed and read back over the emulator's own HTTP JSON API, and the run, copied out of the
bucket, must equal the uninterrupted local run of tests/train/test_fault_tolerance.py (the
shared `baseline`: every step's loss and the final params, EMA target and optimiser state).
"""

import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from stop_jax.eval import export
from tests.gcs_emulator import Emulator
from tests.subprocess_env import cpu_env
from tests.train.test_fault_tolerance import (  # noqa: F401 (baseline is a fixture)
  RESUMED,
  STEPS,
  TRAIN_ARGS,
  _assert_same_as_baseline,
  _flat,
  baseline,
)

ROOT = os.path.dirname(os.path.abspath(os.path.dirname(__file__)))
BUCKET = 'stop-runs'
RUN = 'run'
WORKDIR = f'gs://{BUCKET}/{RUN}'
TIMEOUT_S = 300


def _start(emulator, log_path, *args) -> subprocess.Popen:
  with open(log_path, 'w') as log:  # a file, not a pipe: a chatty child never blocks on it
    return subprocess.Popen(
      [sys.executable, *(args if args[0] == '-c' else ('-m', *args))],
      cwd=ROOT,
      env=cpu_env(**emulator.env()),  # every gs:// layer pointed at the emulator
      stdout=log,
      stderr=subprocess.STDOUT,
    )


def _run(emulator, log_path, *args) -> str:
  proc = _start(emulator, log_path, *args)
  try:
    proc.wait(timeout=TIMEOUT_S)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  log = open(log_path).read()
  assert proc.returncode == 0, f'exit code {proc.returncode}:\n{log[-6000:]}'
  return log


# A converted checkpoint (the format of `stop_jax.tools.convert --output`) written to the bucket
# from the bucket's export, then read back by evaluation's loader.
_CONVERT = """
import sys
import numpy as np
from stop_jax.eval import converted, export, load
config, params = export.load_exported(sys.argv[1])
converted.write_converted(sys.argv[2], config, {'target_encoder': params}, {'source': 'test'})
model = load.load_model(sys.argv[2])
a, b = export.flatten_params(params), export.flatten_params(model.params)
assert model.source == 'converted' and a.keys() == b.keys() and a
assert all(np.array_equal(a[k], b[k]) for k in a)
print('converted: equal')
"""


def _committed(emulator) -> list[int]:
  """Finished checkpoint steps in the bucket (on GCS orbax marks them with commit_success.txt)."""
  names = emulator.names(BUCKET, f'{RUN}/checkpoints/')
  found = (re.fullmatch(rf'{RUN}/checkpoints/(\d+)/commit_success\.txt', n) for n in names)
  return sorted(int(m.group(1)) for m in found if m)


@pytest.fixture
def emulator(tmp_path):
  server = Emulator(log_path=str(tmp_path / 'emulator.log'))
  try:
    server.create_bucket(BUCKET)
    yield server
  finally:
    server.stop()


@pytest.mark.slow
def test_gcs_workdir_train_kill_resume_evaluate_export(emulator, baseline, tmp_path):  # noqa: F811
  train = ['stop_jax.main', *TRAIN_ARGS, f'--workdir={WORKDIR}']

  # Train, and kill -9 once a checkpoint is in the bucket.
  proc = _start(emulator, tmp_path / 'killed.log', *train)
  deadline = time.monotonic() + TIMEOUT_S
  try:
    while proc.poll() is None and not _committed(emulator) and time.monotonic() < deadline:
      time.sleep(0.02)
  finally:
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
    proc.wait()
  log = open(tmp_path / 'killed.log').read()
  assert proc.returncode == -signal.SIGKILL, log[-6000:]
  committed = _committed(emulator)
  assert committed and max(committed) < STEPS, (committed, log[-6000:])
  assert f'{RUN}/summary.json' not in emulator.names(BUCKET, RUN)

  # The same command resumes from the bucket's latest checkpoint and runs to the end.
  log = _run(emulator, tmp_path / 'rerun.log', *train)
  assert int(RESUMED.search(log).group(1)) == max(committed)
  assert json.loads(emulator.read(BUCKET, f'{RUN}/summary.json'))['steps'] == STEPS

  # Evaluate (k-NN on digits, features cached in the bucket) and export, from the bucket.
  _run(
    emulator,
    tmp_path / 'evaluate.log',
    'stop_jax.evaluate',
    '--config=configs/eval/tiny.py:protocol=knn',
    "--config.eval.feature_types=('last',)",  # the test's encoder has 2 blocks, not 4
    f'--workdir={WORKDIR}',
  )
  exported_to = _run(
    emulator, tmp_path / 'export.log', 'stop_jax.eval.export', f'--workdir={WORKDIR}'
  )
  assert exported_to.strip().splitlines()[-1] == f'{WORKDIR}/export/step_{STEPS}'

  names = emulator.names(BUCKET)
  for name in ('config.json', 'plan.json', 'metrics.jsonl', 'summary.json', 'eval/tiny_knn.json'):
    assert f'{RUN}/{name}' in names, names
  for name in ('encoder_params.npz', 'config.json', 'export.json'):
    assert f'{RUN}/export/step_{STEPS}/{name}' in names
  assert sum(n.startswith(f'{RUN}/tb/events.out.tfevents') for n in names) == 2  # one per run
  assert sum(n.startswith(f'{RUN}/eval/cache/') and n.endswith('.npz') for n in names) == 2
  assert f'{RUN}/checkpoints/{STEPS}/commit_success.txt' in names
  assert not any('.stop_jax_shared_check' in n or n.endswith('.tmp') for n in names)
  record = json.loads(emulator.read(BUCKET, f'{RUN}/eval/tiny_knn.json'))
  assert record['model'] == {**record['model'], 'path': WORKDIR, 'step': STEPS}
  info = json.loads(emulator.read(BUCKET, f'{RUN}/export/step_{STEPS}/export.json'))
  assert info['source'] == WORKDIR and info['step'] == STEPS

  log = _run(
    emulator,
    tmp_path / 'convert.log',
    '-c',
    _CONVERT,
    f'{WORKDIR}/export/step_{STEPS}',
    f'gs://{BUCKET}/converted',
  )
  assert 'converted: equal' in log
  assert {'converted/config.json', 'converted/conversion.json'} <= set(emulator.names(BUCKET))
  assert 'converted/checkpoints/0/commit_success.txt' in emulator.names(BUCKET, 'converted/')

  # The run as the bucket holds it equals the uninterrupted local run.
  copy = tmp_path / 'copy'
  emulator.download(BUCKET, RUN, str(copy))
  _assert_same_as_baseline(str(copy), baseline)
  params = np.load(
    io.BytesIO(emulator.read(BUCKET, f'{RUN}/export/step_{STEPS}/encoder_params.npz'))
  )
  exported = _flat({'target_params': export.unflatten_params(dict(params))})
  assert exported
  for key, value in exported.items():
    np.testing.assert_array_equal(value, baseline['final'][key], err_msg=key)
