r"""ViT-H/14 I-JEPA + StoP on ImageNet-1k, 300 epochs (paper Table 12).

Command:
  python -m stop_jax.main --config=configs/vith14.py --workdir=$WORKDIR \
    --config.data.data_dir=$TFDS_DIR

Expects tfds `imagenet2012`; global batch 2048. Expected result (paper Table 14): 79.6% IN-1k
linear-probe top-1 (I-JEPA: 79.3%). Note: the released StoP ViT-H weights use patch 16
(`--config.model.patch_size=16`, the official `vit-h16.yaml`).

Where each value comes from ("yaml" = amirbar/StoP `configs/pretrain/vit-h14.yaml`):
  ViT-H, patch 14, predictor depth 12 / width 384, sigma 0.2    paper Table 12 and yaml
  300 epochs, warmup 40, lr 1e-3, weight decay 0.04 -> 0.4      paper Table 12 and yaml
  start_lr 2e-4, final_lr 1e-6, ipe_scale 1, no clipping        yaml (the paper omits them)
  LR and weight decay held constant from epoch 250 on           yaml `fix_lr_thres: 250`,
    (their values at that step; the WD stays ~0.376)              `fix_wd_thres: 250`, `const`
  EMA 0.996 -> 1.0                                              StoP `main.py` (fixed there)
  masks: the official sampler (mask.mode='official'), 4 targets
    (0.15-0.2, aspect 0.75-1.5), context 0.85-1, min_keep 10    yaml `mask`
  augmentation: crop (0.3, 1), flip, blur, grayscale, no jitter yaml `data` (base defaults)
  bfloat16 compute, float32 params                              yaml `use_float16: true`
    (StoP ran fp16 autocast on V100s, I-JEPA bf16 autocast)
"""

from stop_jax import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.model.variant = 'huge'
  c.model.patch_size = 14
  c.model.dtype = 'bfloat16'
  c.predictor.depth = 12
  c.stop.sigma = 0.2
  c.mask.mode = 'official'
  c.optim.epochs = 300
  c.optim.warmup_epochs = 40
  c.optim.start_lr, c.optim.lr, c.optim.final_lr = 2e-4, 1e-3, 1e-6
  c.optim.constant_lr_after_epoch = 250
  c.optim.constant_wd_after_epoch = 250
  c.eval.probe = False
  return config_lib.lock(c)
