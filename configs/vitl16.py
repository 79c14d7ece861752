r"""ViT-L/16 I-JEPA + StoP on ImageNet-1k, 600 epochs (paper Table 11).

Command:
  python -m stop_jax.main --config=configs/vitl16.py --workdir=$WORKDIR \
    --config.data.data_dir=$TFDS_DIR

Expects tfds `imagenet2012`; global batch 2048. Expected result (paper Table 14): 78.5% IN-1k
linear-probe top-1 (I-JEPA: 77.5%).

Where each value comes from ("yaml" = amirbar/StoP `configs/pretrain/vit-l16.yaml`):
  ViT-L, patch 16, predictor depth 12 / width 384, sigma 0.25   paper Table 11 and yaml
  600 epochs, warmup 15, lr 8e-4, weight decay 0.04 -> 0.4      paper Table 11 and yaml
  start_lr 2e-4, final_lr 1e-4, ipe_scale 1, no clipping        yaml (the paper omits them)
  EMA 0.996 -> 1.0                                              StoP `main.py` (fixed there)
  masks: the official sampler (mask.mode='official'), 4 targets
    (0.15-0.2, aspect 0.75-1.5), context 0.85-1, min_keep 10    yaml `mask`
  augmentation: crop (0.3, 1), flip, blur, grayscale, no jitter yaml `data` (base defaults)
  float32 compute                                               yaml `use_float16: false`
"""

from stop_jax import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.model.variant = 'large'
  c.model.patch_size = 16
  c.predictor.depth = 12
  c.stop.sigma = 0.25
  c.mask.mode = 'official'
  c.optim.epochs = 600
  c.optim.warmup_epochs = 15
  c.optim.start_lr, c.optim.lr, c.optim.final_lr = 2e-4, 8e-4, 1e-4
  c.eval.probe = False
  return config_lib.lock(c)
