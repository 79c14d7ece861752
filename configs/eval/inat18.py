r"""iNaturalist 2018 linear probe (paper Table 4), both feature types.

Command:
  python -m stop_jax.evaluate --config=configs/eval/inat18.py --workdir=$WORKDIR \
    --config.eval.data_dir=$TFDS_DIR

tfds `i_naturalist2018` (437,513 train / 24,426 validation images, 8,142 species; its archives
must be in tfds' manual_dir). Trained on train, scored on validation.

Expected (paper Table 4): ViT-B/16 StoP 44.7, ViT-L/16 49.2, ViT-H/14 50.9.
"""

from stop_jax import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.eval.protocol = 'linear'
  c.eval.source = 'tfds'
  c.eval.dataset = 'i_naturalist2018'
  c.eval.train_split, c.eval.test_split = 'train', 'validation'
  c.eval.name = 'inat18'
  c.eval.image_size = 224
  c.eval.linear_lrs = (0.003, 0.01, 0.03, 0.1)
  c.eval.linear_epochs = 84
  c.eval.linear_batch_size = 1024
  c.eval.log_every_steps = 500
  return config_lib.lock(c)
