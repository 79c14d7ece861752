"""Device prefetch: per-process host batches become global jax.Arrays a few steps ahead."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator

import jax
import numpy as np

from stop_jax.data import batch as batch_lib

_END = object()


def prefetch_to_device(
  iterator: Iterable[dict[str, np.ndarray]], shardings: dict, size: int = 2
) -> Iterator[dict[str, jax.Array]]:
  """Each per-process batch of `iterator` as global jax.Arrays, made `size` batches ahead.

  A background thread takes batches (dicts of numpy arrays, this process's rows) from
  `iterator` and turns each array into a global array with
  `jax.make_array_from_process_local_data(shardings[key], array)`, so the host-to-device copies
  of the next batches overlap the running step. Batches come out in order. An exception raised
  by `iterator` (or by the conversion) is raised here, at the batch where it happened.
  Closing the returned generator stops the thread.

  Args:
    iterator: yields {key: array [B_local, ...]} (for the trainer: create_train_iterator).
    shardings: {key: jax.sharding.Sharding} with an entry for every key of the batches.
    size: converted batches waiting at most (>= 1); the thread works on one more.
  Returns:
    A generator of {key: jax.Array of the global shape}.
  """
  if not isinstance(size, int) or isinstance(size, bool) or size < 1:
    raise ValueError(f'prefetch_to_device: size={size!r}, expected an int >= 1.')
  if not isinstance(shardings, dict) or not shardings:
    raise ValueError(f'prefetch_to_device: shardings={shardings!r}, expected a non-empty dict.')
  return _prefetch(iter(iterator), shardings, size)


def _prefetch(iterator, shardings, size):
  ready: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        ready.put(item, timeout=0.05)
        return True
      except queue.Full:
        pass
    return False

  def produce():
    try:
      for batch in iterator:
        arrays = batch_lib.to_global(batch, shardings)
        if not put((arrays, None)):
          return
      put((_END, None))
    except BaseException as e:  # Handed to the consumer, which re-raises it with its traceback.
      put((None, e))

  thread = threading.Thread(target=produce, name='prefetch_to_device', daemon=True)
  thread.start()
  try:
    while True:
      arrays, error = ready.get()
      if error is not None:
        raise error
      if arrays is _END:
        return
      yield arrays
  finally:
    stop.set()
    thread.join()
