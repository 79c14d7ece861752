r"""Offline stand-in for the paper's CLEVR/Dist probe (Table 4): `shapes`, task dist.

Command:
  python -m stop_jax.evaluate --config=configs/eval/shapes_dist.py --workdir=$WORKDIR

The same evaluation as configs/eval/shapes_count.py (see there) with task=dist: the depth bin of
the nearest object, 6 balanced classes.
"""

from stop_jax import config as config_lib


def get_config(arg=None):
  del arg
  return config_lib.load_config_file('eval/shapes_count.py', 'task=dist')
