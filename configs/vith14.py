r"""ViT-H/14 I-JEPA + StoP on ImageNet-1k, 300 epochs (paper Table 12).

Command:
  python -m stop_jax.main --config=configs/vith14.py --workdir=$WORKDIR \
    --config.data.data_dir=$TFDS_DIR

Expects tfds `imagenet2012`; global batch 2048. The LR is held constant after epoch 250, as in
the StoP code. StoP trained ViT-H in fp16 and I-JEPA in bf16 autocast; we compute in bfloat16
with float32 params. Expected result (paper Table 14): 79.6% IN-1k linear-probe top-1
(I-JEPA: 79.3%). Note: the released StoP ViT-H weights use patch 16 (`--config.model.patch_size=16`).
"""

from stop_jax import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.model.variant = 'huge'
  c.model.patch_size = 14
  c.model.dtype = 'bfloat16'
  c.predictor.depth = 12
  c.stop.sigma = 0.2
  c.optim.epochs = 300
  c.optim.warmup_epochs = 40
  c.optim.start_lr, c.optim.lr, c.optim.final_lr = 2e-4, 1e-3, 1e-6
  c.optim.constant_lr_after_epoch = 250
  c.eval.probe = False
  return config_lib.lock(c)
