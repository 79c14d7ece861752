"""Checkpoint guarantees checked in-process: non-finite guard, fallback, refusals, retention.

Each module fixture is one short `train_and_evaluate` on the tiny digits config; the tests read
what it left in its workdir (copies, when a test damages or extends it). The kill -9, SIGTERM
and 8 -> 4 device scenarios run `python -m stop_jax.main` in tests/train/test_fault_tolerance.py.
"""

import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from stop_jax import config as config_lib
from stop_jax.data import train_stream
from stop_jax.runtime import checkpointing, compiler, sharding
from stop_jax.train import guard, loop, setup
from stop_jax.train import plan as plan_lib
from stop_jax.train import workdir as workdir_lib

# Keys the runs below differ in that never reach the step (run control only).
RUN_CONTROL = (
  'total_steps',
  'log_every_steps',
  'checkpoint',
  'eval',
  'on_nonfinite',
  'max_consecutive_skips',
)


@pytest.fixture(scope='module', autouse=True)
def build_and_compile_each_step_once():
  """The runs here differ in run-control keys only: their sharded steps (with the jitted state
  init) are built once per model config and mesh, and each step program (keyed by its HLO text
  and compile options) is compiled once. Compiling is most of a short run's time."""
  steps, programs = {}, {}
  make_sharded_step = setup.make_sharded_step

  def build_once(config, mesh, schedules):
    model = {k: v for k, v in config.to_dict().items() if k not in RUN_CONTROL}
    key = (repr(sorted(model.items())), tuple(mesh.devices.flat), mesh.axis_names, schedules)
    if key not in steps:
      steps[key] = make_sharded_step(config, mesh, schedules)
    return steps[key]

  def compile_once(sharded, config, mask_spec):
    lowered = sharded.lower(config, mask_spec)
    key = (lowered.as_text(), config.xla_cpu_matmul)
    if key not in programs:
      programs[key] = compiler.compile_lowered(lowered, config.xla_cpu_matmul)
    return programs[key]

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(setup, 'make_sharded_step', build_once)
    mp.setattr(setup.ShardedStep, 'compile', compile_once)
    yield


def _config(steps: int, **checkpoint):
  c = config_lib.load_config_file('tiny.py', f'steps={steps}')
  c.model.depth, c.predictor.depth = 2, 1  # keep CI fast; the step code is the same
  c.data.global_batch_size = 32
  c.log_every_steps = 1
  c.eval.probe = False
  c.checkpoint.every_minutes = 0.0
  for k, v in checkpoint.items():
    c.checkpoint[k] = v
  return c


def _nan_iterator(at_steps):
  """create_train_iterator whose batch of each step in `at_steps` (1-based, as logged) has a NaN."""
  real = train_stream.create_train_iterator

  def create(config, mask_spec, start_step=0, **kwargs):
    batches = real(config, mask_spec, start_step=start_step, **kwargs)

    def gen():
      for done, batch in enumerate(batches, start_step + 1):
        if done in at_steps:
          image = np.array(batch['image'])
          image[0, 0, 0, 0] = np.nan
          batch = {**batch, 'image': image}
        yield batch

    return gen()

  return create


def _train(config, workdir, nan_at=()):
  with pytest.MonkeyPatch.context() as mp:
    if nan_at:
      mp.setattr(train_stream, 'create_train_iterator', _nan_iterator(set(nan_at)))
    return loop.train_and_evaluate(config, str(workdir))


def _steps(workdir) -> list[int]:
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit())


def _losses(workdir) -> dict[int, float]:
  """{step: loss}; every line strict JSON (a non-finite loss is the string "NaN")."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line, parse_constant=_reject) for line in f]
  return {x['step']: float(x['loss']) for x in rows if 'loss' in x}


def _reject(name):
  raise AssertionError(f'metrics.jsonl holds the non-JSON constant {name}')


def _all_finite(tree) -> bool:
  return all(np.isfinite(x).all() for x in jax.tree.leaves(tree) if np.issubdtype(x.dtype, float))


def _assert_trees_equal(a, b):
  flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
  flat_b = jax.tree_util.tree_leaves(b)
  assert len(flat_a) == len(flat_b) > 0
  for (path, x), y in zip(flat_a, flat_b, strict=True):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def _abstract_state(config):
  plan = plan_lib.plan_run(config)
  return setup.make_sharded_step(config, sharding.make_mesh(config), plan.schedules).abstract_state


# --- non-finite loss or gradients ----------------------------------------------------------------


@pytest.fixture(scope='module')
def nan_stop(tmp_path_factory):
  """8 steps, saving every 3; a NaN image in the batch of step 5 (not a save step)."""
  workdir = tmp_path_factory.mktemp('nan_stop')
  with pytest.raises(guard.NonFiniteError) as info:
    _train(_config(8, every_steps=3), workdir, nan_at=[5])
  return workdir, str(info.value)


def test_nan_stops_naming_the_step_and_the_last_good_checkpoint(nan_stop):
  workdir, message = nan_stop
  ckpt_dir = os.path.abspath(os.path.join(workdir, 'checkpoints'))
  assert 'non-finite loss or gradients at step 5' in message
  assert f'the last good checkpoint is step 3 in {ckpt_dir}' in message
  assert 'config.on_nonfinite=stop' in message
  assert 'The update was not applied' in message
  # Checked one step late, but before any later save: step 6 (a save step) was never written.
  assert _steps(workdir) == [3]


def test_nan_leaves_the_last_good_checkpoint_intact(nan_stop):
  workdir, _ = nan_stop
  step, tree = checkpointing.load_checkpoint(str(workdir))
  assert step == 3 and int(tree['step']) == 3
  assert _all_finite(tree)
  losses = _losses(workdir)
  assert all(np.isfinite(losses[s]) for s in range(1, 5))


@pytest.fixture(scope='module')
def nan_skip(tmp_path_factory):
  """8 steps in 'skip' mode, saving every step; a NaN image in the batch of step 6."""
  workdir = tmp_path_factory.mktemp('nan_skip')
  config = _config(8, every_steps=1, keep=10)
  config.on_nonfinite = 'skip'
  config.max_consecutive_skips = 2
  summary = _train(config, workdir, nan_at=[6])
  return workdir, summary


def test_skip_mode_finishes_and_counts_the_skipped_step(nan_skip):
  workdir, summary = nan_skip
  assert summary['steps'] == 8 and 'preempted' not in summary
  assert summary['nonfinite_skipped'] == 1
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, 9))
  assert [s for s, x in losses.items() if not np.isfinite(x)] == [6]
  step, tree = checkpointing.load_checkpoint(str(workdir))
  assert step == 8 and _all_finite(tree)  # params, EMA target and optimiser state


def test_skip_mode_drops_the_bad_update(nan_skip):
  workdir, _ = nan_skip
  _, before = checkpointing.load_checkpoint(str(workdir), step=5)
  _, after = checkpointing.load_checkpoint(str(workdir), step=6)
  _, next_ = checkpointing.load_checkpoint(str(workdir), step=7)
  assert int(after['step']) == 6  # the step count advances ...
  for key in ('params', 'target_params'):  # ... but the weights did not move,
    _assert_trees_equal(after[key], before[key])
  _assert_trees_equal(after['opt_state']['inner_state'], before['opt_state']['inner_state'])
  params_6 = jax.tree.leaves(after['params'])
  params_7 = jax.tree.leaves(next_['params'])
  assert any(not np.array_equal(a, b) for a, b in zip(params_6, params_7, strict=True))
  # The skip count is part of the checkpoint, so a resumed run keeps counting.
  _, meta = _restore(workdir, _config(8))
  assert meta['nonfinite_skipped'] == 1


def test_skip_mode_stops_after_max_consecutive_skips(tmp_path):
  config = _config(6, every_steps=2)
  config.on_nonfinite = 'skip'
  config.max_consecutive_skips = 2
  with pytest.raises(guard.NonFiniteError, match='2 consecutive skipped steps') as info:
    _train(config, tmp_path, nan_at=[3, 4])
  assert 'at step 4' in str(info.value)
  assert 'the last good checkpoint is step 2' in str(info.value)
  assert _steps(tmp_path) == [2]


# --- corrupt checkpoints, other models, other configs ---------------------------------------------


@pytest.fixture(scope='module')
def two_checkpoints(tmp_path_factory):
  """4 steps saving every 2: checkpoints at steps 2 and 4."""
  workdir = tmp_path_factory.mktemp('two_checkpoints')
  _train(_config(4, every_steps=2), workdir)
  assert _steps(workdir) == [2, 4]
  return workdir


def _copy(src, tmp_path):
  dst = tmp_path / 'run'
  shutil.copytree(src, dst)
  return dst


def _truncate_array_data(step_dir):
  """Every array data file of the step cut to half its length (a copy that died midway)."""
  cut = 0
  for root, _, files in os.walk(os.path.join(step_dir, 'state')):
    if os.path.basename(root) == 'd':
      for name in files:
        path = os.path.join(root, name)
        with open(path, 'r+b') as f:
          f.truncate(os.path.getsize(path) // 2)
        cut += 1
  assert cut > 0, f'no array data files found under {step_dir}'


def _delete_metadata(step_dir):
  os.remove(os.path.join(step_dir, 'state', '_METADATA'))


def _restore(workdir, config):
  """Checkpointer(workdir, config).restore_latest onto this process's mesh."""
  ckpt = checkpointing.Checkpointer(str(workdir), config)
  try:
    return ckpt.restore_latest(_abstract_state(config))
  finally:
    ckpt.close()


# Orbax's failed reads of truncated files leave 'Event loop is closed' noise behind.
QUIET_FAILED_READS = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


@QUIET_FAILED_READS
@pytest.mark.parametrize(
  'damage', [_truncate_array_data, _delete_metadata], ids=['truncated_arrays', 'deleted_metadata']
)
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(
  two_checkpoints, tmp_path, caplog, damage
):
  workdir = _copy(two_checkpoints, tmp_path)
  damage(os.path.join(workdir, 'checkpoints', '4'))
  with caplog.at_level(logging.WARNING):
    try:
      state, meta = _restore(workdir, _config(4, every_steps=2))
    except checkpointing.CheckpointMismatchError as e:
      pytest.fail(
        f'the damaged step 4 ({damage.__name__}) was taken for another model instead of '
        f'falling back to step 2:\n{str(e)[:400]}'
      )
  assert int(state.step) == 2 and meta['step'] == 2
  _, expected = checkpointing.load_checkpoint(str(two_checkpoints), step=2)
  _assert_trees_equal(state.params, expected['params'])
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any('checkpoint at step 4 is' in w for w in warnings), warnings
  assert any('resuming from step 2, not from the damaged latest step 4' in w for w in warnings)


@QUIET_FAILED_READS
def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(two_checkpoints, tmp_path):
  workdir = _copy(two_checkpoints, tmp_path)
  for step in ('2', '4'):
    _truncate_array_data(os.path.join(workdir, 'checkpoints', step))
  with pytest.raises(checkpointing.NoUsableCheckpointError, match='no readable checkpoint'):
    _restore(workdir, _config(4, every_steps=2))


@QUIET_FAILED_READS
@pytest.mark.parametrize(
  'change, expected_line, num_lines',
  [
    # One more encoder block: its 12 arrays are missing from params, EMA target, Adam mu and nu.
    (
      {'model.depth': 3},
      'missing in checkpoint: opt_state/inner_state/0/0/mu/encoder/blocks/layers_2/fc1/kernel '
      '[64, 256]',
      48,
    ),
    # A wider predictor: same keys, other shapes.
    (
      {'predictor.width': 96},
      'shape of params/predictor/predictor_embed/kernel: checkpoint [64, 64], model [64, 96]',
      None,
    ),
  ],
  ids=['extra_encoder_block', 'wider_predictor'],
)
def test_checkpoint_of_another_model_lists_the_mismatched_arrays(
  two_checkpoints, change, expected_line, num_lines
):
  other = _config(4, every_steps=2)
  for key, value in change.items():
    group, name = key.split('.')
    other[group][name] = value
  with pytest.raises(checkpointing.CheckpointMismatchError) as info:
    _restore(two_checkpoints, other)
  message = str(info.value)
  assert 'the checkpoint at step 4' in message and 'does not match this model/config' in message
  lines = message.splitlines()
  if num_lines is not None:
    # 20 listed, the rest counted.
    assert f'  ... and {num_lines - 20} more' in lines
  if expected_line.startswith('missing'):
    assert '  ' + expected_line in lines, message
  else:
    # Shape changes are listed too (possibly past the first 20, hence the full listing).
    saved = checkpointing.flat_shapes(checkpointing.load_checkpoint(str(two_checkpoints))[1])
    full = checkpointing.describe_mismatch(
      saved, checkpointing.flat_shapes(_abstract_state(other)), 10**6
    )
    assert expected_line in full
    assert all(line.startswith('shape of ') for line in full)
    assert lines[1] == '  ' + full[0]


def test_workdir_with_another_config_is_refused_listing_the_changes(two_checkpoints, tmp_path):
  workdir = _copy(two_checkpoints, tmp_path)
  config = _config(4, every_steps=2)
  config.optim.lr = 2e-3
  config.stop.sigma = 0.5
  with pytest.raises(config_lib.ConfigError) as info:
    loop.train_and_evaluate(config, str(workdir))
  message = str(info.value)
  assert 'optim.lr: 0.001 -> 0.002' in message
  assert 'stop.sigma: 0.25 -> 0.5' in message
  assert '--config.checkpoint.allow_config_change=True' in message
  assert json.load(open(os.path.join(workdir, 'config.json')))['optim']['lr'] == 1e-3


def test_allow_config_change_accepts_it_with_a_warning(two_checkpoints, caplog):
  config = _config(4, every_steps=2)
  config.optim.lr = 2e-3
  config.checkpoint.allow_config_change = True
  with caplog.at_level(logging.WARNING):
    workdir_lib.check_workdir_config(config, str(two_checkpoints))  # does not raise
  assert any('optim.lr: 0.001 -> 0.002' in r.getMessage() for r in caplog.records)


def test_run_control_keys_may_change_on_resume(two_checkpoints, tmp_path):
  old = json.load(open(os.path.join(two_checkpoints, 'config.json')))
  new = _config(6, every_steps=3, keep=5)
  new.log_every_steps = 2
  assert workdir_lib.config_changes(old, json.loads(new.to_json_best_effort())) == []
  workdir = _copy(two_checkpoints, tmp_path)
  summary = loop.train_and_evaluate(new, str(workdir))
  assert summary['steps'] == 6
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    logged = [x['step'] for x in map(json.loads, f) if 'loss' in x]
  assert logged == [1, 2, 3, 4, 6]  # resumed at 4: nothing recomputed, logged every 2 now
  assert _steps(workdir) == [2, 4, 6]


# --- retention and time-based saves ---------------------------------------------------------------


def test_keep_latest_k_plus_every_jth(tmp_path):
  _train(_config(9, every_steps=1, keep=2, keep_every=4), tmp_path)
  assert _steps(tmp_path) == [4, 8, 9]  # {4, 8} for good, {8, 9} the latest two
  leftovers = [n for n in os.listdir(tmp_path / 'checkpoints') if not n.isdigit()]
  assert not [n for n in leftovers if 'tmp' in n], leftovers


def test_every_minutes_saves_by_time(tmp_path):
  # every_steps=0 alone would save only the final step 9; 0.001 minutes = 60 ms.
  _train(_config(9, every_steps=0, every_minutes=0.001, keep=100), tmp_path)
  steps = _steps(tmp_path)
  assert steps[-1] == 9 and len(steps) > 1, steps
  # The clock is only read at logging steps (no per-step host sync): saves land on them.
  config = _config(9, every_steps=0, every_minutes=0.001, keep=100)
  config.log_every_steps = 3
  _train(config, tmp_path / 'every3')
  steps = _steps(tmp_path / 'every3')
  assert steps == [3, 6, 9], steps


# --- a damaged checkpoint never bricks a run; reruns of a finished run ----------------------------


def _final_state(workdir, step):
  loaded_step, tree = checkpointing.load_checkpoint(str(workdir), step=step)
  assert loaded_step == step
  return tree


def _train_rows(workdir) -> list[int]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [x['step'] for x in map(json.loads, f) if 'loss' in x]


def _forbid_compiling(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError('the train step was compiled')

  monkeypatch.setattr(setup.ShardedStep, 'compile', fail)


@QUIET_FAILED_READS
def test_damaged_final_checkpoint_is_moved_aside_and_reruns_finish_like_an_uninterrupted_run(
  two_checkpoints, tmp_path, capsys
):
  workdir = _copy(two_checkpoints, tmp_path)
  _truncate_array_data(os.path.join(workdir, 'checkpoints', '4'))
  config = _config(4, every_steps=2)
  # Resumes from step 2, recomputes 3 and 4 and saves step 4 again (orbax used to refuse:
  # StepAlreadyExistsError, on this rerun and every later one).
  summary = loop.train_and_evaluate(config, str(workdir))
  assert summary['steps'] == 4 and not summary.get('already_complete')
  (aside,) = [n for n in os.listdir(workdir / 'checkpoints') if not n.isdigit()]
  assert aside.startswith('4.damaged-'), aside  # kept for inspection, out of orbax's sight
  assert os.listdir(workdir / 'checkpoints' / aside / 'state')
  assert _steps(workdir) == [2, 4]
  assert _train_rows(workdir) == [1, 2, 3, 4]  # rows 3 and 4 once: cut back to step 2 first
  _assert_trees_equal(_final_state(workdir, 4), _final_state(two_checkpoints, 4))  # bitwise
  assert _losses(workdir) == _losses(two_checkpoints)

  # Rerun again: finished, nothing changes.
  files = {n: open(workdir / n, 'rb').read() for n in ('metrics.jsonl', 'summary.json')}
  capsys.readouterr()
  again = loop.train_and_evaluate(config, str(workdir))
  assert again['already_complete']
  assert 'already complete at step 4' in capsys.readouterr().out
  assert files == {n: open(workdir / n, 'rb').read() for n in files}


def test_rerun_of_a_finished_run_changes_nothing_and_compiles_nothing(
  two_checkpoints, tmp_path, capsys, monkeypatch
):
  workdir = _copy(two_checkpoints, tmp_path)
  names = ('metrics.jsonl', 'summary.json', 'config.json', 'plan.json')
  before = {n: open(workdir / n, 'rb').read() for n in names}
  assert json.loads(before['summary.json'])['final_metrics']['loss'] > 0
  _forbid_compiling(monkeypatch)
  summary = loop.train_and_evaluate(_config(4, every_steps=2), str(workdir))
  path = os.path.join(os.path.abspath(workdir), 'summary.json')
  line = f'already complete at step 4 (summary: {path})'
  assert capsys.readouterr().out.strip() == line
  assert summary['already_complete'] and summary['message'] == line and summary['steps'] == 4
  assert before == {n: open(workdir / n, 'rb').read() for n in names}
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']

  # Asked for: the end-of-run evaluators run again (none here) on the restored final state,
  # still without compiling the train step; summary.json keeps the final metrics.
  config = _config(4, every_steps=2)
  config.eval.rerun_final = True
  summary = loop.train_and_evaluate(config, str(workdir))
  assert 'already_complete' not in summary
  rewritten = json.loads(open(workdir / 'summary.json').read())
  assert rewritten['final_metrics'] == json.loads(before['summary.json'])['final_metrics']
  assert rewritten['final_checkpoint'] == checkpointing.step_fingerprint(str(workdir), 4)
  assert open(workdir / 'metrics.jsonl', 'rb').read() == before['metrics.jsonl']


def test_damaged_steps_are_moved_aside_on_gcs_too():
  """On an object store a rename is a copy and a delete: every object of the step moves."""
  from etils import epath

  from tests import gcs_emulator

  emulator = gcs_emulator.Emulator()
  try:
    emulator.create_bucket('ckpt')
    with gcs_emulator.in_this_process(emulator):
      workdir = 'gs://ckpt/run'
      root = epath.Path(f'{workdir}/checkpoints')
      files = ('state/_METADATA', 'state/d/0a1b', 'meta/metadata', 'commit_success.txt')
      for step in (2, 4):
        for name in files:
          (root / str(step) / name).write_text(f'{step}:{name}')
      assert checkpointing.committed_steps(workdir) == [2, 4]
      fingerprint = checkpointing.step_fingerprint(workdir, 4)
      assert fingerprint['files'] == 4 and fingerprint['bytes'] > 0
      ckpt = checkpointing.Checkpointer(workdir, _config(4))
      try:
        assert sorted(ckpt.manager.all_steps()) == [2, 4]
        ckpt._set_aside([4])
        assert sorted(ckpt.manager.all_steps()) == [2]  # orbax no longer sees step 4 ...
      finally:
        ckpt.close()
      moved = emulator.names('ckpt', 'run/checkpoints/4.damaged-')
      (aside,) = {n.split('/')[2] for n in moved}
      assert sorted(moved) == sorted(f'run/checkpoints/{aside}/{n}' for n in files)  # ... kept
      assert not emulator.names('ckpt', 'run/checkpoints/4/')
      assert emulator.read('ckpt', f'run/checkpoints/{aside}/state/d/0a1b') == b'4:state/d/0a1b'
      assert checkpointing.committed_steps(workdir) == [2]
  finally:
    emulator.stop()
