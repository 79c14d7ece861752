"""A real GCS emulator server on localhost (the `gcp-storage-emulator` package), for the tests.

`Emulator()` starts the gcp-storage-emulator server on a free port of 127.0.0.1 (in memory) and
talks to it over its HTTP JSON API (`create_bucket`, `names`, `read`, `download`), independently
of the code under test. `env()` is what a process needs so that every storage layer we use
reaches the emulator and nothing else (README, "Workdirs on GCS"):

- STORAGE_EMULATOR_HOST: gcsfs (etils.epath's gs:// backend without TensorFlow) and
  google-cloud-storage (orbax lists steps with it);
- TENSORSTORE_GCS_HTTP_URL: TensorStore, which writes orbax's arrays;
- EPATH_USE_TF=false: tf.io.gfile ignores emulators and calls the real endpoint;
- GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false: gcsfs's gRPC bucket-type probe waits 60 s per call on
  an HTTP-only emulator before falling back;
- anonymous credentials (FSSPEC_GCS's token=anon, GOOGLE_AUTH_TOKEN_FOR_TESTING for TensorStore,
  GOOGLE_CLOUD_PROJECT) and the metadata-server variables pointed at a closed local port, so no
  library looks for a GCE metadata server off this machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

_CLOSED_LOCAL_PORT = '127.0.0.1:1'

# The emulator's object reads lack two things real GCS does, which TensorStore relies on to
# read OCDBT manifests back (orbax's array format): the `x-goog-generation` response header
# (without it: "Malformed StorageGeneration") and the ifGenerationNotMatch / ifGenerationMatch
# read preconditions (304 / 412). This adds both to its download handler, then runs its own
# command line unchanged.
_SERVER = """
import sys
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
  except Exception:  # NotFound: the original handler answers 404
    return _download(request, response, storage, *args, **kwargs)
  generation = str(obj['generation'])
  query = request.query
  if query.get('ifGenerationNotMatch', [None])[0] == generation:
    response.status = objects.HTTPStatus.NOT_MODIFIED
    return None
  if query.get('ifGenerationMatch', [generation])[0] != generation:
    response.status = objects.HTTPStatus.PRECONDITION_FAILED
    return None
  response['x-goog-generation'] = generation
  response['x-goog-metageneration'] = str(obj.get('metageneration', '1'))
  return _download(request, response, storage, *args, **kwargs)


objects.download = download  # before the server module builds its routing table
from gcp_storage_emulator.__main__ import main  # noqa: E402

sys.exit(main())  # its arguments: sys.argv[1:], read when main was defined
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class Emulator:
  """A gcp-storage-emulator process on 127.0.0.1; stop() ends it."""

  def __init__(self, log_path: str | None = None, timeout_s: float = 60.0):
    self.port = _free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self._log = open(log_path or os.devnull, 'w')  # noqa: SIM115 (closed by stop())
    self._proc = subprocess.Popen(
      [sys.executable, '-c', _SERVER, 'start', '--host', '127.0.0.1']
      + ['--port', str(self.port), '--in-memory'],
      stdout=self._log,
      stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + timeout_s
    while True:
      try:
        self._request('GET', '/storage/v1/b?project=test')
        return
      except (urllib.error.URLError, ConnectionError):
        if self._proc.poll() is not None or time.monotonic() > deadline:
          self.stop()
          raise RuntimeError(f'the GCS emulator did not start on {self.url}') from None
        time.sleep(0.1)

  def _request(self, method: str, path: str, body: dict | None = None) -> bytes:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(self.url + path, data=data, method=method)
    if data is not None:
      request.add_header('Content-Type', 'application/json')
    with urllib.request.urlopen(request, timeout=30) as response:
      return response.read()

  def create_bucket(self, name: str):
    self._request('POST', '/storage/v1/b?project=test', {'name': name})

  def names(self, bucket: str, prefix: str = '') -> list[str]:
    """Every object name under `prefix`, sorted (the JSON API's list, page by page)."""
    out, token = [], None
    while True:
      query = {'prefix': prefix, **({'pageToken': token} if token else {})}
      page = json.loads(
        self._request('GET', f'/storage/v1/b/{bucket}/o?{urllib.parse.urlencode(query)}')
      )
      out += [item['name'] for item in page.get('items', [])]
      token = page.get('nextPageToken')
      if not token:
        return sorted(out)

  def read(self, bucket: str, name: str) -> bytes:
    quoted = urllib.parse.quote(name, safe='')
    return self._request('GET', f'/download/storage/v1/b/{bucket}/o/{quoted}?alt=media')

  def download(self, bucket: str, prefix: str, dest: str) -> list[str]:
    """Copies every object under `prefix/` to the same relative path under dest; the names."""
    names = self.names(bucket, prefix.rstrip('/') + '/')
    for name in names:
      relative = name[len(prefix.rstrip('/')) + 1 :]
      if not relative or relative.endswith('/'):  # a directory placeholder object
        continue
      path = os.path.join(dest, relative)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, 'wb') as f:
        f.write(self.read(bucket, name))
    return names

  def env(self) -> dict[str, str]:
    return {
      'STORAGE_EMULATOR_HOST': self.url,
      'TENSORSTORE_GCS_HTTP_URL': self.url,
      'EPATH_USE_TF': 'false',
      'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
      # No listings cache: another process's writes are seen at once (as with tf.io.gfile).
      'FSSPEC_GCS': json.dumps({'token': 'anon', 'use_listings_cache': False}),
      'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',
      'GOOGLE_CLOUD_PROJECT': 'test',
      'GCE_METADATA_HOST': _CLOSED_LOCAL_PORT,
      'GCE_METADATA_IP': _CLOSED_LOCAL_PORT,
      'GCE_METADATA_ROOT': _CLOSED_LOCAL_PORT,
    }

  def stop(self):
    if self._proc.poll() is None:
      self._proc.terminate()
      try:
        self._proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self._proc.kill()
        self._proc.wait()
    self._log.close()


@contextlib.contextmanager
def in_this_process(emulator: Emulator):
  """Points this process's gs:// layers at `emulator` for the duration (then restores them).

  gcsfs reads GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT when it is first imported, so this must come
  before anything imports gcsfs; fsspec read its FSSPEC_* variables when it was imported, so
  its config is patched directly; etils.epath caches its EPATH_USE_TF decision at the first
  path it sees (orbax's, in an earlier test), so that cache is cleared on the way in and out.
  """
  import pytest  # noqa: PLC0415
  from etils.epath import gpath  # noqa: PLC0415

  with pytest.MonkeyPatch.context() as mp:
    for key, value in emulator.env().items():
      mp.setenv(key, value)
    import fsspec.config  # noqa: PLC0415

    mp.setitem(fsspec.config.conf, 'gcs', json.loads(emulator.env()['FSSPEC_GCS']))
    import gcsfs  # noqa: PLC0415

    if gcsfs.GCSFileSystem is not gcsfs.core.GCSFileSystem:
      raise RuntimeError(
        'gcsfs was imported before GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false was set: its gRPC '
        'probe would stall every call on the emulator.'
      )
    gpath._is_tf_installed.cache_clear()
    try:
      yield emulator
    finally:
      gpath._is_tf_installed.cache_clear()
