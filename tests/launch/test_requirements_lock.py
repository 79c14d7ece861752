"""launch/requirements-tpu.lock: what the TPU workers install agrees with setup.cfg and this venv."""

import configparser
import importlib.metadata
import os
import re

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.launch.conftest import LAUNCH, ROOT

LOCK = os.path.join(LAUNCH, 'requirements-tpu.lock')
REGENERATE = 'regenerate it with the command at the top of launch/requirements-tpu.in'
# A Cloud TPU VM worker after provisioning (launch/tpu_worker.sh): Linux, Python 3.11.
WORKER = {'platform_system': 'Linux', 'sys_platform': 'linux', 'python_version': '3.11'}


def _locked() -> dict[str, str]:
  with open(LOCK) as f:
    text = f.read()
  pins = re.findall(r'^([A-Za-z0-9_.\-]+)==(\S+)', text, flags=re.MULTILINE)
  return {canonicalize_name(name): version for name, version in pins}


def _install_requires() -> list[Requirement]:
  setup = configparser.ConfigParser()
  setup.read(os.path.join(ROOT, 'setup.cfg'))
  lines = setup['options']['install_requires'].strip().splitlines()
  reqs = [Requirement(line) for line in lines if line.strip()]
  return [r for r in reqs if r.marker is None or r.marker.evaluate(WORKER)]


def test_every_dependency_of_setup_cfg_is_pinned_within_its_range():
  locked = _locked()
  for req in _install_requires():
    name = canonicalize_name(req.name)
    assert name in locked, f'{req.name} of setup.cfg is not in the TPU lock file: {REGENERATE}'
    assert req.specifier.contains(locked[name]), f'{req} but locked {locked[name]}: {REGENERATE}'


def test_the_workers_run_the_versions_the_tests_run_with():
  locked = _locked()
  for req in _install_requires():
    installed = importlib.metadata.version(req.name)
    assert locked[canonicalize_name(req.name)] == installed, (
      f'{req.name}: {installed} here, {locked[canonicalize_name(req.name)]} on TPU workers: '
      f'{REGENERATE}'
    )


def test_jax_tpu_extra_pins_jaxlib_and_the_matching_libtpu():
  locked = _locked()
  assert locked['jax'] == importlib.metadata.version('jax')
  tpu_extra = [
    Requirement(r)
    for r in importlib.metadata.requires('jax')
    if Requirement(r).marker and Requirement(r).marker.evaluate({**WORKER, 'extra': 'tpu'})
  ]
  assert {canonicalize_name(r.name) for r in tpu_extra} >= {'jaxlib', 'libtpu'}
  for req in tpu_extra:
    name = canonicalize_name(req.name)
    assert name in locked and req.specifier.contains(locked[name]), (req, locked.get(name))
  with open(os.path.join(LAUNCH, 'requirements-tpu.in')) as f:
    assert f'jax[tpu]=={locked["jax"]}' in f.read().split()


def test_every_pin_carries_its_hashes_and_the_lock_names_its_command():
  with open(LOCK) as f:
    text = f.read()
  blocks = re.split(r'\n(?=[A-Za-z0-9])', text.split('\n', 2)[2])
  assert len(blocks) == len(_locked()) > 20
  assert all('--hash=sha256:' in block for block in blocks)
  with open(os.path.join(LAUNCH, 'requirements-tpu.in')) as f:
    command = re.search(r'uv pip compile .*\n.*', f.read()).group(0)
  command = ' '.join(command.replace('#', ' ').replace('\\', ' ').split())
  assert command in ' '.join(text.splitlines()[1].split())
