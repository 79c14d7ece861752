r"""CLEVR/Dist linear probe with the VTAB task definition (paper Table 4).

Command:
  python -m stop_jax.evaluate --config=configs/eval/clevr_dist.py --workdir=$WORKDIR \
    --config.eval.data_dir=$TFDS_DIR

tfds `clevr`. Label (VTAB `closest_object_distance`): the depth `pixel_coords[:, 2]` of the
closest object, binned by the thresholds (0, 8, 8.5, 9, 9.5, 10, 100) into 6 classes. Train on
tfds `train`, test on `validation`, as VTAB's trainval / test.

Augmentation: a crop can cut the closest object out and so change the label; as VTAB, images
are resized whole (no center crop at test; crop scale (1, 1), i.e. the whole image, in
training) and only the horizontal flip, which keeps every depth, stays random.

Expected (paper Table 4): ViT-B/16 StoP 71.3, ViT-L/16 70.2, ViT-H/14 72.5.
"""

from stop_jax import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.eval.protocol = 'linear'
  c.eval.source = 'tfds'
  c.eval.dataset = 'clevr'
  c.eval.label = 'clevr_distance'
  c.eval.train_split, c.eval.test_split = 'train', 'validation'
  c.eval.name = 'clevr_dist'
  c.eval.image_size = 224
  c.eval.center_crop = False
  c.eval.linear_crop_scale = (1.0, 1.0)
  c.eval.linear_lrs = (0.003, 0.01, 0.03, 0.1)
  c.eval.linear_epochs = 50
  c.eval.linear_batch_size = 512
  return config_lib.lock(c)
