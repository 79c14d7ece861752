r"""Offline fine-tuning of the tiny digits run (configs/tiny.py) on 10% of its training labels.

Commands (the second is the random-init reference with the same recipe and budget):
  python -m stop_jax.main --config=configs/tiny.py --workdir=/tmp/stop_tiny
  python -m stop_jax.finetune --config=configs/finetune/tiny.py --workdir=/tmp/stop_tiny_ft \
    --config.finetune.init=/tmp/stop_tiny
  python -m stop_jax.finetune --config=configs/finetune/tiny.py --workdir=/tmp/stop_tiny_ft_rand \
    --config.finetune.init=/tmp/stop_tiny --config.finetune.random_init=True

scikit-learn's digits with the pretraining run's fixed held-out split: the first 144 of the
1,437 training digits (10%) for fine-tuning, all 360 test digits for the score. The MAE recipe
shrunk to this problem: batch 48 (3 steps per epoch), 200 epochs, 5 of warmup, peak LR 2e-3,
layer decay 0.75, drop path 0.1, label smoothing 0.1, crops of 80-100% of the area, no flip
(mirrored digits are other symbols), and none of MAE's stronger augmentation: RandAugment
(even at magnitude 5), Mixup, CutMix and random erasing each cost both encoders 10-35 points
of top-1 on 144 digits of 32 px (README, "Fine-tuning"). The head standardises the pooled
features with a BatchNorm (finetune.head_norm): the tiny pretrained encoder's features share a
large part across images, which MAE's LayerNorm head keeps. `:steps=N` stops after N steps
(tests).
"""

from stop_jax import config as config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, steps=-1)
  c = config_lib.base_config()
  f = c.finetune
  f.source = 'digits'
  f.max_train_examples = 144
  f.resize_ratio = 1.0  # Digits fill the frame: a center crop would cut strokes off.
  f.batch_size = 48
  f.epochs = 200.0
  f.warmup_epochs = 5.0
  f.blr = 2e-3 * 256 / 48  # peak LR 2e-3
  f.layer_decay = 0.75
  f.drop_path = 0.1
  f.head_norm = 'batchnorm'
  f.flip = False
  f.crop_scale = (0.8, 1.0)
  f.randaug_num_ops = 0
  f.mixup, f.cutmix, f.reprob = 0.0, 0.0, 0.0
  f.eval_every_epochs = 50.0
  f.eval_batch_size = 360
  f.log_every_steps = 15
  c.total_steps = args.steps
  c.checkpoint.every_steps = 50
  return config_lib.lock(c)
