r"""StoP's IN-1k 1% protocol: logistic regression on standardised frozen features.

Command:
  python -m stop_jax.evaluate --config=configs/eval/in1k_1pct.py --workdir=$WORKDIR \
    --config.eval.data_dir=$TFDS_DIR

Reads tfds `imagenet2012_subset/1pct` (12,811 train images; its validation split is the full
50,000-image IN-1k validation set), center-crops at 224, extracts both feature types of the
frozen target encoder, and fits an L2-regularised multinomial logistic regression with full-batch
L-BFGS on standardised features, l2 chosen on a held-out fifth of the train split from
eval.probe_l2 (per-example-mean scale: sklearn's C = 1 / (l2 * N)).

Expected (paper Table 1, "1%, last layer"): ViT-B/16 StoP 60.3 (I-JEPA 57.1), ViT-L/16 65.1
(64.2), ViT-H/14 65.4 (62.9).
"""

from stop_jax import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.eval.protocol = 'logreg'
  c.eval.source = 'tfds'
  c.eval.dataset = 'imagenet2012_subset/1pct'
  c.eval.train_split, c.eval.test_split = 'train', 'validation'
  c.eval.name = 'in1k_1pct'
  c.eval.image_size = 224
  c.eval.probe_l2 = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3)
  return config_lib.lock(c)
