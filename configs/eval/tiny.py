r"""Offline evaluation of the tiny digits run (configs/tiny.py): no download, about a minute.

Commands:
  python -m stop_jax.main --config=configs/tiny.py --workdir=/tmp/stop_tiny
  python -m stop_jax.evaluate --config=configs/eval/tiny.py --workdir=/tmp/stop_tiny
  python -m stop_jax.evaluate --config=configs/eval/tiny.py:protocol=linear --workdir=/tmp/stop_tiny
  python -m stop_jax.evaluate --config=configs/eval/tiny.py:protocol=knn --workdir=/tmp/stop_tiny

scikit-learn's digits, with the pretraining run's fixed held-out split (1,437 train / 360 test)
at the run's resolution (32x32), both feature types. `protocol=logreg` (default) is the IN-1k 1%
protocol on digits; `linear` trains SGD heads for 30 epochs on augmented digits (crop scale
0.5-1, no flip: mirrored digits are other symbols); `knn` is the 20-NN vote.
"""

from stop_jax import config as config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, protocol='logreg')
  c = config_lib.base_config()
  c.eval.protocol = args.protocol
  c.eval.source = 'digits'
  c.eval.name = f'tiny_{args.protocol}'
  c.eval.resize_ratio = 1.0  # Digits fill the frame: a center crop would cut strokes off.
  c.eval.batch_size = 256
  c.eval.probe_l2 = (1e-4, 1e-3, 1e-2, 1e-1)
  c.eval.linear_lrs = (0.1, 0.3)
  c.eval.linear_epochs = 30
  c.eval.linear_batch_size = 128
  c.eval.linear_crop_scale = (0.5, 1.0)
  c.eval.linear_flip = False
  c.eval.log_every_steps = 50
  return config_lib.lock(c)
