r"""DAVIS 2017 semi-supervised video object segmentation by label propagation (paper Table 3).

Command:
  python -m stop_jax.evaluate --config=configs/eval/davis.py --workdir=$WORKDIR \
    --config.eval.data_dir=$DAVIS

$DAVIS is the unpacked DAVIS-2017-trainval-480p.zip (https://davischallenge.org/davis2017/
code.html): ImageSets/2017/val.txt, JPEGImages/480p/<seq>/*.jpg, Annotations/480p/<seq>/*.png.
$WORKDIR is a pretraining run, an export or a converted official checkpoint.

DINO's protocol (`eval_video_segmentation.py`) with its hyper-parameters, as the StoP paper does:
the 30 val sequences at 480p, frames resized to 832x480 (`davis_short_side`,
`davis_long_multiple`), last-layer patch tokens of the frozen target encoder, labels propagated
from the first frame and the 7 previous ones, exp(cos / 0.1) affinities within a 12-token window,
top-5 keys per token. The position table at the frames' grid is the trained one resized
bicubically (`davis_pos_embed=interpolate`, DINO's `interpolate_pos_encoding`;
`:pos_embed=recompute` computes the sin-cos table at the new grid instead). Scored with the
davis2017 evaluation's J and F (first and last frames excluded).

Writes $WORKDIR/eval/davis.json (J&F-Mean, J/F Mean, Recall, Decay; per-sequence and
per-object tables), $WORKDIR/eval/davis.md (the same tables in markdown) and the masks in the
davis2017 results layout, $WORKDIR/eval/davis/last/<seq>/<frame>.png (`--results_path` of the
official evaluation_method.py). Expected: the J&F-Mean column of the paper's Table 3 for the same
checkpoint. Time: one forward pass per frame (about 2,000 frames) plus one propagation per
frame; minutes on one accelerator.
"""

from stop_jax import config as config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, pos_embed='interpolate')
  c = config_lib.base_config()
  c.eval.protocol = 'davis'
  c.eval.name = 'davis' if args.pos_embed == 'interpolate' else f'davis_{args.pos_embed}'
  c.eval.feature_types = ('last',)  # DINO: the last layer's patch tokens
  c.eval.batch_size = 16  # frames per forward pass (480x832: 1,560 tokens each at patch 16)
  c.eval.davis_pos_embed = args.pos_embed
  return config_lib.lock(c)
