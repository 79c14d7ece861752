"""Workdir files on a local disk, a shared filesystem or an object store (gs://, s3://, az://).

Every file of a run directory that our code writes or reads itself (config.json, plan.json,
metrics.jsonl, TensorBoard events, summary.json, exports, converted checkpoints, evaluation
results and feature caches) goes through this module; orbax writes the checkpoints and is
given the paths unchanged (`resolve` never turns `gs://b/x` into a local `./gs:/b/x`).

- Local paths (NFS, Lustre, ... included) use `os` and `open`, exactly as plain Python would.
  `write_*` writes a temporary file beside the target and renames it over the target, so a
  reader (another process, a resumed run) sees the old file or the new one, never half of one.
- Object stores go through `etils.epath`, the layer orbax uses, so both reach the store the
  same way: `tf.io.gfile` when TensorFlow is installed, else fsspec (`gcsfs` for gs://);
  `EPATH_USE_TF=false` picks fsspec even with TensorFlow (needed for GCS emulators, which
  `tf.io.gfile` does not reach). `write_*` is one upload of the whole object: the store shows
  the object only once the upload is complete, so it is atomic without a rename (renames on
  object stores are a copy and a delete, and are never used here).
- Object stores cannot append. `Appender` (metrics.jsonl) keeps the file's content in memory and
  rewrites the whole object on `sync()`; locally it appends and flushes every line.
"""

from __future__ import annotations

import contextlib
import glob as glob_lib
import json
import os
import uuid
from typing import Any

# The object stores of etils.epath that can be written (hf:// is read-only).
REMOTE_SCHEMES = ('gs://', 's3://', 'az://')


def is_remote(path: str) -> bool:
  """Whether `path` is an object-store URI; other '://' schemes are refused (clear error)."""
  path = os.fspath(path)
  if path.startswith(REMOTE_SCHEMES):
    return True
  if '://' in path:
    raise ValueError(
      f'path {path!r} is not supported: a local or shared-filesystem path, or one of '
      f'{", ".join(s + "BUCKET/..." for s in REMOTE_SCHEMES)}.'
    )
  return False


def resolve(path: str) -> str:
  """An absolute local path, or the URI itself without a trailing '/' (never os.path-mangled)."""
  path = os.fspath(path)
  if is_remote(path):
    scheme, rest = path.split('://', 1)
    return f'{scheme}://{rest.rstrip("/")}'
  return os.path.abspath(path)


def _epath(path: str):
  from etils import epath  # noqa: PLC0415 (only object stores need it)

  return epath.Path(path)


def _is_not_found(error: Exception) -> bool:
  # tf.io.gfile raises tf.errors.NotFoundError, which is not an OSError.
  return isinstance(error, FileNotFoundError) or type(error).__name__ == 'NotFoundError'


# --- queries --------------------------------------------------------------------------------


def exists(path: str) -> bool:
  if is_remote(path):
    return _epath(path).exists()
  return os.path.exists(path)


def isdir(path: str) -> bool:
  """A directory, or on an object store a prefix that holds at least one object."""
  if is_remote(path):
    return _epath(path).is_dir()
  return os.path.isdir(path)


def listdir(path: str) -> list[str]:
  """Names (not paths) in a directory, sorted. Raises FileNotFoundError naming the path."""
  if is_remote(path):
    p = _epath(path)
    if not p.is_dir():
      raise FileNotFoundError(f'no such directory: {path}')
    return sorted(child.name for child in p.iterdir())
  return sorted(os.listdir(path))


def glob(pattern: str) -> list[str]:
  """Paths matching a glob pattern (wildcards in the last part only on object stores), sorted."""
  if is_remote(pattern):
    directory, name = pattern.rsplit('/', 1)
    if not isdir(directory):
      return []
    return sorted(f'{directory}/{p.name}' for p in _epath(directory).glob(name))
  return sorted(glob_lib.glob(pattern))


# --- changes --------------------------------------------------------------------------------


def makedirs(path: str):
  """Creates a local directory and its parents; nothing on object stores (no directories)."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def remove(path: str, missing_ok: bool = False):
  """Deletes one file. Raises FileNotFoundError naming the path unless missing_ok."""
  try:
    if is_remote(path):
      _epath(path).unlink()
    else:
      os.remove(path)
  except Exception as e:
    if not _is_not_found(e):
      raise
    if not missing_ok:
      raise FileNotFoundError(f'no such file: {path}') from e


# --- whole files ----------------------------------------------------------------------------


def read_bytes(path: str) -> bytes:
  """The file's content. Raises FileNotFoundError naming the path."""
  try:
    if is_remote(path):
      return _epath(path).read_bytes()
    with open(path, 'rb') as f:
      return f.read()
  except Exception as e:
    if _is_not_found(e):
      raise FileNotFoundError(f'no such file: {path}') from e
    raise


def read_text(path: str) -> str:
  return read_bytes(path).decode('utf-8')


def read_json(path: str) -> Any:
  return json.loads(read_bytes(path))


def write_bytes(path: str, data: bytes):
  """Replaces the file with `data`, atomically (see the module docstring); makes local parents."""
  if is_remote(path):
    # One upload: the object appears whole or not at all. (tf.io.gfile takes only bytes.)
    _epath(path).write_bytes(data if isinstance(data, bytes) else bytes(data))
    return
  directory = os.path.dirname(path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  # Beside the target (same filesystem, so the rename is atomic), hidden, unique per writer.
  tmp = os.path.join(directory, f'.{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp')
  try:
    with open(tmp, 'wb') as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_text(path: str, text: str):
  write_bytes(path, text.encode('utf-8'))


def write_json(path: str, value: Any, **dumps_kwargs):
  """json.dumps(value, **dumps_kwargs) written atomically."""
  write_text(path, json.dumps(value, **dumps_kwargs))


# --- appending ------------------------------------------------------------------------------


class Appender:
  """Text added to the end of one file by one writer (metrics.jsonl).

  Locally the file is opened in append mode and every `write` is flushed at once, so a crash
  loses nothing written. An object store cannot append to an object: the file's content (what
  was there at open, as after a resume, then every write) is kept in memory and `sync()` uploads
  it whole, in one PUT, so the object always holds a complete prefix of the lines. A crash loses
  what was written since the last `sync()`; the writer calls it where the lines must be durable
  (before a checkpoint, at the end) and at most as often as it can afford to upload the file.
  """

  def __init__(self, path: str):
    self.path = path
    self.remote = is_remote(path)
    self._closed = False
    if self.remote:
      try:
        self._content = bytearray(read_bytes(path))
      except FileNotFoundError:
        self._content = bytearray()
      self._dirty = False
    else:
      directory = os.path.dirname(path)
      if directory:
        os.makedirs(directory, exist_ok=True)
      self._file = open(path, 'a')  # noqa: SIM115 (closed by close())

  @property
  def unsynced(self) -> bool:
    """Whether writes are held in memory only (object stores, before the next sync)."""
    return self.remote and self._dirty

  def write(self, text: str):
    if self._closed:
      raise ValueError(f'write to {self.path} after close()')
    if self.remote:
      self._content += text.encode('utf-8')
      self._dirty = True
    else:
      self._file.write(text)
      self._file.flush()

  def sync(self):
    """Makes every write so far durable (uploads the whole file on object stores)."""
    if self.remote and self._dirty:
      write_bytes(self.path, bytes(self._content))
      self._dirty = False

  def close(self):
    if self._closed:
      return
    if self.remote:
      self.sync()
    else:
      self._file.close()
    self._closed = True
