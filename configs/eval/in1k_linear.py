r"""IN-1k 100% linear probe on augmented images (VISSL protocol), both feature types.

Command:
  python -m stop_jax.evaluate --config=configs/eval/in1k_linear.py --workdir=$WORKDIR \
    --config.eval.data_dir=$TFDS_DIR

tfds `imagenet2012` train (RandomResizedCrop 224 + flip) / validation (resize 256, center crop
224). BatchNorm-free linear heads on the frozen target encoder, SGD with momentum 0.9, cosine LR
over 100 epochs (DINO's linear recipe), batch 1024, one head per feature type and base LR of the
sweep (all trained on one forward pass); the JSON holds every head, the summary the best.

Expected (paper Table 1, "100%"): ViT-B/16 StoP 72.6 last layer / 74.5 last 4 layers; ViT-L/16
77.1 / 78.5; ViT-H/14 79.0 / 79.6.
"""

from stop_jax import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.eval.protocol = 'linear'
  c.eval.source = 'tfds'
  c.eval.dataset = 'imagenet2012'
  c.eval.train_split, c.eval.test_split = 'train', 'validation'
  c.eval.name = 'in1k_linear'
  c.eval.image_size = 224
  c.eval.linear_optimizer = 'sgd'
  c.eval.linear_lrs = (0.003, 0.01, 0.03, 0.1)
  c.eval.linear_epochs = 100
  c.eval.linear_batch_size = 1024
  c.eval.log_every_steps = 500
  return config_lib.lock(c)
