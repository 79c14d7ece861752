"""Every notebook in notebooks/ runs headless from top to bottom and draws its figures.

The notebooks read their run from STOP_JAX_WORKDIR: conftest's `tiny_run`, trained once per test
session (and shared by the pytest-xdist workers and the other tests), stands in for a real
checkpoint.
"""

import json
import pathlib
import re
import sys

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / 'notebooks'
NOTEBOOKS = sorted(p.name for p in NOTEBOOK_DIR.glob('*.ipynb'))
# The least number of figures (image/png outputs) each notebook must draw.
MIN_FIGURES = {
  'quickstart.ipynb': 1,
  'similarity_maps.ipynb': 2,  # learned and random A (figures.similarity_figure), single draws
  'prediction_heatmaps.ipynb': 3,  # one per image
  'stop_regularisation.ipynb': 2,  # against sigma, along training
}
QUICKSTART_STEPS = 30  # the quickstart trains its own run, as short as conftest's tiny_run
SWEEP_STEPS = 10  # the regularisation notebook's sigma sweep: two logged points per run


def _outputs(nb):
  return [o for cell in nb.cells if cell.cell_type == 'code' for o in cell.outputs]


def test_notebooks_are_registered_valid_and_stored_without_outputs():
  assert set(NOTEBOOKS) == set(MIN_FIGURES)
  for name in NOTEBOOKS:
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == 'python3'
    code = [c for c in nb.cells if c.cell_type == 'code']
    assert "'google.colab' in sys.modules" in code[0].source, name  # Colab install cell first
    assert not _outputs(nb) and all(c.execution_count is None for c in code), name


def test_run_times_are_stated_once_in_the_readme_and_the_quickstart_points_there():
  readme = (NOTEBOOK_DIR.parent / 'README.md').read_text()
  headings = re.findall(r'^#+ (.+)$', readme, flags=re.M)
  duration = re.compile(r'\b\d+(\.\d+)?\s*(min|minutes|s|seconds)\b|\d+m\d+s', re.I)
  for name in NOTEBOOKS:
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    for cell in nb.cells:
      assert not duration.search(cell.source), f'{name}: a run time belongs in the README'
  quickstart = nbformat.read(NOTEBOOK_DIR / 'quickstart.ipynb', as_version=4).cells[0].source
  pointer = re.search(r'the README\'s "([^"]+)" gives the time measured', quickstart)
  assert pointer and pointer.group(1) in headings, quickstart
  section = readme.split(pointer.group(1), 1)[1].split('\n## ', 1)[0]
  assert re.search(r'\d+m\d+s', section)  # a measured time, in the section named


@pytest.fixture(scope='session')
def jupyter_path(tmp_path_factory):
  """A 'python3' kernel spec on this interpreter (the venv), found before any system one."""
  root = tmp_path_factory.mktemp('jupyter')
  spec = root / 'kernels' / 'python3'
  spec.mkdir(parents=True)
  kernel = {
    'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
    'display_name': 'Python 3 (stop_jax tests)',
    'language': 'python',
  }
  (spec / 'kernel.json').write_text(json.dumps(kernel))
  return str(root)


@pytest.mark.slow
@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_runs_and_draws_its_figures(name, tiny_run, jupyter_path, tmp_path, monkeypatch):
  monkeypatch.setenv('JUPYTER_PATH', jupyter_path)
  monkeypatch.delenv('MPLBACKEND', raising=False)  # the kernel's inline backend emits PNGs
  monkeypatch.setenv('STOP_JAX_WORKDIR', tiny_run)
  monkeypatch.setenv('STOP_JAX_SWEEP_DIR', str(tmp_path / 'sweep'))
  monkeypatch.setenv('STOP_JAX_QUICKSTART_WORKDIR', str(tmp_path / 'quickstart'))
  monkeypatch.setenv('STOP_JAX_QUICKSTART_STEPS', str(QUICKSTART_STEPS))
  monkeypatch.setenv('STOP_JAX_SWEEP_STEPS', str(SWEEP_STEPS))
  nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
  client = NotebookClient(
    nb, kernel_name='python3', timeout=600, resources={'metadata': {'path': str(NOTEBOOK_DIR)}}
  )
  client.execute()  # raises CellExecutionError, with the cell's traceback, on any error
  outputs = _outputs(nb)
  assert not [o for o in outputs if o.output_type == 'error']
  figures = [o for o in outputs if 'image/png' in o.get('data', {})]
  assert len(figures) >= MIN_FIGURES[name], f'{name} drew {len(figures)} figures'
