r"""Places linear probe (paper Table 4's Places205 column), both feature types.

Command:
  python -m stop_jax.evaluate --config=configs/eval/places.py --workdir=$WORKDIR \
    --config.eval.data_dir=$TFDS_DIR

Places205 is not in tfds; tfds `places365_small` (1.8M train / 36,500 validation images at
256x256, 365 scene classes) stands in for it, so figures are comparable between our runs but not
to the paper's Places205 column: 365 classes instead of 205 make it a harder task.

Expected (paper Table 4, Places205): ViT-B/16 StoP 54.3, ViT-L/16 57.2, ViT-H/14 58.4.
"""

from stop_jax import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.eval.protocol = 'linear'
  c.eval.source = 'tfds'
  c.eval.dataset = 'places365_small'
  c.eval.train_split, c.eval.test_split = 'train', 'validation'
  c.eval.name = 'places365'
  c.eval.image_size = 224
  c.eval.linear_lrs = (0.003, 0.01, 0.03, 0.1)
  c.eval.linear_epochs = 28
  c.eval.linear_batch_size = 1024
  c.eval.log_every_steps = 500
  return config_lib.lock(c)
