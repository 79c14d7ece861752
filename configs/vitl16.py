r"""ViT-L/16 I-JEPA + StoP on ImageNet-1k, 600 epochs (paper Table 11).

Command:
  python -m stop_jax.main --config=configs/vitl16.py --workdir=$WORKDIR \
    --config.data.data_dir=$TFDS_DIR

Expects tfds `imagenet2012`; global batch 2048. Expected result (paper Table 14): 78.5% IN-1k
linear-probe top-1 (I-JEPA: 77.5%).
"""

from stop_jax import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.model.variant = 'large'
  c.model.patch_size = 16
  c.predictor.depth = 12
  c.stop.sigma = 0.25
  c.optim.epochs = 600
  c.optim.warmup_epochs = 15
  c.optim.start_lr, c.optim.lr, c.optim.final_lr = 2e-4, 8e-4, 1e-6
  c.eval.probe = False
  return config_lib.lock(c)
