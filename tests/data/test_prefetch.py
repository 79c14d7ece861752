"""Device prefetch: values, order and sharding kept, runs ahead, errors raised in place."""

import itertools
import threading

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from stop_jax.data import prefetch


def _shardings(batch_keys):
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  return {k: NamedSharding(mesh, P('data')) for k in batch_keys}


def test_prefetch_to_device_keeps_values_order_and_sharding():
  batches = [
    {'image': np.full((8, 2, 2, 3), i, np.float32), 'ctx_idx': np.arange(8) + i} for i in range(5)
  ]
  shardings = _shardings(['image', 'ctx_idx'])
  out = list(prefetch.prefetch_to_device(iter(batches), shardings, size=2))
  assert len(out) == 5
  for want, got in zip(batches, out, strict=True):
    for k in want:
      assert isinstance(got[k], jax.Array) and got[k].sharding == shardings[k]
      np.testing.assert_array_equal(np.asarray(got[k]), want[k])


def test_prefetch_to_device_runs_ahead_and_propagates_errors():
  produced = []
  release = threading.Event()

  def source():
    for i in range(6):
      if i == 4:
        release.wait(5)
        raise RuntimeError('decoder exploded at batch 4')
      produced.append(i)
      yield {'image': np.full((8, 1), i, np.float32)}

  it = prefetch.prefetch_to_device(source(), _shardings(['image']), size=2)
  first = next(it)
  for _ in range(100):  # The producer runs ahead while the consumer holds batch 0.
    if len(produced) == 4:
      break
    threading.Event().wait(0.02)
  assert float(np.asarray(first['image'])[0, 0]) == 0 and len(produced) == 4
  release.set()
  assert [float(np.asarray(next(it)['image'])[0, 0]) for _ in range(3)] == [1, 2, 3]
  with pytest.raises(RuntimeError, match='exploded at batch 4'):
    next(it)


def test_prefetch_to_device_checks_arguments_and_stops_on_close():
  with pytest.raises(ValueError, match='size=0'):
    prefetch.prefetch_to_device(iter([]), _shardings(['image']), size=0)
  with pytest.raises(KeyError, match="no sharding for batch key\\(s\\) \\['ctx_idx'\\]"):
    next(
      prefetch.prefetch_to_device(
        iter([{'image': np.zeros((8, 1)), 'ctx_idx': np.zeros((8, 1))}]), _shardings(['image'])
      )
    )
  endless = ({'image': np.zeros((8, 1), np.float32)} for _ in itertools.count())
  it = prefetch.prefetch_to_device(endless, _shardings(['image']), size=1)
  next(it)
  it.close()
  assert not any(t.name == 'prefetch_to_device' and t.is_alive() for t in threading.enumerate())
