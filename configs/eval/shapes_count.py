r"""Offline stand-in for the paper's CLEVR probes (Table 4) on the `shapes` dataset.

Commands:
  python -m stop_jax.evaluate --config=configs/eval/shapes_count.py --workdir=$WORKDIR
  python -m stop_jax.evaluate --config=configs/eval/shapes_count.py:task=shape --workdir=$WORKDIR
  (configs/eval/shapes_dist.py is this file with task=dist)

`shapes` (stop_jax/data/shapes.py) renders CLEVR-like scenes offline, so this runs anywhere, at the
run's own image size. Tasks: count (objects minus 3: 8 classes, as VTAB's CLEVR count_all), dist
(depth bin of the nearest object: 6 balanced classes, as VTAB's closest_object_distance), shape
(of the largest-looking object: 3 classes). As VTAB (and configs/eval/clevr_*.py), images are
resized whole: a crop could cut objects out. Protocol: logistic regression on frozen features
(both feature types), trained on the first 10,000 scenes of the `train` split, tested on the
5,000 of the held-out `test` split.

Expected: above chance (1/8 count, 1/6 dist, 1/3 shape); a pretrained encoder above a
random-init one when pretraining learned the scene layout (pretrain with
--config.data.source=shapes).
"""

from stop_jax import config as config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, task='count')
  if args.task not in config_lib.SHAPES_LABELS:
    raise config_lib.ConfigError(
      f'shapes task={args.task!r} is not allowed: one of {config_lib.SHAPES_LABELS}.'
    )
  c = config_lib.base_config()
  c.eval.protocol = 'logreg'
  c.eval.source = 'shapes'
  c.eval.label = f'shapes_{args.task}'
  c.eval.name = f'shapes_{args.task}'
  c.eval.train_split, c.eval.test_split = 'train', 'test'
  c.eval.max_train_examples = 10_000
  c.eval.center_crop = False
  return config_lib.lock(c)
