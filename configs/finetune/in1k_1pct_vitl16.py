r"""Paper Table 5 (and 16): full fine-tuning of ViT-L/16 on 1% of the ImageNet-1k labels.

Command:
  python -m stop_jax.finetune --config=configs/finetune/in1k_1pct_vitl16.py --workdir=$DIR \
    --config.finetune.init=$PRETRAIN_RUN --config.finetune.data_dir=$TFDS_DIR

$PRETRAIN_RUN: a configs/vitl16.py run, its export, or an official ViT-L/16 checkpoint converted
with `stop_jax.tools.convert`. Data: tfds `imagenet2012_subset/1pct` (12,811 train images of
the standard 1% split; `tfds build imagenet2012_subset/1pct --manual_dir=...` with the ImageNet
tars), scored on the 50,000 `validation` images. The same split as an image folder:
`--config.finetune.source=folder --config.finetune.data_dir=<root with train/ and val/>
--config.finetune.test_split=val --config.finetune.file_list=1percent.txt` (a list of the 1%
file names, e.g. SimCLR's `imagenet_subsets/1percent.txt`).

Expected (paper Table 5, ViT-L/16, top-1 on the validation set): I-JEPA 69.4, StoP 71.7.

Recipe: MAE's ViT-L/16 fine-tuning (He et al. 2022, facebookresearch/mae FINETUNE.md and
main_finetune.py defaults): AdamW (0.9, 0.999), blr 1e-3 (lr = blr * batch / 256), batch 1024,
layer-wise LR decay 0.75, weight decay 0.05, drop path 0.2, 5 warmup epochs then cosine to
1e-6, label smoothing 0.1, Mixup 0.8 / CutMix 1.0 (prob 1, switch 0.5), RandAugment
rand-m9-mstd0.5-inc1, random erasing 0.25, RandomResizedCrop (0.08, 1) bicubic + flip; test
images resized to 256 (shorter side) and center-cropped to 224. The StoP paper states no
epoch count for the 1% setting; we keep MAE's 50 epochs, which on 12,811 images is only 600
steps at batch 1024, and the figures above may need more: `--config.finetune.epochs=N`.
"""

from stop_jax import config as config_lib


def get_config():
  c = config_lib.base_config()
  f = c.finetune
  f.source = 'tfds'
  f.dataset = 'imagenet2012_subset/1pct'
  f.train_split = 'train'
  f.test_split = 'validation'
  f.batch_size = 1024
  f.epochs = 50.0
  f.warmup_epochs = 5.0
  f.blr = 1e-3
  f.min_lr = 1e-6
  f.weight_decay = 0.05
  f.layer_decay = 0.75
  f.drop_path = 0.2
  f.label_smoothing = 0.1
  f.mixup, f.cutmix = 0.8, 1.0
  f.mixup_prob, f.mixup_switch_prob = 1.0, 0.5
  f.randaug_num_ops, f.randaug_magnitude, f.randaug_magnitude_std = 2, 9.0, 0.5
  f.reprob = 0.25
  f.crop_scale = (0.08, 1.0)
  f.interpolation = 'bicubic'
  f.resize_ratio = 256 / 224
  f.eval_every_epochs = 5.0
  c.checkpoint.every_steps = 100
  c.mesh.data, c.mesh.fsdp = -1, 1  # ViT-L fits replicated; set fsdp for bigger encoders
  return config_lib.lock(c)
