"""One sharded step from 1 device to data / FSDP / tensor meshes (8 simulated CPU devices)."""

import dataclasses
import itertools
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from stop_jax import config as config_lib
from stop_jax.runtime import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Runs in a fresh process: the device count is fixed when jax initialises.
WORKER = textwrap.dedent(
  """
  import json, os, sys
  flags = os.environ.get('XLA_FLAGS', '')  # the tests' flags (tests/subprocess_env.py), then:
  os.environ['XLA_FLAGS'] = flags + ' --xla_force_host_platform_device_count=8'
  import jax, numpy as np
  sys.path.insert(0, 'configs')
  from stop_jax.data import batch as batch_lib
  from stop_jax.data import train_stream
  from stop_jax.runtime import sharding
  from stop_jax.train import plan as plan_lib
  from stop_jax.train import setup
  from stop_jax.train import step as step_lib
  import tiny

  def config(mesh):
    c = tiny.get_config('steps=3')
    c.model.depth = 2
    c.predictor.depth = 1
    c.model.scan_blocks = True  # the big-model path: stacked [layers, ...] params
    c.data.global_batch_size = 16
    for k, v in mesh.items():
      c.mesh[k] = v
    return c

  meshes = {
    'single': ({'data': 1}, jax.devices()[:1]),
    'data8': ({'data': -1}, None),
    'data4_fsdp2': ({'data': 4, 'fsdp': 2}, None),
    'data2_fsdp2_tensor2': ({'data': 2, 'fsdp': 2, 'tensor': 2}, None),
  }
  out = {}
  for name, (mesh_cfg, devices) in meshes.items():
    c = config(mesh_cfg)
    plan = plan_lib.plan_run(c)
    mesh = sharding.make_mesh(c, devices)
    sharded = setup.make_sharded_step(c, mesh, plan.schedules)
    state = sharded.create(jax.random.key(0))
    rng = jax.device_put(jax.random.key(1), sharded.replicated)
    limits = jax.device_put(step_lib.step_limits(), sharded.replicated)  # none
    it = train_stream.create_train_iterator(c, plan.mask_spec, 0, 0, 1)
    step = sharded.compile(c, plan.mask_spec)
    losses = []
    for _ in range(3):
      batch = batch_lib.to_global(next(it), sharded.batch_shardings)
      state, metrics = step(state, batch, rng, limits)
      losses.append(float(metrics['loss']))
    qkv = state.params['encoder']['blocks']['layers']['attn']['qkv']['kernel']
    fc1 = state.params['encoder']['blocks']['layers']['fc1']['kernel']
    mu = [
      x for path, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
      if 'mu' in jax.tree_util.keystr(path) and "['qkv']['kernel']" in jax.tree_util.keystr(path)
    ][0]
    out[name] = {
      'losses': losses,
      'params': [np.asarray(x).ravel()[:64].tolist() for x in jax.tree.leaves(state.params)],
      'target': [np.asarray(x).ravel()[:64].tolist() for x in jax.tree.leaves(state.target_params)],
      'qkv_spec': str(qkv.sharding.spec),
      'qkv_shard': list(qkv.addressable_shards[0].data.shape),
      'fc1_spec': str(fc1.sharding.spec),
      'mu_spec': str(mu.sharding.spec),
      'image_spec': str(batch['image'].sharding.spec),
    }
    # The StoP noise the predictor draws for this batch, inside a jit sharded like the step.
    def noise_of(params, ctx, ctx_idx, tgt_idx, key):
      with sharding.activation_sharding(mesh):
        _, aux = sharded.predictor.apply(
          {'params': params}, ctx, ctx_idx, tgt_idx, rngs={'stop': key}, mutable=['intermediates']
        )
      return aux['intermediates']['noise'][0]
    ctx = jax.device_put(
      np.ones((16, batch['ctx_idx'].shape[1], 64), np.float32),
      jax.sharding.NamedSharding(mesh, sharding.batch_spec(0, 3)),
    )
    noise = jax.jit(noise_of)(
      state.params['predictor'], ctx, batch['ctx_idx'], batch['tgt_idx'], rng
    )
    again = jax.jit(noise_of)(
      state.params['predictor'], ctx, batch['ctx_idx'], batch['tgt_idx'], rng
    )
    out[name]['noise'] = np.asarray(noise)[:, :, :2, :4].tolist()  # [n, B, 2, 4]
    out[name]['noise_repeat_equal'] = bool(np.array_equal(noise, again))
    out[name]['noise_sharding'] = str(noise.sharding.spec)
  print('RESULT ' + json.dumps(out))
  """
)


@pytest.fixture(scope='module')
def mesh_results():
  proc = subprocess.run(
    [sys.executable, '-c', WORKER], cwd=ROOT, capture_output=True, text=True, timeout=1200
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [x for x in proc.stdout.splitlines() if x.startswith('RESULT ')][-1]
  return json.loads(line[len('RESULT ') :])


@pytest.mark.slow
@pytest.mark.parametrize('name', ['data8', 'data4_fsdp2', 'data2_fsdp2_tensor2'])
def test_meshes_agree_with_one_device(mesh_results, name):
  ref, got = mesh_results['single'], mesh_results[name]
  np.testing.assert_allclose(got['losses'], ref['losses'], rtol=2e-5)
  assert ref['losses'][0] != ref['losses'][2]  # the params did move
  for a, b in zip(got['params'], ref['params'], strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  for a, b in zip(got['target'], ref['target'], strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_shardings_follow_the_rules(mesh_results):
  # Scanned qkv kernel [layers, D=64, 3D=192]: 'embed' -> fsdp, 'heads' -> tensor.
  assert mesh_results['data8']['qkv_spec'] == str(P(None, None, None))
  assert mesh_results['data4_fsdp2']['qkv_spec'] == str(P(None, 'fsdp', None))
  assert mesh_results['data4_fsdp2']['qkv_shard'] == [2, 32, 192]
  assert mesh_results['data4_fsdp2']['mu_spec'] == str(P(None, 'fsdp', None))  # Adam's moment
  assert mesh_results['data2_fsdp2_tensor2']['qkv_spec'] == str(P(None, 'fsdp', 'tensor'))
  assert mesh_results['data2_fsdp2_tensor2']['qkv_shard'] == [2, 32, 96]
  assert mesh_results['data2_fsdp2_tensor2']['fc1_spec'] == str(P(None, 'fsdp', 'tensor'))
  assert mesh_results['data4_fsdp2']['image_spec'] == str(P(('data', 'fsdp'), None, None, None))


@pytest.mark.slow
def test_stop_noise_is_per_example_and_reproducible(mesh_results):
  single = np.asarray(mesh_results['single']['noise'])  # [n, B, 2, 4]
  for name in ('data8', 'data4_fsdp2', 'data2_fsdp2_tensor2'):
    got = mesh_results[name]
    assert got['noise_repeat_equal']
    # The same key gives the same noise whatever the mesh (no per-device key reuse or drift).
    np.testing.assert_array_equal(np.asarray(got['noise']), single)
  assert mesh_results['data8']['noise_sharding'] != str(P())  # really computed sharded
  flat = single.reshape(-1, single.shape[-1])
  # Every (target block, example, token) slot got its own draw: no two rows alike, i.e. no
  # replication across the 8 devices' examples or across target blocks.
  assert len({tuple(r) for r in flat.round(6).tolist()}) == len(flat)
  assert abs(float(single.std()) - 0.25) < 0.1  # sigma = 0.25 in the tiny config


def _mesh(shape):
  # A fake mesh: only .shape is read by the rule resolution.
  class FakeMesh:
    pass

  m = FakeMesh()
  m.shape = dict(zip(sharding.MESH_AXES, shape, strict=True))
  return m


def test_logical_to_spec_rules():
  m = _mesh((2, 4, 2))
  assert sharding.logical_to_spec(('embed', 'mlp'), (64, 256), m) == P('fsdp', 'tensor')
  # Dims that do not divide stay unsharded rather than failing.
  assert sharding.logical_to_spec(('embed', 'mlp'), (6, 256), m) == P(None, 'tensor')
  assert sharding.logical_to_spec((None, None, None, 'embed'), (4, 4, 3, 64), m) == P(
    None, None, None, 'fsdp'
  )
  # Batch spans data x fsdp; an axis of size 1 is dropped.
  assert sharding.logical_to_spec(('batch', 'length'), (16, 5), m) == P(('data', 'fsdp'), None)
  assert sharding.logical_to_spec(('batch',), (16,), _mesh((8, 1, 1))) == P('data')
  # A mesh axis is used at most once per array.
  assert sharding.logical_to_spec(('embed', 'embed'), (64, 64), m) == P('fsdp', None)


def test_mesh_shape_resolves_the_rest():
  c = config_lib.base_config()
  c.mesh.data, c.mesh.fsdp = -1, 4
  assert sharding.mesh_shape(c, 64) == (16, 4, 1)
  c.mesh.data, c.mesh.fsdp = 2, -1
  assert sharding.mesh_shape(c, 64) == (2, 32, 1)
  with pytest.raises(sharding.MeshError, match='needs 2 devices'):
    c.mesh.data, c.mesh.fsdp = 2, 1
    sharding.mesh_shape(c, 64)


def test_bytes_per_device_counts_shards():
  mesh = jax.make_mesh((1,), ('data',))
  x = jax.ShapeDtypeStruct((8, 4), np.float32)
  sh = jax.sharding.NamedSharding(mesh, P())
  assert sharding.bytes_per_device([x], [sh]) == 8 * 4 * 4


# --- Multislice: the hybrid (ICI x DCN) mesh -----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FakeTpu:
  """What JAX's mesh builders read of a TPU v4 chip (the physical-torus code runs for real)."""

  id: int
  slice_index: int
  process_index: int
  coords: tuple
  core_on_chip: int = 0
  platform: str = 'tpu'
  device_kind: str = 'TPU v4'


@dataclasses.dataclass(frozen=True)
class FakeCpu:
  id: int
  process_index: int
  platform: str = 'cpu'
  device_kind: str = 'cpu'


def _tpu_slices(num_slices: int) -> list[FakeTpu]:
  """num_slices slices of 2x2x2 chips, 4 chips per host."""
  grid = list(itertools.product(range(2), range(2), range(2)))
  return [
    FakeTpu(s * 8 + i, s, s * 2 + i // 4, (x, y, z))
    for s in range(num_slices)
    for i, (z, y, x) in enumerate(grid)
  ]


def _mesh_config(**mesh):
  c = config_lib.base_config()
  for k, v in mesh.items():
    c.mesh[k] = v
  return c


def _slice_of(array, attr='slice_index'):
  return np.vectorize(lambda d: getattr(d, attr))(array)


def test_dcn_axes_split_the_mesh_over_slices():
  c = _mesh_config(data=-1, fsdp=4, dcn_data=2)
  assert sharding.split_over_slices(c, 64, 2) == ((8, 4, 1), (2, 1, 1))
  c = _mesh_config(data=2, fsdp=-1, dcn_fsdp=4)
  assert sharding.split_over_slices(c, 64, 4) == ((2, 8, 1), (1, 4, 1))  # fsdp 32 = 4 x 8
  with pytest.raises(sharding.MeshError, match=r'dcn_data x dcn_fsdp = 2 x 1 = 2 .* span 4'):
    sharding.split_over_slices(_mesh_config(dcn_data=2), 64, 4)
  with pytest.raises(
    sharding.MeshError, match=r'mesh.dcn_fsdp=3 is not allowed: it must divide mesh.fsdp=4'
  ):
    sharding.split_over_slices(_mesh_config(data=-1, fsdp=4, dcn_fsdp=3), 48)
  with pytest.raises(sharding.MeshError, match=r'mesh.dcn_data=-1 is not allowed: a positive'):
    sharding.dcn_shape(_mesh_config(dcn_data=-1))


@pytest.mark.parametrize(
  'mesh, match',
  [
    ({'dcn_data': 0}, r'config.mesh.dcn_data=0 is not allowed: a positive number of slices'),
    ({'dcn_fsdp': -1}, r'config.mesh.dcn_fsdp=-1 is not allowed'),
    ({'data': 4, 'fsdp': 2, 'dcn_data': 3}, r'mesh.dcn_data=3 is not allowed: it must divide'),
  ],
)
def test_bad_dcn_axes_fail_validation(mesh, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(_mesh_config(**mesh), num_devices=8)


def test_hybrid_mesh_keeps_each_slice_on_its_own_block_of_the_dcn_axis():
  devices = _tpu_slices(2)
  array = sharding.device_array(_mesh_config(data=4, fsdp=2, tensor=2, dcn_data=2), devices)
  assert array.shape == (4, 2, 2)
  # data is slice-major: rows 0-1 are slice 0, rows 2-3 slice 1; fsdp and tensor never cross.
  np.testing.assert_array_equal(_slice_of(array)[:, 0, 0], [0, 0, 1, 1])
  assert (_slice_of(array) == _slice_of(array)[:, :1, :1]).all()
  assert sorted(d.id for d in array.ravel()) == list(range(16))
  # Over fsdp instead: each data row holds both slices, fsdp blocks of 4 per slice.
  array = sharding.device_array(_mesh_config(data=2, fsdp=8, dcn_fsdp=2), devices)
  np.testing.assert_array_equal(_slice_of(array)[:, :, 0], [[0] * 4 + [1] * 4] * 2)


def test_multislice_devices_need_dcn_axes_that_multiply_to_the_slice_count():
  devices = _tpu_slices(2)
  with pytest.raises(sharding.MeshError, match=r'= 1 is not allowed: .* span 2 \(2 distinct'):
    sharding.device_array(_mesh_config(), devices)
  with pytest.raises(sharding.MeshError, match=r'= 4 is not allowed: .* span 2'):
    sharding.device_array(_mesh_config(data=4, fsdp=4, dcn_data=2, dcn_fsdp=2), devices)


def test_one_slice_is_what_jax_make_mesh_builds():
  devices = _tpu_slices(1)
  c = _mesh_config(data=2, fsdp=2, tensor=2)
  expected = jax.make_mesh((2, 2, 2), sharding.MESH_AXES, devices=devices).devices
  np.testing.assert_array_equal(sharding.device_array(c, devices), expected)
  assert sharding.data_mesh(devices).devices.shape == (8,)


def test_without_slice_index_each_process_is_a_slice():
  cpus = [FakeCpu(i, i // 2) for i in range(4)]  # two processes of two devices
  assert sharding.find_slices(cpus) == sharding.Slices(
    2, True, '2 process(es): cpu devices have no slice_index, so each process counts as one slice'
  )
  array = sharding.device_array(_mesh_config(data=2, fsdp=2, dcn_data=2), cpus)
  np.testing.assert_array_equal(_slice_of(array, 'process_index')[:, :, 0], [[0, 0], [1, 1]])
  # dcn axes of 1: the mesh is one block, as before multislice.
  assert sharding.device_array(_mesh_config(data=2, fsdp=2), cpus).shape == (2, 2, 1)


def test_data_mesh_spans_tpu_slices_slice_by_slice():
  mesh = sharding.data_mesh(_tpu_slices(2))
  assert mesh.axis_names == ('data',)
  np.testing.assert_array_equal(_slice_of(mesh.devices), [0] * 8 + [1] * 8)


def test_slices_of_unequal_size_are_refused():
  cpus = [FakeCpu(i, 0 if i < 3 else 1) for i in range(4)]  # 3 + 1 devices
  with pytest.raises(sharding.MeshError, match=r'devices per slice \(process_index: count\)'):
    sharding.device_array(_mesh_config(data=2, fsdp=2, dcn_data=2), cpus)
