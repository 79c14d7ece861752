"""fileio on local paths (atomic writes, appending, errors) and on a real GCS emulator server."""

import json
import os

import pytest

from stop_jax.runtime import fileio
from tests import gcs_emulator

BUCKET = 'fileio-test'


# --- local paths ----------------------------------------------------------------------------


def test_write_replaces_the_file_atomically_and_leaves_no_temporary_file(tmp_path):
  path = str(tmp_path / 'sub' / 'config.json')  # the parent is created
  fileio.write_json(path, {'a': 1}, indent=2)
  assert open(path).read() == json.dumps({'a': 1}, indent=2)
  fileio.write_text(path, 'second')
  assert fileio.read_text(path) == 'second'
  assert os.listdir(tmp_path / 'sub') == ['config.json']


def test_a_failed_write_keeps_the_old_file_whole_and_cleans_up(tmp_path, monkeypatch):
  path = str(tmp_path / 'summary.json')
  fileio.write_text(path, 'old')

  def failing_replace(src, dst):
    raise OSError('disk full')

  monkeypatch.setattr(os, 'replace', failing_replace)
  with pytest.raises(OSError, match='disk full'):
    fileio.write_bytes(path, b'new')
  assert open(path).read() == 'old'
  assert os.listdir(tmp_path) == ['summary.json']


def test_reading_a_missing_file_names_it(tmp_path):
  path = str(tmp_path / 'nope.json')
  with pytest.raises(FileNotFoundError, match=f'no such file: {path}'):
    fileio.read_json(path)
  with pytest.raises(FileNotFoundError, match='nope.json'):
    fileio.remove(path)
  fileio.remove(path, missing_ok=True)
  with pytest.raises(FileNotFoundError):
    fileio.listdir(str(tmp_path / 'nodir'))


def test_queries_on_a_local_directory(tmp_path):
  fileio.makedirs(str(tmp_path / 'a' / 'b'))
  for name in ('x.npz', 'y.npz', 'z.json'):
    fileio.write_bytes(str(tmp_path / 'a' / name), b'1')
  assert fileio.isdir(str(tmp_path / 'a' / 'b')) and not fileio.isdir(str(tmp_path / 'a' / 'x.npz'))
  assert fileio.exists(str(tmp_path / 'a' / 'x.npz'))
  assert fileio.listdir(str(tmp_path / 'a')) == ['b', 'x.npz', 'y.npz', 'z.json']
  assert fileio.glob(str(tmp_path / 'a' / '*.npz')) == [
    str(tmp_path / 'a' / 'x.npz'),
    str(tmp_path / 'a' / 'y.npz'),
  ]
  fileio.remove(str(tmp_path / 'a' / 'x.npz'))
  assert not fileio.exists(str(tmp_path / 'a' / 'x.npz'))


def test_resolve_keeps_uris_and_makes_local_paths_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert fileio.resolve('run/checkpoints') == str(tmp_path / 'run' / 'checkpoints')
  assert fileio.resolve('gs://bucket/run/checkpoints/') == 'gs://bucket/run/checkpoints'
  assert os.path.abspath('gs://bucket/run') != 'gs://bucket/run'  # what resolve avoids
  assert fileio.is_remote('gs://b/x') and fileio.is_remote('s3://b/x')
  assert not fileio.is_remote('/tmp/x') and not fileio.is_remote('gs:/b/x')


def test_an_unsupported_scheme_is_refused_naming_the_path():
  with pytest.raises(ValueError, match=r"path 'hdfs://nn/run' is not supported: .*gs://BUCKET"):
    fileio.write_text('hdfs://nn/run', 'x')


def test_appender_appends_to_what_is_there_and_each_line_is_on_disk_at_once(tmp_path):
  path = str(tmp_path / 'metrics.jsonl')
  fileio.write_text(path, '{"step": 1}\n')  # a previous run's line: a resume continues after it
  log = fileio.Appender(path)
  assert not log.remote and not log.unsynced
  log.write('{"step": 2}\n')
  assert open(path).read() == '{"step": 1}\n{"step": 2}\n'  # before any sync or close
  log.sync()
  log.close()
  log.close()  # idempotent
  with pytest.raises(ValueError, match='after close'):
    log.write('x')
  again = fileio.Appender(path)
  again.write('{"step": 3}\n')
  again.close()
  assert [json.loads(x)['step'] for x in open(path)] == [1, 2, 3]


# --- gs:// on a real emulator server ----------------------------------------------------------


@pytest.fixture(scope='module')
def gcs():
  emulator = gcs_emulator.Emulator()
  try:
    emulator.create_bucket(BUCKET)
    with gcs_emulator.in_this_process(emulator):
      yield emulator
  finally:
    emulator.stop()


def test_files_on_gcs_round_trip_and_are_real_objects(gcs):
  run = f'gs://{BUCKET}/files'
  fileio.makedirs(run)  # nothing to create on an object store
  fileio.write_json(f'{run}/config.json', {'lr': 1e-3}, indent=2)
  fileio.write_bytes(f'{run}/eval/cache/a.npz', b'\x00\x01')
  fileio.write_bytes(f'{run}/eval/cache/b.npz', b'\x02')
  assert gcs.read(BUCKET, 'files/config.json') == json.dumps({'lr': 1e-3}, indent=2).encode()
  assert fileio.read_json(f'{run}/config.json') == {'lr': 1e-3}
  assert fileio.read_bytes(f'{run}/eval/cache/a.npz') == b'\x00\x01'
  assert fileio.exists(f'{run}/config.json') and not fileio.exists(f'{run}/nope.json')
  assert fileio.isdir(f'{run}/eval') and not fileio.isdir(f'{run}/config.json')
  assert fileio.listdir(run) == ['config.json', 'eval']
  assert fileio.glob(f'{run}/eval/cache/*.npz') == [
    f'{run}/eval/cache/a.npz',
    f'{run}/eval/cache/b.npz',
  ]
  fileio.write_text(f'{run}/config.json', 'replaced')
  assert gcs.read(BUCKET, 'files/config.json') == b'replaced'
  fileio.remove(f'{run}/eval/cache/a.npz')
  assert gcs.names(BUCKET, 'files/') == ['files/config.json', 'files/eval/cache/b.npz']
  with pytest.raises(FileNotFoundError, match=f'no such file: {run}/nope.json'):
    fileio.read_text(f'{run}/nope.json')
  fileio.remove(f'{run}/nope.json', missing_ok=True)
  with pytest.raises(FileNotFoundError, match='no such directory'):
    fileio.listdir(f'{run}/nodir')


def test_appender_on_gcs_uploads_the_whole_file_on_sync_and_a_resume_continues(gcs):
  path = f'gs://{BUCKET}/append/metrics.jsonl'
  log = fileio.Appender(path)
  assert log.remote
  log.write('{"step": 1}\n')
  log.write('{"step": 2}\n')
  assert log.unsynced and gcs.names(BUCKET, 'append/') == []  # nothing uploaded before sync
  log.sync()
  assert not log.unsynced
  assert gcs.read(BUCKET, 'append/metrics.jsonl') == b'{"step": 1}\n{"step": 2}\n'
  log.write('{"step": 3}\n')
  assert gcs.read(BUCKET, 'append/metrics.jsonl') == b'{"step": 1}\n{"step": 2}\n'
  log.close()  # syncs
  assert gcs.read(BUCKET, 'append/metrics.jsonl').count(b'\n') == 3

  resumed = fileio.Appender(path)  # a resumed run: the new lines go after the old ones
  resumed.write('{"step": 3}\n{"step": 4}\n')
  resumed.close()
  steps = [json.loads(x)['step'] for x in gcs.read(BUCKET, 'append/metrics.jsonl').splitlines()]
  assert steps == [1, 2, 3, 3, 4]
