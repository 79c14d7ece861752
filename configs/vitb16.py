r"""ViT-B/16 I-JEPA + StoP on ImageNet-1k, 600 epochs (paper Table 10).

Command:
  python -m stop_jax.main --config=configs/vitb16.py --workdir=$WORKDIR \
    --config.data.data_dir=$TFDS_DIR

Expects tfds `imagenet2012` prepared in data_dir; global batch 2048 (e.g. 64 per chip on 32
chips). Expected result (paper Table 14): 74.5% IN-1k linear-probe top-1 with the frozen target
encoder (I-JEPA without StoP: 72.9%).
"""

from stop_jax import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.model.variant = 'base'
  c.model.patch_size = 16
  c.predictor.depth = 6
  c.stop.sigma = 0.25
  c.optim.epochs = 600
  c.optim.warmup_epochs = 15
  c.optim.start_lr, c.optim.lr, c.optim.final_lr = 2e-4, 8e-4, 1e-6
  c.eval.probe = False  # IN-1k probes have their own command (configs/eval).
  return config_lib.lock(c)
