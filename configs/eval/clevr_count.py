r"""CLEVR/Count linear probe with the VTAB task definition (paper Table 4).

Command:
  python -m stop_jax.evaluate --config=configs/eval/clevr_count.py --workdir=$WORKDIR \
    --config.eval.data_dir=$TFDS_DIR

tfds `clevr` (70,000 train / 15,000 validation scenes; `tfds build clevr`). Label: number of
objects minus 3, i.e. 8 classes for 3..10 objects (VTAB `count_all`). VTAB's test split is tfds
`validation` (tfds `test` has no scene annotations); we train on all of tfds `train` (VTAB's
`trainval`).

Augmentation: a crop can cut objects out of the scene and so change the label; as VTAB, images
are resized whole (no center crop at test; crop scale (1, 1), i.e. the whole image, in
training) and only the horizontal flip, which keeps the count, stays random.

Expected (paper Table 4): ViT-B/16 StoP 83.7, ViT-L/16 85.7, ViT-H/14 88.0.
"""

from stop_jax import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.eval.protocol = 'linear'
  c.eval.source = 'tfds'
  c.eval.dataset = 'clevr'
  c.eval.label = 'clevr_count'
  c.eval.train_split, c.eval.test_split = 'train', 'validation'
  c.eval.name = 'clevr_count'
  c.eval.image_size = 224
  c.eval.center_crop = False
  c.eval.linear_crop_scale = (1.0, 1.0)
  c.eval.linear_lrs = (0.003, 0.01, 0.03, 0.1)
  c.eval.linear_epochs = 50
  c.eval.linear_batch_size = 512
  return config_lib.lock(c)
