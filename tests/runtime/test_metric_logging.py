"""MetricLogger: metrics.jsonl and TensorBoard events in a local workdir and on a GCS emulator."""

import json
import os

import jax.numpy as jnp
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

  # A resumed run continues the file; with no interval every line is uploaded at once.
  monkeypatch.setattr(metric_logging, 'REMOTE_SYNC_EVERY_S', 0.0)
  resumed = MetricLogger(f'gs://{BUCKET}/run', total_steps=10, global_batch=8)
  _log_steps(resumed, [4, 5])
  assert _steps(gcs.read(BUCKET, 'run/metrics.jsonl').decode()) == [1, 2, 3, 4, 4, 5]
  resumed.close()
  assert len(gcs.names(BUCKET, 'run/tb/')) == 2  # one events file per run
