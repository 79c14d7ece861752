#!/usr/bin/env bash
# The small ablation study (README.md beside this file): every run, its evaluations and the
# tables, from the repo root with the project's venv. Rerunning skips what is finished; two
# copies with disjoint --variants lists may run at once (the study ran shapes as two halves).
#   bash experiments/ablation_small/run.sh [DIR]   (default /tmp/ablation_small)
set -euo pipefail
dir=${1:-/tmp/ablation_small}
config=experiments/ablation_small/config.py
# Every run and evaluation renders the same scenes: render them once.
export STOP_JAX_SHAPES_CACHE=${STOP_JAX_SHAPES_CACHE:-$dir/shapes_cache}

# shapes: pretrain each variant x 3 seeds, then logistic-regression probes of count and dist
# on the last layer's avg-pooled features (2,000 train scenes, 1,000 held-out) of each run.
python -m stop_jax.sweep --config=$config --seeds=0,1,2 --workdir="$dir/shapes" \
  --variants=stop,sincos,learned_pos,context,both,lowres_max,lowres_bilinear,fixed_cov,corrected_masks,random_init \
  --evaluate=configs/eval/shapes_count.py,configs/eval/shapes_dist.py \
  --eval_args="--config.eval.max_train_examples=2000 --config.eval.max_test_examples=1000 --config.eval.feature_types=\"('last',)\""

# digits: StoP vs sin-cos (and the untrained reference) with configs/tiny.py's recipe; the score
# is the run's own linear probe on the 1,437 / 360 split.
python -m stop_jax.sweep --config=$config:data=digits --variants=stop,sincos,random_init \
  --seeds=0,1,2 --workdir="$dir/digits"
