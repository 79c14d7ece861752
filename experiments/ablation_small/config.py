r"""The small ablation study's pretraining run: a tiny ViT on `shapes` scenes, a few minutes on
2 CPU cores, so every variant of configs/ablation.py x 3 seeds fits in one session
(experiments/ablation_small/README.md has the measured times and the results).

  bash experiments/ablation_small/run.sh          # the whole study
  python -m stop_jax.sweep --config=experiments/ablation_small/config.py --variants=table6 \
    --seeds=0,1,2 --workdir=/tmp/ablation_small/shapes   # one group

configs/tiny.py's model (4 blocks of width 64, a 2-block predictor), on 64 px CLEVR-like scenes
cut into an 8x8 grid of 8 px patches (objects of a few pixels at 32 px are too small to count),
3,200 scenes per epoch, 6 epochs (150 steps of 128), the official mask sampler (as
configs/ablation.py). `:data=digits` runs configs/tiny.py's digits recipe (32 px, patch 4, 660
steps) with the official mask sampler and its own linear probe.
"""

from stop_jax import config as config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, data='shapes')
  c = config_lib.base_config()
  c.model.variant = 'tiny'
  c.model.width, c.model.depth, c.model.num_heads = 64, 4, 4
  c.model.gelu, c.model.scan_blocks = 'tanh', False
  c.predictor.width, c.predictor.depth, c.predictor.num_heads = 64, 2, 4
  c.stop.sigma = 0.25
  c.mask.mode = 'official'
  c.mask.min_keep = 4
  c.data.global_batch_size = 128
  c.data.blur_prob, c.data.grayscale_prob = 0.0, 0.0
  c.data.interpolation = 'bicubic'
  c.optim.start_lr, c.optim.lr, c.optim.final_lr = 2e-4, 1e-3, 1e-5
  c.optim.ema_start = 0.99
  c.log_every_steps = 50
  c.checkpoint.every_steps = 100
  c.eval.probe_max_examples = 2000
  c.eval.probe_random_init = False  # one random-init reference is enough for a whole sweep
  c.eval.health_examples = 128
  if args.data == 'shapes':
    c.data.source = 'shapes'
    c.data.shapes_label = 'count'
    c.eval.probe = False  # the sweep's --evaluate probes count and dist (both feature types)
    c.model.image_size, c.model.patch_size = 64, 8
    c.data.num_train_examples = 3200
    c.data.crop_scale = (0.5, 1.0)
    c.optim.epochs, c.optim.warmup_epochs = 6, 1
  elif args.data == 'digits':
    c.data.source = 'digits'
    c.model.image_size, c.model.patch_size = 32, 4
    c.data.flip = False
    c.data.crop_scale = (0.5, 1.0)
    c.optim.epochs, c.optim.warmup_epochs = 60, 6
  else:
    raise config_lib.ConfigError(f'data={args.data!r} is not allowed: shapes or digits.')
  return config_lib.lock(c)
