r"""CIFAR-100 linear probe (paper Table 4), both feature types.

Command:
  python -m stop_jax.evaluate --config=configs/eval/cifar100.py --workdir=$WORKDIR

tfds `cifar100` (downloads itself with `tfds build cifar100`): 50,000 train / 10,000 test 32x32
images, upsampled to 224 (RandomResizedCrop for training; resize 256 + center crop 224 for test)
so the encoder sees its pretraining resolution. Linear heads trained with SGD, cosine LR.

Expected (paper Table 4): ViT-B/16 StoP 81.2, ViT-L/16 84.7, ViT-H/14 87.7 (best of the two
feature types).
"""

from stop_jax import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.eval.protocol = 'linear'
  c.eval.source = 'tfds'
  c.eval.dataset = 'cifar100'
  c.eval.train_split, c.eval.test_split = 'train', 'test'
  c.eval.name = 'cifar100'
  c.eval.image_size = 224
  c.eval.linear_lrs = (0.003, 0.01, 0.03, 0.1)
  c.eval.linear_epochs = 50
  c.eval.linear_batch_size = 512
  return config_lib.lock(c)
