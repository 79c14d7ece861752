"""MetricLogger: metrics.jsonl and TensorBoard events in a local workdir and on a GCS emulator."""

import json
import logging
import os

import jax.numpy as jnp
import numpy as np
import pytest

from stop_jax.runtime import metric_logging
from stop_jax.runtime.metric_logging import MetricLogger
from tests import gcs_emulator

BUCKET = 'metrics-test'


def _log_steps(logger, steps):
  for step in steps:
    logger.push(step, {'loss': jnp.float32(1.0 / step), 'lr': jnp.float32(1e-3)})
  logger.flush_pending()


def _steps(text: str) -> list[int]:
  return [json.loads(line)['step'] for line in text.splitlines()]


def test_local_workdir_gets_every_line_at_once_and_tensorboard_events(tmp_path):
  workdir = str(tmp_path / 'run')
  logger = MetricLogger(workdir, total_steps=10, global_batch=8)
  _log_steps(logger, [1, 2])
  assert _steps(open(os.path.join(workdir, 'metrics.jsonl')).read()) == [1, 2]
  logger.sync()  # nothing to do locally
  logger.write_summary(2, {'top1': 0.5}, prefix='probe')
  logger.close()
  lines = [json.loads(x) for x in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert lines[0]['loss'] == 1.0 and lines[-1] == {'step': 2, 'probe/top1': 0.5}
  (events,) = os.listdir(os.path.join(workdir, 'tb'))
  assert events.startswith('events.out.tfevents')


def _reject(name):
  raise AssertionError(f'not JSON: {name}')


def _strict_rows(text: str) -> list[dict]:
  return [json.loads(line, parse_constant=_reject) for line in text.splitlines()]


def test_non_finite_values_are_strict_json_and_tensorboard_is_warned_once(tmp_path, capfd, caplog):
  workdir = str(tmp_path / 'run')
  logger = MetricLogger(workdir, total_steps=10, global_batch=8)
  nan, inf = float('nan'), float('inf')
  with caplog.at_level(logging.WARNING):
    for step, (loss, grad) in enumerate([(1.0, 2.0), (nan, inf), (nan, -inf), (0.5, 1.0)], 1):
      logger.push(step, {'loss': jnp.float32(loss), 'grad_norm': jnp.float32(grad)})
    logger.flush_pending()
    logger.write_summary(4, {'top1': nan, 'n': 3}, prefix='probe')
    logger.close()
  rows = _strict_rows(open(os.path.join(workdir, 'metrics.jsonl')).read())
  assert [(r['step'], r['loss'], r['grad_norm']) for r in rows[:4]] == [
    (1, 1.0, 2.0),
    (2, 'NaN', 'Infinity'),
    (3, 'NaN', '-Infinity'),
    (4, 0.5, 1.0),
  ]
  assert rows[4] == {'step': 4, 'probe/top1': 'NaN', 'probe/n': 3}
  assert float(rows[2]['grad_norm']) == -inf  # float() reads the strings back
  # TensorBoard: only the finite values, and one warning per metric instead of tensorboardX's
  # 'NaN or Inf found in input tensor' on every write.
  (events,) = os.listdir(os.path.join(workdir, 'tb'))
  data = open(os.path.join(workdir, 'tb', events), 'rb').read()
  assert data.count(b'train/loss') == 2 and data.count(b'train/grad_norm') == 2
  assert data.count(b'probe/n') == 1 and b'probe/top1' not in data
  warned = [
    r.getMessage() for r in caplog.records if 'not written to TensorBoard' in r.getMessage()
  ]
  assert sorted(w.split()[0] for w in warned) == ['probe/top1', 'train/grad_norm', 'train/loss']
  everything = capfd.readouterr().err + caplog.text
  assert 'NaN or Inf found' not in everything


def test_resume_cuts_metrics_back_to_the_restored_step(tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  lines = [
    '{"step": 1, "loss": 1.0}',
    '{"step": 2, "loss": NaN}',  # an older file: bare NaN
    '{"step": 2, "probe/top1": 0.5}',
    '{"step": 3, "loss": 0.5}',
    '{"step": 4, "loss": 0.25}',
    '{"step": 5, "lo',  # cut by a crash
  ]
  (workdir / 'metrics.jsonl').write_text('\n'.join(lines))
  logger = MetricLogger(str(workdir), total_steps=10, global_batch=8, start_step=2)
  assert logger.resumed_metrics['loss'] != logger.resumed_metrics['loss']  # the NaN of step 2
  _log_steps(logger, [3])
  logger.close()
  rows = _strict_rows((workdir / 'metrics.jsonl').read_text())
  assert [(r['step'], r.get('loss')) for r in rows[:3]] == [(1, 1.0), (2, 'NaN'), (2, None)]
  assert len(rows) == 4 and rows[3]['step'] == 3  # logged again, once
  assert rows[3]['loss'] == np.float32(1.0 / 3.0)
  # Re-running the final evaluators at the step resumed from replaces their rows there.
  MetricLogger(str(workdir), 10, 8, start_step=2, rerun_prefixes=('probe/', 'probe_')).close()
  assert [r['step'] for r in _strict_rows((workdir / 'metrics.jsonl').read_text())] == [1, 2]
  # A fresh start (no checkpoint yet) drops what a run that died before its first save logged.
  MetricLogger(str(workdir), 10, 8, start_step=0).close()
  assert (workdir / 'metrics.jsonl').read_text() == ''


def test_only_writing_processes_touch_the_workdir(tmp_path):
  logger = MetricLogger(str(tmp_path / 'run'), total_steps=10, global_batch=8, write=False)
  _log_steps(logger, [1])
  logger.close()
  assert not os.path.exists(tmp_path / 'run')


@pytest.fixture(scope='module')
def gcs():
  emulator = gcs_emulator.Emulator()
  try:
    emulator.create_bucket(BUCKET)
    with gcs_emulator.in_this_process(emulator):
      yield emulator
  finally:
    emulator.stop()


def test_gcs_workdir_uploads_metrics_and_events_on_sync_and_close(gcs, monkeypatch):
  logger = MetricLogger(f'gs://{BUCKET}/run', total_steps=10, global_batch=8)
  local_tb = logger._tb_local
  _log_steps(logger, [1, 2])
  logger.push(3, {'loss': jnp.float32(0.25)})  # pending: fetched one step late
  assert gcs.names(BUCKET, 'run/') == []  # nothing uploaded before a sync (or 60 s)
  logger.sync()  # what the trainer calls before a checkpoint save: the pending step included
  assert _steps(gcs.read(BUCKET, 'run/metrics.jsonl').decode()) == [1, 2, 3]
  (events,) = [n for n in gcs.names(BUCKET, 'run/') if n.startswith('run/tb/')]
  assert b'train/loss' in gcs.read(BUCKET, events)
  _log_steps(logger, [4])
  assert _steps(gcs.read(BUCKET, 'run/metrics.jsonl').decode()) == [1, 2, 3]
  logger.close()
  assert _steps(gcs.read(BUCKET, 'run/metrics.jsonl').decode()) == [1, 2, 3, 4]
  assert not os.path.exists(local_tb)  # the local copy of the events is gone
  assert gcs.read(BUCKET, events).count(b'train/loss') == 4

  # A run resumed at step 3 cuts the file back to it, then continues it; with no interval
  # every line is uploaded at once.
  monkeypatch.setattr(metric_logging, 'REMOTE_SYNC_EVERY_S', 0.0)
  resumed = MetricLogger(f'gs://{BUCKET}/run', total_steps=10, global_batch=8, start_step=3)
  assert _steps(gcs.read(BUCKET, 'run/metrics.jsonl').decode()) == [1, 2, 3]
  _log_steps(resumed, [4, 5])
  assert _steps(gcs.read(BUCKET, 'run/metrics.jsonl').decode()) == [1, 2, 3, 4, 5]
  resumed.close()
  assert len(gcs.names(BUCKET, 'run/tb/')) == 2  # one events file per run
