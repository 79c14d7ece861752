"""Configs: every file loads and validates; bad values fail early with the key's name."""

import ast
import glob
import os
import subprocess
import sys

import pytest

from stop_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py')))


def _load(path, arg=None):
  """(the file's docstring, its config) for a path under configs/."""
  with open(path) as f:
    doc = ast.get_docstring(ast.parse(f.read()))
  return doc, config_lib.load_config_file(path, arg)


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_every_config_validates_is_locked_and_documents_its_command(path):
  doc, c = _load(path)
  config_lib.validate(c)
  with pytest.raises(AttributeError):
    c.stop.sgima = 0.1  # a typo is an error, never a silently new key
  name = os.path.basename(path)
  assert f'python -m stop_jax.main --config=configs/{name}' in doc
  assert 'xpected' in doc  # what it should produce


def test_recipes_match_the_paper_tables():
  _, b = _load(os.path.join(ROOT, 'configs', 'vitb16.py'))
  _, h = _load(os.path.join(ROOT, 'configs', 'vith14.py'))
  assert (b.optim.epochs, b.optim.lr, b.predictor.depth, b.stop.sigma) == (600, 8e-4, 6, 0.25)
  assert (h.optim.epochs, h.optim.lr, h.optim.warmup_epochs) == (300, 1e-3, 40)
  assert (h.predictor.depth, h.stop.sigma, h.model.patch_size) == (12, 0.2, 14)
  assert h.optim.constant_lr_after_epoch == 250
  assert config_lib.vit_shape(h.model)[:3] == (1280, 32, 16)


def test_config_files_load_by_name_as_the_command_line_gives_them(monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)  # found next to the package, not through the working directory
  assert config_lib.load_config_file('vitb16.py').model.variant == 'base'  # get_config()
  assert config_lib.load_config_file('tiny.py', 'steps=7').total_steps == 7
  assert config_lib.load_config_file('eval/knn.py').eval.protocol == 'knn'
  with pytest.raises(FileNotFoundError, match="'vitb61.py' not found"):
    config_lib.load_config_file('vitb61.py')


def test_ablation_variants_select_the_right_switches():
  path = os.path.join(ROOT, 'configs', 'ablation.py')
  expected = {
    'stop': ('masked', 'sincos', 'none'),
    'sincos': ('off', 'sincos', 'none'),
    'learned_pos': ('off', 'learned', 'none'),
    'context': ('context', 'sincos', 'none'),
    'both': ('both', 'sincos', 'none'),
    'fixed_cov': ('fixed_cov', 'sincos', 'none'),
    'untied': ('untied', 'sincos', 'none'),
    'l1': ('off', 'sincos', 'l1'),
    'l2': ('off', 'sincos', 'l2'),
  }
  for variant, (mode, pos, reg) in expected.items():
    _, c = _load(path, f'variant={variant}')
    assert (c.stop.mode, c.predictor.pos_embed, c.stop.reg) == (mode, pos, reg), variant
    assert (c.optim.epochs, c.optim.lr, c.model.variant) == (300, 1e-3, 'base')
    assert c.loss.lowres == 'none'
  for kind in ('max', 'bilinear'):
    _, c = _load(path, f'variant=lowres_{kind}')
    assert (c.stop.mode, c.loss.lowres, c.loss.lowres_weight) == ('off', kind, 1.0)
  # The reference row sets a top-level key (total_steps) as well as grouped ones.
  _, c = _load(path, 'variant=random_init')
  assert (c.total_steps, c.optim.lr, c.optim.start_lr, c.optim.weight_decay) == (1, 0, 0, 0)
  with pytest.raises(config_lib.ConfigError, match="variant='nope'"):
    _load(path, 'variant=nope')
  with pytest.raises(config_lib.ConfigError, match='colour'):
    _load(path, 'colour=red')


@pytest.mark.parametrize(
  'key,value,match',
  [
    ('model.image_size', 225, 'model.image_size=225 .* multiple of model.patch_size=16'),
    ('stop.sigma', -0.1, r'stop.sigma=-0.1 .* >= 0'),
    ('mask.target_scale', (0.0, 0.2), 'mask.target_scale'),
    ('mask.context_scale', (0.85, 1.5), 'mask.context_scale'),
    ('stop.mode', 'sometimes', 'stop.mode'),
    ('model.variant', 'colossal', 'model.variant'),
    ('loss.num_target_layers', 13, r'loss.num_target_layers=13 .* depth=12'),
    ('mask.num_context_tokens', 500, 'mask.num_context_tokens=500'),
    ('xla_cpu_matmul', 'mkl', "xla_cpu_matmul='mkl' .* onednn, eigen or ynnpack"),
  ],
)
def test_bad_values_fail_naming_the_key_and_the_allowed_range(key, value, match):
  c = config_lib.base_config()
  c.update_from_flattened_dict({key: value})
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(c)


def test_batch_must_divide_by_the_batch_sharded_devices():
  c = config_lib.base_config()
  c.data.global_batch_size = 100
  with pytest.raises(config_lib.ConfigError, match='data x fsdp = 8 x 1'):
    config_lib.validate(c, num_devices=8)
  config_lib.validate(c, num_devices=4)
  # Tensor-parallel devices share their examples: 100 splits over 4 x 1 of the 8 devices.
  c.mesh.tensor = 2
  c.mesh.data = 4
  config_lib.validate(c, num_devices=8)


@pytest.mark.parametrize(
  'mesh, match',
  [
    ({'data': -1, 'fsdp': -1}, 'at most one axis may be -1'),
    ({'data': 3}, 'needs 3 devices but 8 are available'),
    ({'data': -1, 'fsdp': 3}, 'do not divide by the fixed axes'),
    ({'data': 0}, 'positive or -1'),
  ],
)
def test_bad_mesh_is_named(mesh, match):
  c = config_lib.base_config()
  for k, v in mesh.items():
    c.mesh[k] = v
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(c, num_devices=8)


@pytest.mark.slow  # a fresh interpreter importing stop_jax.main
def test_unknown_command_line_key_fails_before_any_work(tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'stop_jax.main',
      '--config=configs/tiny.py',
      f'--workdir={tmp_path}',
      '--config.stop.sgima=0.1',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode != 0
  assert 'sgima' in proc.stderr
  assert not os.path.exists(tmp_path / 'config.json')  # nothing started


def test_the_small_ablation_study_config_validates_for_both_datasets():
  path = os.path.join(ROOT, 'experiments', 'ablation_small', 'config.py')
  shapes = config_lib.load_config_file(path)
  digits = config_lib.load_config_file(path, 'data=digits')
  for c in (shapes, digits):
    config_lib.validate(c)
    assert c.mask.mode == 'official'
  assert (shapes.data.source, shapes.model.image_size, shapes.model.patch_size) == ('shapes', 64, 8)
  assert (digits.data.source, digits.model.image_size, digits.model.patch_size) == ('digits', 32, 4)
  with pytest.raises(config_lib.ConfigError, match="data='cifar' is not allowed"):
    config_lib.load_config_file(path, 'data=cifar')
