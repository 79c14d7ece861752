r"""ViT-B/16 I-JEPA + StoP on ImageNet-1k, 600 epochs (paper Table 10).

Command:
  python -m stop_jax.main --config=configs/vitb16.py --workdir=$WORKDIR \
    --config.data.data_dir=$TFDS_DIR

Expects tfds `imagenet2012` prepared in data_dir; global batch 2048 (e.g. 64 per chip on 32
chips). Expected result (paper Table 14): 74.5% IN-1k linear-probe top-1 with the frozen target
encoder (I-JEPA without StoP: 72.9%).

Where each value comes from ("yaml" = amirbar/StoP `configs/pretrain/vit-b16.yaml`):
  ViT-B, patch 16, predictor depth 6 / width 384, sigma 0.25    paper Table 10 and yaml
  600 epochs, warmup 15, lr 8e-4, weight decay 0.04 -> 0.4      paper Table 10 and yaml
  start_lr 2e-4, final_lr 1e-4, ipe_scale 1, no clipping        yaml (the paper omits them)
  EMA 0.996 -> 1.0                                              StoP `main.py` (fixed there)
  masks: 4 targets (0.15-0.2, aspect 0.75-1.5), context 0.85-1,
    min_keep 10, the official sampler (mask.mode='official')    yaml `mask`, StoP's collator
  augmentation: crop (0.3, 1), flip, blur, grayscale, no jitter yaml `data` (base defaults)
  bfloat16 compute, float32 params                              yaml `use_float16: true`
    (StoP ran fp16 autocast on V100s; bf16 is the accelerator-native equivalent)
"""

from stop_jax import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.model.variant = 'base'
  c.model.patch_size = 16
  c.model.dtype = 'bfloat16'
  c.predictor.depth = 6
  c.stop.sigma = 0.25
  c.mask.mode = 'official'
  c.optim.epochs = 600
  c.optim.warmup_epochs = 15
  c.optim.start_lr, c.optim.lr, c.optim.final_lr = 2e-4, 8e-4, 1e-4
  c.eval.probe = False  # IN-1k probes have their own command (configs/eval).
  return config_lib.lock(c)
