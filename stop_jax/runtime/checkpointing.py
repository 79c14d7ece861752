"""Orbax checkpoints of the whole run in `<workdir>/checkpoints`, and preemption handling.

Guarantees (tests/test_checkpointing.py and tests/test_fault_tolerance.py check each):
- Atomic: orbax writes a step into a temporary directory and renames it only when complete, so a
  save interrupted by a crash or `kill -9` never becomes a checkpoint; the previous one stays.
- Whole state: step, params, EMA target, optimiser state (the 'state' item), plus the data
  position, the step key and a fingerprint of the config (the 'meta' item). Every schedule, mask,
  StoP draw and batch is a function of the step, so resuming from step k recomputes exactly the
  run an uninterrupted job would have produced.
- Saves every `checkpoint.every_steps` steps and every `checkpoint.every_minutes` minutes
  (asynchronous: training goes on while the previous state is written); keeps the latest
  `checkpoint.keep` plus every step that is a multiple of `checkpoint.keep_every` for good.
- A corrupt or partial latest checkpoint is detected at restore and the previous one is used,
  with a warning; the damaged steps are moved aside (`<step>.damaged-<time>`, kept for
  inspection) so that the run saves them again when it gets there. A checkpoint of another
  model fails with the list of mismatched arrays.
- Restores onto any mesh: arrays are read straight into the shardings of the current mesh.
- Any workdir orbax reaches: a local or shared path, or an object store (gs://...). On object
  stores orbax marks a finished step with a commit_success.txt file instead of the rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from stop_jax.runtime import cli, fileio

STATE, META = 'state', 'meta'


class CheckpointMismatchError(cli.UserError, ValueError):
  """A checkpoint whose arrays do not match the model / config being restored into."""


class NoUsableCheckpointError(cli.UserError, RuntimeError):
  """Checkpoints exist in the workdir but none of them can be read."""


def _names(path) -> str:
  parts = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return '/'.join(parts)


def flat_shapes(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  """{'params/encoder/norm/scale': (shape, dtype)} for arrays, ShapeDtypeStructs or metadata."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_names(p): (tuple(x.shape), str(np.dtype(x.dtype))) for p, x in flat}


def describe_mismatch(saved: dict, expected: dict, limit: int = 20) -> list[str]:
  """Human-readable differences between two flat_shapes() dicts (dtype changes are allowed)."""
  lines = []

  # Params first: the optimiser's moments mirror them and would only repeat the story.
  def order(keys):
    return sorted(keys, key=lambda k: (not k.startswith('params/'), k))

  for k in order(expected.keys() - saved.keys()):
    lines.append(f'missing in checkpoint: {k} {list(expected[k][0])}')
  for k in order(saved.keys() - expected.keys()):
    lines.append(f'not in this model: {k} {list(saved[k][0])}')
  for k in order(saved.keys() & expected.keys()):
    if saved[k][0] != expected[k][0]:
      lines.append(f'shape of {k}: checkpoint {list(saved[k][0])}, model {list(expected[k][0])}')
  if len(lines) > limit:
    lines = lines[:limit] + [f'... and {len(lines) - limit} more']
  return lines


def _handlers() -> dict:
  # Registered up front so metadata can be read before restoring (shape checks, tools).
  return {STATE: ocp.StandardCheckpointHandler(), META: ocp.JsonCheckpointHandler()}


class Checkpointer:
  """Periodic, time-based, final and preemption saves of the train state; restore with fallback."""

  def __init__(self, workdir: str, config):
    c = config.checkpoint
    self.every_steps = c.every_steps
    self.every_seconds = 60.0 * c.every_minutes
    # The clock is read only at logging steps: with several hosts the decision is a broadcast,
    # and a collective on every step would sync the host with the devices each step.
    self.time_check_every = config.log_every_steps
    self.directory = fileio.resolve(os.path.join(workdir, 'checkpoints'))
    keep = [pp.LatestN(n=c.keep)]
    if c.keep_every > 0:
      keep.append(pp.EveryNSteps(c.keep_every))
    self.manager = ocp.CheckpointManager(
      self.directory,
      item_handlers=_handlers(),
      options=ocp.CheckpointManagerOptions(
        create=True,
        enable_async_checkpointing=True,
        preservation_policy=pp.AnyPreservationPolicy(keep),
      ),
    )
    self._last_save_time = time.monotonic()
    self.last_saved_step: int | None = self.manager.latest_step()

  # --- restore -------------------------------------------------------------------------------

  def restore_latest(self, abstract_state, shardings=None):
    """(state, meta) of the latest readable checkpoint placed on `shardings`, or None.

    Args:
      abstract_state: the state's ShapeDtypeStructs (with .sharding unless `shardings`).
      shardings: optional tree of shardings, overriding the abstract state's.
    Raises:
      CheckpointMismatchError: the checkpoint holds another model (lists the differences).
      NoUsableCheckpointError: checkpoints exist but none can be read.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      return None
    if shardings is not None:
      abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
      )
    expected = flat_shapes(abstract_state)
    errors = []
    for step in steps:
      try:
        metadata = self.manager.item_metadata(step)[STATE]
        if metadata is None:  # orbax returns None when the item's metadata file is missing
          raise FileNotFoundError('no metadata for the state item')
        saved = flat_shapes(metadata)
      except Exception as e:  # noqa: BLE001 (any unreadable metadata means a damaged step)
        errors.append(f'step {step}: unreadable metadata ({type(e).__name__}: {e})')
        logging.warning('checkpoint at step %d is unreadable (%s); trying an older one', step, e)
        continue
      diff = describe_mismatch(saved, expected)
      if diff:
        raise CheckpointMismatchError(
          f'the checkpoint at step {step} in {self.directory} does not match this model/config:\n  '
          + '\n  '.join(diff)
          + '\nUse another --workdir, or the config the run was started with.'
        )
      restored = None
      try:
        restored = self.manager.restore(
          step,
          args=ocp.args.Composite(
            **{STATE: ocp.args.StandardRestore(abstract_state), META: ocp.args.JsonRestore()}
          ),
        )
      except Exception as e:  # noqa: BLE001 (truncated files raise many different errors)
        errors.append(f'step {step}: {type(e).__name__}: {e}')
        logging.warning(
          'checkpoint at step %d is corrupt or partial (%s: %s); falling back to an older one',
          step,
          type(e).__name__,
          e,
        )
      # Each process reads only its own shards: a step counts as read when every process read
      # it, so all of them resume from the same step.
      if not _everywhere(restored is not None):
        if restored is not None:
          errors.append(f'step {step}: unreadable on another process')
        continue
      if step != steps[0]:
        logging.warning(
          'resuming from step %d, not from the damaged latest step %d', step, steps[0]
        )
        self._set_aside([s for s in steps if s > step])
      logging.info('resuming from checkpoint at step %d', step)
      self.last_saved_step = step
      return restored[STATE], dict(restored[META] or {})
    raise NoUsableCheckpointError(
      f'no readable checkpoint in {self.directory}:\n  ' + '\n  '.join(errors)
    )

  def _set_aside(self, steps: list[int]):
    """Moves the damaged `steps` out of orbax's sight, kept for inspection.

    Each `checkpoints/<step>` becomes `checkpoints/<step>.damaged-<UTC time>`, a name orbax
    never takes for a step: the run saves those steps again when it reaches them (orbax refuses
    to save over an existing step) and never falls back past them again. Process 0 moves them
    while the others wait (a barrier on both sides: every process has finished reading).
    """
    _barrier('stop_jax: damaged checkpoints read')
    if jax.process_index() == 0:
      stamp = time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())
      for step in steps:
        src = epath.Path(self.directory) / str(step)
        dst = epath.Path(self.directory) / f'{step}.damaged-{stamp}'
        move_tree(src, dst)
        logging.warning(
          'moved the damaged checkpoint of step %d aside to %s (kept for inspection; delete it '
          'when done); the run saves step %d again when it gets there',
          step,
          dst,
          step,
        )
    _barrier('stop_jax: damaged checkpoints moved')
    self.manager.reload()  # orbax caches the step list

  # --- save ----------------------------------------------------------------------------------

  def due(self, step: int, final: bool = False) -> bool:
    """Whether `step` should be saved: final, every N steps, or every M minutes.

    The time rule is checked at logging steps only, decided by process 0 and broadcast, so all
    hosts save the same steps.
    """
    if final:
      return True
    if self.every_steps > 0 and step % self.every_steps == 0:
      return True
    if self.every_seconds <= 0 or step % self.time_check_every:
      return False
    late = time.monotonic() - self._last_save_time >= self.every_seconds
    if jax.process_count() > 1:
      late = bool(multihost_utils.broadcast_one_to_all(np.int32(late)))
    return late

  def save(self, step: int, state, meta: dict):
    """Starts an asynchronous save of `state` at `step` (returns before the write finishes)."""
    if step == self.last_saved_step:
      return
    self.manager.save(
      step,
      args=ocp.args.Composite(
        **{STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}
      ),
      force=True,
    )
    self.last_saved_step = step
    self._last_save_time = time.monotonic()

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def _everywhere(ok: bool) -> bool:
  """Whether `ok` holds on every process (a collective when there are several)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.asarray(multihost_utils.process_allgather(np.int32(ok))).all())


def _barrier(name: str):
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def move_tree(src, dst):
  """Moves a directory: a rename on a filesystem; on an object store, where a rename is a copy
  and a delete, every object is copied (server side) through etils.epath (orbax's file layer),
  then the source is deleted, its commit_success.txt first (a move cut short leaves either the
  whole source or a step orbax no longer takes as finished, never a half step it restores)."""
  src, dst = epath.Path(src), epath.Path(dst)
  if not fileio.is_remote(os.fspath(src)):
    os.rename(src, dst)
    return
  for name, path in _files(src):
    path.copy(dst / name)
  marker = src / 'commit_success.txt'
  if marker.exists():
    marker.unlink()
  src.rmtree(missing_ok=True)


def _files(root) -> list[tuple[str, epath.Path]]:
  """(name relative to root, path) of every file under the epath directory `root`."""

  def bare(path) -> str:  # gcsfs walks without the scheme, tf.io.gfile with it
    return os.fspath(path).split('://', 1)[-1].rstrip('/')

  base, found = bare(root), []
  for directory, _, names in root.walk():
    sub = bare(directory)[len(base) :].strip('/')
    found += [(f'{sub}/{n}' if sub else n, root / sub / n if sub else root / n) for n in names]
  return found


def committed_steps(workdir: str) -> list[int]:
  """The finished checkpoint steps in `workdir/checkpoints`, sorted ([] if none); reads nothing
  but the listing (and, on object stores, the commit markers)."""
  directory = fileio.resolve(os.path.join(workdir, 'checkpoints'))
  if not fileio.isdir(directory):
    return []
  manager = ocp.CheckpointManager(
    directory, item_handlers=_handlers(), options=ocp.CheckpointManagerOptions(create=False)
  )
  try:
    return sorted(manager.all_steps())
  finally:
    manager.close()


def step_fingerprint(workdir: str, step: int) -> dict:
  """{'step', 'files', 'bytes', 'listing_sha256'} of `checkpoints/<step>`: its file names and
  sizes, hashed. Written into summary.json at the end of a run, so that a rerun can tell that
  the final checkpoint is still the one the summary describes (a truncated or deleted file
  changes it) without reading any array."""
  root = epath.Path(fileio.resolve(os.path.join(workdir, 'checkpoints'))) / str(step)
  listing = sorted((name, path.stat().length) for name, path in _files(root))
  digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
  total = sum(size for _, size in listing)
  return {'step': step, 'files': len(listing), 'bytes': total, 'listing_sha256': digest}


class PreemptionWatcher:
  """True at the step where every host should save and stop after a SIGTERM.

  Multi-process runs use JAX's preemption sync service (started by jax.distributed.initialize,
  which also catches SIGTERM): it agrees on the first step that every host can still reach. A
  single process catches SIGTERM itself and stops after the step in flight.
  """

  def __init__(self):
    self._flag = threading.Event()
    self._multi = jax.process_count() > 1
    self._previous = None
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint after the current step, then exiting')
    self._flag.set()

  def reached(self, step: int) -> bool:
    if self._multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._flag.is_set()

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def load_checkpoint(workdir: str, step: int | None = None) -> tuple[int, dict]:
  """Reads a run's checkpoint as plain host arrays, for tools (export, evaluation, notebooks).

  Works in a single process whatever mesh the run was saved from.

  Returns:
    (step, tree) where tree has the TrainState fields as keys: 'step', 'params' ({'encoder',
    'predictor'}), 'target_params', 'opt_state'.
  Raises:
    FileNotFoundError naming the directory when there is no such checkpoint.
  """
  directory = fileio.resolve(os.path.join(workdir, 'checkpoints'))
  if not fileio.isdir(directory):
    raise FileNotFoundError(f'no checkpoint in {directory}: train with --workdir={workdir} first.')
  manager = ocp.CheckpointManager(
    directory, item_handlers=_handlers(), options=ocp.CheckpointManagerOptions(create=False)
  )
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f'no checkpoint in {directory}: train with --workdir={workdir} first.')
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise FileNotFoundError(f'no checkpoint for step {step} in {directory}; have {sorted(steps)}.')
  # Read every array onto this process's first device, whatever topology saved it.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(
    lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
    manager.item_metadata(step)[STATE],
  )
  tree = manager.restore(
    step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(target)})
  )[STATE]
  manager.close()
  return step, jax.tree.map(np.asarray, tree)
